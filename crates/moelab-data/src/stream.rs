//! Mixture streams: a stateless map from a global sequence index to a token span, so batches
//! are exact, reproducible, resumable from a few numbers and sliceable across ranks.
//!
//! Global sequence p -> (block shuffle) blended position i -> (greedy domain blend) domain d and
//! its k-th draw -> (greedy source blend) source s and its m-th draw -> epoch m / chunks and a
//! seeded permutation of that source's chunks of seq_len + 1 tokens.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::batch::Batch;
use crate::blend::{BlendStage, Blender, Permutation};
use crate::config::DataConfig;
use crate::dataset::Dataset;
use crate::hash::Hasher;
use crate::{DataError, Result};
use moelab_io::rng::mix64;

/// The domain mixture in force from a global sequence on (shares normalised to sum 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamStage {
    /// First global sequence of the stage (in blended order).
    pub start_sequence: u64,
    /// Share by domain name; domains absent are not drawn.
    pub mixture: BTreeMap<String, f64>,
}

/// Everything needed to continue a stream exactly: position, stage history and identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamState {
    /// Global sequences consumed by all ranks together.
    pub sequences_consumed: u64,
    /// The stage history, first stage at sequence 0.
    pub stages: Vec<StreamStage>,
    /// Source shares inside each domain (normalised), which must not change on resume.
    #[serde(default)]
    pub source_mixture: BTreeMap<String, BTreeMap<String, f64>>,
    /// Hash of dataset manifest, tokenizer, seq_len, seed and shuffle_block.
    pub fingerprint: String,
}

/// Where one global sequence comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Domain id.
    pub domain: u32,
    /// Source id within the domain.
    pub source: u32,
    /// First token of the seq_len + 1 token chunk in the source's training stream.
    pub token_start: u64,
    /// Drawn from the domain's classifier-selected documents (`data.select`).
    pub selected: bool,
}

/// Expected use of one source over a token budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceUsage {
    /// Domain name.
    pub domain: String,
    /// Source name.
    pub source: String,
    /// Sequences drawn from it (expected, within one sequence per stage of the exact count).
    pub sequences: f64,
    /// Training chunks of seq_len + 1 tokens it holds.
    pub chunks: u64,
    /// Passes over its training data: sequences / chunks.
    pub epochs: f64,
}

/// Target vs realised shares over a stream prefix (what `moelab data mix` prints).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MixReport {
    /// Sequences examined.
    pub sequences: u64,
    /// One row per domain with a positive share, then its `[scores >= threshold]` selection
    /// (with `data.select`), then one per source (the rest of a selection).
    pub rows: Vec<MixRow>,
    /// Largest |realised - target| count over all prefixes and domains, in sequences (and of
    /// each selection's count against its share of the domain's sequences).
    pub max_prefix_deviation: f64,
    /// Expected use of every drawn source.
    pub usage: Vec<SourceUsage>,
}

/// One domain (source = None) or source line of a [`MixReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MixRow {
    /// Domain name.
    pub domain: String,
    /// Source name; None for the domain's total.
    pub source: Option<String>,
    /// Target share of all sequences.
    pub target: f64,
    /// Realised share of all sequences.
    pub realised: f64,
    /// Realised sequences.
    pub sequences: u64,
}

/// An exact, seeded, random-access mixture of a dataset's domains and sources.
pub struct MixtureStream {
    dataset: Arc<Dataset>,
    seq_len: usize,
    seed: u64,
    shuffle_block: u64,
    stages: Vec<StreamStage>,
    source_mixture: BTreeMap<String, BTreeMap<String, f64>>,
    /// Normalised source weights per domain (by source id).
    source_weights: Vec<Vec<f64>>,
    domain_blender: Blender,
    /// Per domain: a blender over its sources, or the only source with a positive share.
    source_pick: Vec<SourcePick>,
    /// Training chunks of seq_len + 1 tokens per domain and source.
    chunks: Vec<Vec<u64>>,
    /// Per domain: its `data.select` pools, if any.
    selection: Vec<Option<Selection>>,
    fingerprint: String,
}

enum SourcePick {
    Only(usize),
    Blend(Blender),
}

/// A domain's classifier selection: its draws are blended between the selected pool (share
/// `share`, within one sequence per prefix like every blend) and the rest, which is then drawn
/// by the domain's source shares. A chunk belongs to the pool of the document holding its first
/// token.
struct Selection {
    /// Display name, `<scores> >= <threshold>`.
    label: String,
    share: f64,
    /// Category 0 = selected, 1 = the rest.
    blender: Blender,
    /// (source, chunk) of every selected chunk, by source then chunk.
    selected: Vec<(u32, u64)>,
    /// Per source: its chunks that are not selected.
    rest: Vec<Vec<u64>>,
    /// Shares of the sources in the rest (normalised; 0 where a source has no rest): the given
    /// `data.source_mixture` restricted to them, or proportional to their rest chunks.
    rest_weights: Vec<f64>,
    /// Picks the source of a draw from the rest.
    rest_pick: SourcePick,
}

/// Picks sources by `weights`: the only positive one, or a blend.
fn source_pick(weights: &[f64]) -> SourcePick {
    let active: Vec<usize> = (0..weights.len()).filter(|&s| weights[s] > 0.0).collect();
    if active.len() == 1 {
        SourcePick::Only(active[0])
    } else {
        SourcePick::Blend(Blender::new(
            weights.len(),
            vec![BlendStage {
                start: 0,
                weights: weights.to_vec(),
            }],
        ))
    }
}

/// One draw inside a domain, before the chunk permutation.
#[derive(Clone, Copy)]
enum Draw {
    /// The m-th draw from the selected pool.
    Selected(u64),
    /// The k-th draw from the domain's sources (or from the rest of a selection).
    Sources(u64),
}

/// The selection pools of domain `d` under `cfg`.
fn build_selection(
    dataset: &Dataset,
    d: usize,
    cfg: &crate::config::SelectConfig,
    chunk: u64,
    chunks: &[u64],
    given_weights: Option<&[f64]>,
) -> Result<Selection> {
    let mut selected = Vec::new();
    let mut rest = Vec::with_capacity(chunks.len());
    for (s, &n) in chunks.iter().enumerate() {
        let (ends, scores) = crate::classify::train_doc_scores(dataset, d, s, &cfg.scores)?;
        let mut own_rest = Vec::new();
        let mut doc = 0usize;
        for c in 0..n {
            let first = c * chunk;
            while doc < ends.len() && ends[doc] <= first {
                doc += 1;
            }
            if scores
                .get(doc)
                .is_some_and(|&x| f64::from(x) >= cfg.threshold)
            {
                selected.push((s as u32, c));
            } else {
                own_rest.push(c);
            }
        }
        rest.push(own_rest);
    }
    let rest_weights = normalise(
        &rest
            .iter()
            .enumerate()
            .map(|(s, r)| match given_weights {
                Some(w) if !r.is_empty() => w[s],
                Some(_) => 0.0,
                None => r.len() as f64,
            })
            .collect::<Vec<_>>(),
    );
    Ok(Selection {
        rest_pick: source_pick(&rest_weights),
        rest_weights,
        label: format!("{} >= {}", cfg.scores, cfg.threshold),
        share: cfg.share,
        blender: Blender::new(
            2,
            vec![BlendStage {
                start: 0,
                weights: vec![cfg.share, 1.0 - cfg.share],
            }],
        ),
        selected,
        rest,
    })
}

impl std::fmt::Debug for MixtureStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MixtureStream")
            .field("seq_len", &self.seq_len)
            .field("seed", &self.seed)
            .field("stages", &self.stages)
            .finish_non_exhaustive()
    }
}

const WEIGHT_TOLERANCE: f64 = 1e-9;

impl MixtureStream {
    /// A fresh stream over `dataset` following `cfg`'s mixture, stages and source shares.
    pub fn new(dataset: Arc<Dataset>, cfg: &DataConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let stages = config_stages(&dataset, cfg)?;
        Self::build(dataset, cfg, seed, stages)
    }

    /// Resume: checks the fingerprint; if cfg's mixture differs from the state's last stage: Err
    /// unless allow_mixture_change, in which case a stage is appended at state.sequences_consumed
    /// (rounded up to the next shuffle block, so no consumed sequence changes).
    pub fn resume(
        dataset: Arc<Dataset>,
        cfg: &DataConfig,
        seed: u64,
        state: &StreamState,
        allow_mixture_change: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let expected = fingerprint(&dataset, cfg, seed);
        if state.fingerprint != expected {
            return Err(DataError::Resume(format!(
                "the checkpoint's stream fingerprint {} differs from this run's {expected}: the dataset, \
                 tokenizer, data.seq_len, data.shuffle_block, data.select or the seed changed since the checkpoint \
                 (a changed stream would not continue the same data order)",
                state.fingerprint
            )));
        }
        if state.stages.first().map(|s| s.start_sequence) != Some(0) {
            return Err(DataError::Resume(
                "the checkpoint's stream state has no stage starting at sequence 0".into(),
            ));
        }
        let wanted = config_stages(&dataset, cfg)?;
        let consumed = state.sequences_consumed;
        // The sequences up to the next block boundary are decoded with the recorded stages
        // either way; the config only has to agree with the recorded plan from there on, so a
        // run resumed once with --allow-mixture-change (its stage is in the history) resumes
        // again without the flag.
        let block = cfg.shuffle_block as u64;
        let switch = consumed.div_ceil(block) * block;
        let first_difference = first_difference(&wanted, &state.stages, switch);
        let stages = if stages_equal(&wanted, &state.stages) || first_difference.is_none() {
            state.stages.clone()
        } else {
            if !allow_mixture_change {
                let at = first_difference.unwrap_or(switch);
                return Err(DataError::Resume(format!(
                    "the config's mixture stages differ from the checkpoint's recorded stages (from sequence {at}: config {} \
                     vs checkpoint {}); restore the checkpoint's [data.mixture]/[[data.stages]], or pass \
                     --allow-mixture-change to append a stage at the current position (sequence {consumed})",
                    show(&active(&wanted, at).mixture),
                    show(&active(&state.stages, at).mixture)
                )));
            }
            // History stays as it was; the new mixture starts at the next block boundary so the
            // block holding the last consumed sequence is decoded exactly as before.
            let mut stages: Vec<StreamStage> = state
                .stages
                .iter()
                .filter(|s| s.start_sequence <= switch)
                .cloned()
                .collect();
            let now = active(&wanted, switch);
            if !mixture_equal(&active(&stages, switch).mixture, &now.mixture) {
                stages.retain(|s| s.start_sequence < switch);
                stages.push(StreamStage {
                    start_sequence: switch,
                    mixture: now.mixture.clone(),
                });
            }
            stages.extend(wanted.iter().filter(|s| s.start_sequence > switch).cloned());
            stages
        };
        let stream = Self::build(dataset, cfg, seed, stages)?;
        if !source_mixture_equal(&stream.source_mixture, &state.source_mixture) {
            return Err(DataError::Resume(format!(
                "data.source_mixture changed since the checkpoint (checkpoint {:?}, config {:?}); source \
                 shares cannot change mid-run: restore them",
                state.source_mixture, stream.source_mixture
            )));
        }
        Ok(stream)
    }

    /// The stream of `stages` over `dataset`: source shares, the checks that every drawn
    /// domain and source holds data, the `data.select` pools and the repetition limit.
    fn build(
        dataset: Arc<Dataset>,
        cfg: &DataConfig,
        seed: u64,
        stages: Vec<StreamStage>,
    ) -> Result<Self> {
        let seq_len = cfg.seq_len;
        let chunk = seq_len as u64 + 1;
        let n_domains = dataset.domains().len();
        let chunks: Vec<Vec<u64>> = (0..n_domains)
            .map(|d| {
                (0..dataset.source_count(d))
                    .map(|s| dataset.train_counts(d, s).tokens / chunk)
                    .collect()
            })
            .collect();
        let (source_weights, source_mixture) = source_shares(&dataset, cfg, &chunks)?;
        check_drawable(&dataset, &stages, &source_weights, &chunks, chunk)?;
        let blend_stages = stages
            .iter()
            .map(|s| BlendStage {
                start: s.start_sequence,
                weights: dataset
                    .domains()
                    .iter()
                    .map(|d| s.mixture.get(d).copied().unwrap_or(0.0))
                    .collect(),
            })
            .collect();
        let source_pick = source_weights.iter().map(|w| source_pick(w)).collect();
        let selection = selections(&dataset, cfg, &stages, &source_weights, &chunks)?;
        let stream = MixtureStream {
            fingerprint: fingerprint(&dataset, cfg, seed),
            domain_blender: Blender::new(n_domains, blend_stages),
            dataset,
            seq_len,
            seed,
            shuffle_block: cfg.shuffle_block as u64,
            stages,
            source_mixture,
            source_weights,
            source_pick,
            chunks,
            selection,
        };
        stream.check_repetition(cfg)?;
        Ok(stream)
    }

    /// `data.max_repetition` over `data.total_tokens`: no source may be read more often.
    fn check_repetition(&self, cfg: &DataConfig) -> Result<()> {
        let chunk = self.seq_len as u64 + 1;
        if let (Some(total), Some(max)) = (cfg.total_tokens, cfg.max_repetition) {
            let over: Vec<String> = self
                .usage(total.div_ceil(self.seq_len as u64))
                .iter()
                .filter(|u| u.epochs > max)
                .map(|u| {
                    format!(
                        "{}/{} would be read {:.2} times ({:.0} sequences from {} chunks of {chunk} tokens)",
                        u.domain, u.source, u.epochs, u.sequences, u.chunks
                    )
                })
                .collect();
            if !over.is_empty() {
                return Err(DataError::Repetition {
                    max,
                    details: format!(
                        "with data.total_tokens = {total}: {}; lower its share, raise the limit or add data",
                        over.join("; ")
                    ),
                });
            }
        }
        Ok(())
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The dataset the stream reads.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// The stage list in force (first at sequence 0).
    pub fn stages(&self) -> &[StreamStage] {
        &self.stages
    }

    /// The identity checked on resume.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The state to save after `sequences_consumed` global sequences.
    pub fn state(&self, sequences_consumed: u64) -> StreamState {
        StreamState {
            sequences_consumed,
            stages: self.stages.clone(),
            source_mixture: self.source_mixture.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// Where global sequences [first, first + n) come from.
    pub fn slots(&self, first: u64, n: usize) -> Vec<Slot> {
        if n == 0 {
            return Vec::new();
        }
        let draws = self.draws(first, n);
        // Per domain, the source draws needed form a short range: decode its sources once.
        let n_domains = self.chunks.len();
        let range = span(
            n_domains,
            draws.iter().filter_map(|&(d, draw)| match draw {
                Draw::Sources(k) => Some((d as usize, k)),
                Draw::Selected(_) => None,
            }),
        );
        let mut sources: Vec<Vec<(u32, u64)>> = vec![Vec::new(); n_domains];
        for d in 0..n_domains {
            if let (Some((lo, hi)), SourcePick::Blend(b)) = (range[d], self.pick(d)) {
                sources[d] = b.decode(lo, (hi - lo + 1) as usize);
            }
        }
        draws
            .iter()
            .map(|&(d, draw)| self.slot(d, draw, &range, &sources))
            .collect()
    }

    /// The domain and the draw inside it of global sequences [first, first + n), n > 0: the
    /// block shuffle, the domain blend and, under a selection, the pool blend.
    fn draws(&self, first: u64, n: usize) -> Vec<(u32, Draw)> {
        let block = self.shuffle_block;
        let last = first + n as u64 - 1;
        let (b0, b1) = (first / block, last / block);
        let base = b0 * block;
        let blended = self
            .domain_blender
            .decode(base, ((b1 - b0 + 1) * block) as usize);
        let positions: Vec<usize> = (first..=last)
            .map(|p| {
                let b = p / block;
                let perm = Permutation::new(block, mix64(self.seed ^ 0x5eed_b10c) ^ mix64(b));
                (b * block + perm.apply(p % block) - base) as usize
            })
            .collect();
        // Per domain, the draws needed form a short range: decode its selection once.
        let n_domains = self.chunks.len();
        let domain_range = span(
            n_domains,
            positions.iter().map(|&i| {
                let (d, k) = blended[i];
                (d as usize, k)
            }),
        );
        let mut picks: Vec<Vec<(u32, u64)>> = vec![Vec::new(); n_domains];
        for d in 0..n_domains {
            if let (Some((lo, hi)), Some(sel)) = (domain_range[d], &self.selection[d]) {
                picks[d] = sel.blender.decode(lo, (hi - lo + 1) as usize);
            }
        }
        positions
            .iter()
            .map(|&i| {
                let (d, k) = blended[i];
                let draw = match &self.selection[d as usize] {
                    Some(_) => {
                        let lo = domain_range[d as usize].map_or(0, |r| r.0);
                        match picks[d as usize][(k - lo) as usize] {
                            (0, m) => Draw::Selected(m),
                            (_, m) => Draw::Sources(m),
                        }
                    }
                    None => Draw::Sources(k),
                };
                (d, draw)
            })
            .collect()
    }

    /// The chunk of one draw of domain `d`: from the selected pool, or from a source (picked
    /// from `sources`, decoded from draw `range[d].0` on) through its seeded chunk permutation.
    fn slot(
        &self,
        d: u32,
        draw: Draw,
        range: &[Option<(u64, u64)>],
        sources: &[Vec<(u32, u64)>],
    ) -> Slot {
        let chunk = self.seq_len as u64 + 1;
        let selection = self.selection[d as usize].as_ref();
        let k = match draw {
            Draw::Selected(m) => {
                let pool = selection.map_or(&[][..], |sel| sel.selected.as_slice());
                let n = pool.len().max(1) as u64;
                let key = mix64(mix64(self.seed ^ 0x5e1e_c7ed) ^ u64::from(d)) ^ (m / n);
                let (s, c) = pool
                    .get(Permutation::new(n, key).apply(m % n) as usize)
                    .copied()
                    .unwrap_or((0, 0));
                return Slot {
                    domain: d,
                    source: s,
                    token_start: c * chunk,
                    selected: true,
                };
            }
            Draw::Sources(k) => k,
        };
        let (s, m) = match self.pick(d as usize) {
            SourcePick::Only(s) => (*s as u32, k),
            SourcePick::Blend(_) => {
                let lo = range[d as usize].map_or(0, |r| r.0);
                sources[d as usize][(k - lo) as usize]
            }
        };
        let rest = selection.map(|sel| sel.rest[s as usize].as_slice());
        let n_chunks = rest.map_or(self.chunks[d as usize][s as usize], |r| r.len() as u64);
        let epoch = m / n_chunks.max(1);
        let key =
            mix64(mix64(mix64(self.seed ^ 0xc4a2_5eed) ^ u64::from(d)) ^ u64::from(s)) ^ epoch;
        let p = Permutation::new(n_chunks, key).apply(m % n_chunks.max(1));
        let c = rest.map_or(p, |r| r.get(p as usize).copied().unwrap_or(0));
        Slot {
            domain: d,
            source: s,
            token_start: c * chunk,
            selected: false,
        }
    }

    /// How domain `d` picks the source of a draw (from the rest, under a selection).
    fn pick(&self, d: usize) -> &SourcePick {
        match &self.selection[d] {
            Some(sel) => &sel.rest_pick,
            None => &self.source_pick[d],
        }
    }

    /// Sequences [first, first + n) of the global stream.
    pub fn batch(&self, first: u64, n: usize) -> Result<Batch> {
        let chunk = self.seq_len + 1;
        let mut batch = Batch::with_capacity(n, self.seq_len);
        let mut buf = Vec::with_capacity(chunk);
        for slot in self.slots(first, n) {
            buf.clear();
            let source = self
                .dataset
                .source_data(slot.domain as usize, slot.source as usize)
                .ok_or_else(|| DataError::Argument("slot outside the dataset".into()))?;
            source.train.copy_into(slot.token_start, chunk, &mut buf)?;
            batch.push(&buf, slot.domain, slot.source);
        }
        Ok(batch)
    }

    /// This rank's share of global batch number `step` of `global_sequences` sequences
    /// (contiguous, disjoint, covering; sizes differ by at most one).
    pub fn rank_batch(
        &self,
        step: u64,
        global_sequences: usize,
        rank: usize,
        world: usize,
    ) -> Result<Batch> {
        let (first, n) = rank_range(step, global_sequences, rank, world)?;
        self.batch(first, n)
    }

    /// Expected use of every drawn source over the first `sequences` global sequences.
    pub fn usage(&self, sequences: u64) -> Vec<SourceUsage> {
        let domains = self.dataset.domains();
        let mut per_domain = vec![0.0f64; domains.len()];
        for (i, stage) in self.stages.iter().enumerate() {
            let end = self
                .stages
                .get(i + 1)
                .map_or(sequences, |s| s.start_sequence.min(sequences));
            let len = end.saturating_sub(stage.start_sequence) as f64;
            for (d, name) in domains.iter().enumerate() {
                per_domain[d] += stage.mixture.get(name).copied().unwrap_or(0.0) * len;
            }
        }
        let mut out = Vec::new();
        for (d, name) in domains.iter().enumerate() {
            if per_domain[d] <= 0.0 {
                continue;
            }
            let selection = self.selection[d].as_ref();
            if let Some(sel) = selection {
                let seqs = per_domain[d] * sel.share;
                let chunks = sel.selected.len() as u64;
                out.push(SourceUsage {
                    domain: name.clone(),
                    source: format!("[{}]", sel.label),
                    sequences: seqs,
                    chunks,
                    epochs: if chunks == 0 {
                        if seqs > 0.0 {
                            f64::INFINITY
                        } else {
                            0.0
                        }
                    } else {
                        seqs / chunks as f64
                    },
                });
            }
            for (s, source) in self.dataset.sources(d).into_iter().enumerate() {
                let w = selection.map_or(self.source_weights[d][s], |sel| {
                    sel.rest_weights[s] * (1.0 - sel.share)
                });
                if w <= 0.0 {
                    continue;
                }
                let seqs = per_domain[d] * w;
                let chunks = selection.map_or(self.chunks[d][s], |sel| sel.rest[s].len() as u64);
                out.push(SourceUsage {
                    domain: name.clone(),
                    source,
                    sequences: seqs,
                    chunks,
                    epochs: if chunks == 0 {
                        f64::INFINITY
                    } else {
                        seqs / chunks as f64
                    },
                });
            }
        }
        out
    }

    /// Realised vs target shares over the first `sequences` global sequences.
    pub fn report(&self, sequences: u64) -> MixReport {
        let domains = self.dataset.domains();
        let nd = domains.len();
        let mut counts = vec![0u64; nd];
        let mut source_counts: Vec<Vec<u64>> = (0..nd)
            .map(|d| vec![0; self.dataset.source_count(d)])
            .collect();
        let mut expected = vec![0.0f64; nd];
        let mut selected = vec![0u64; nd];
        let mut max_dev = 0.0f64;
        let step = 4096usize;
        let mut p = 0u64;
        while p < sequences {
            let n = (sequences - p).min(step as u64) as usize;
            for (k, slot) in self.slots(p, n).into_iter().enumerate() {
                let stage = active(&self.stages, p + k as u64);
                let d = slot.domain as usize;
                counts[d] += 1;
                if slot.selected {
                    selected[d] += 1;
                } else {
                    source_counts[d][slot.source as usize] += 1;
                }
                // The selected share is exact within the domain's own draws.
                if let Some(sel) = &self.selection[d] {
                    let want = sel.share * counts[d] as f64;
                    max_dev = max_dev.max((selected[d] as f64 - want).abs());
                }
                for (d, name) in domains.iter().enumerate() {
                    expected[d] += stage.mixture.get(name).copied().unwrap_or(0.0);
                    max_dev = max_dev.max((counts[d] as f64 - expected[d]).abs());
                }
            }
            p += n as u64;
        }
        let total = sequences.max(1) as f64;
        let mut rows = Vec::new();
        for (d, name) in domains.iter().enumerate() {
            if expected[d] <= 0.0 && counts[d] == 0 {
                continue;
            }
            rows.push(MixRow {
                domain: name.clone(),
                source: None,
                target: expected[d] / total,
                realised: counts[d] as f64 / total,
                sequences: counts[d],
            });
            let selection = self.selection[d].as_ref();
            if let Some(sel) = selection {
                rows.push(MixRow {
                    domain: name.clone(),
                    source: Some(format!("[{}]", sel.label)),
                    target: expected[d] / total * sel.share,
                    realised: selected[d] as f64 / total,
                    sequences: selected[d],
                });
            }
            for (s, source) in self.dataset.sources(d).into_iter().enumerate() {
                let w = selection.map_or(self.source_weights[d][s], |sel| {
                    sel.rest_weights[s] * (1.0 - sel.share)
                });
                rows.push(MixRow {
                    domain: name.clone(),
                    source: Some(source),
                    target: expected[d] / total * w,
                    realised: source_counts[d][s] as f64 / total,
                    sequences: source_counts[d][s],
                });
            }
        }
        MixReport {
            sequences,
            rows,
            max_prefix_deviation: max_dev,
            usage: self.usage(sequences),
        }
    }
}

/// First global sequence and count of `rank`'s slice of global batch `step`.
pub fn rank_range(
    step: u64,
    global_sequences: usize,
    rank: usize,
    world: usize,
) -> Result<(u64, usize)> {
    if world == 0 || rank >= world {
        return Err(DataError::Argument(format!(
            "rank {rank} is not in a world of {world}"
        )));
    }
    if global_sequences < world {
        return Err(DataError::Argument(format!(
            "a global batch of {global_sequences} sequences cannot give each of {world} ranks one"
        )));
    }
    let g = global_sequences as u64;
    let (w, r) = (world as u64, rank as u64);
    let lo = r * g / w;
    let hi = (r + 1) * g / w;
    Ok((step * g + lo, (hi - lo) as usize))
}

/// The config's stages resolved against the dataset: names checked, shares normalised,
/// start tokens turned into sequences.
fn config_stages(dataset: &Dataset, cfg: &DataConfig) -> Result<Vec<StreamStage>> {
    let mut stages = Vec::with_capacity(1 + cfg.stages.len());
    let base = if cfg.mixture.is_empty() {
        // No mixture: every domain in proportion to its training tokens.
        dataset
            .domains()
            .iter()
            .enumerate()
            .map(|(d, name)| {
                let tokens: u64 = (0..dataset.source_count(d))
                    .map(|s| dataset.train_counts(d, s).tokens)
                    .sum();
                (name.clone(), tokens as f64)
            })
            .collect()
    } else {
        cfg.mixture.clone()
    };
    stages.push(StreamStage {
        start_sequence: 0,
        mixture: resolve("data.mixture", &base, dataset)?,
    });
    let seq_len = cfg.seq_len.max(1) as u64;
    for (i, stage) in cfg.stages.iter().enumerate() {
        let start_sequence = stage.start_token.div_ceil(seq_len);
        let mixture = resolve(
            &format!("data.stages[{i}].mixture"),
            &stage.mixture,
            dataset,
        )?;
        if stages
            .last()
            .is_some_and(|s: &StreamStage| s.start_sequence == start_sequence)
        {
            stages.pop();
        }
        stages.push(StreamStage {
            start_sequence,
            mixture,
        });
    }
    Ok(stages)
}

fn resolve(
    key: &str,
    weights: &BTreeMap<String, f64>,
    dataset: &Dataset,
) -> Result<BTreeMap<String, f64>> {
    for (name, w) in weights {
        if dataset.domain_id(name).is_none() {
            return Err(unknown(key, name, dataset.domains()));
        }
        if !w.is_finite() || *w < 0.0 {
            return Err(DataError::config(
                format!("{key}.{name}"),
                format!("weight must be a finite number >= 0, got {w}"),
            ));
        }
    }
    let sum: f64 = weights.values().sum();
    if sum <= 0.0 {
        return Err(DataError::config(
            key,
            "the weights sum to 0: give at least one positive share",
        ));
    }
    Ok(weights
        .iter()
        .filter(|(_, &w)| w > 0.0)
        .map(|(n, &w)| (n.clone(), w / sum))
        .collect())
}

fn unknown(key: &str, name: &str, domains: &[String]) -> DataError {
    DataError::config(
        format!("{key}.{name}"),
        format!("unknown domain; the dataset has: {}", domains.join(", ")),
    )
}

fn normalise(weights: &[f64]) -> Vec<f64> {
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 {
        return vec![0.0; weights.len()];
    }
    weights.iter().map(|w| w / sum).collect()
}

fn active(stages: &[StreamStage], sequence: u64) -> &StreamStage {
    let i = stages
        .partition_point(|s| s.start_sequence <= sequence)
        .saturating_sub(1);
    &stages[i]
}

fn mixture_equal(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((na, wa), (nb, wb))| na == nb && (wa - wb).abs() <= WEIGHT_TOLERANCE)
}

/// The first sequence at or after `from` where `a` and `b` give different mixtures (both are
/// piecewise constant, so only `from` and the later stage starts need checking).
fn first_difference(a: &[StreamStage], b: &[StreamStage], from: u64) -> Option<u64> {
    let mut points: Vec<u64> = a
        .iter()
        .chain(b)
        .map(|s| s.start_sequence)
        .filter(|&s| s > from)
        .collect();
    points.push(from);
    points.sort_unstable();
    points
        .into_iter()
        .find(|&p| !mixture_equal(&active(a, p).mixture, &active(b, p).mixture))
}

fn stages_equal(a: &[StreamStage], b: &[StreamStage]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.start_sequence == y.start_sequence && mixture_equal(&x.mixture, &y.mixture)
        })
}

fn source_mixture_equal(
    a: &BTreeMap<String, BTreeMap<String, f64>>,
    b: &BTreeMap<String, BTreeMap<String, f64>>,
) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((na, ma), (nb, mb))| na == nb && mixture_equal(ma, mb))
}

fn show(mixture: &BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = mixture
        .iter()
        .map(|(n, w)| format!("{n} = {w:.4}"))
        .collect();
    format!("{{ {} }}", parts.join(", "))
}

fn fingerprint(dataset: &Dataset, cfg: &DataConfig, seed: u64) -> String {
    let mut h = Hasher::new();
    h.update(b"moelab-stream-v1");
    h.update(crate::dataset::dataset_hash(dataset).as_bytes());
    h.update(dataset.manifest().tokenizer.sha256.as_bytes());
    h.update(&(cfg.seq_len as u64).to_le_bytes());
    h.update(&seed.to_le_bytes());
    h.update(&(cfg.shuffle_block as u64).to_le_bytes());
    // The selection decides which chunks are drawn: a resume must use the same one. (Absent, the
    // fingerprint is what it was before selections existed.)
    for (name, sel) in &cfg.select {
        h.update(
            format!(
                "select:{name}:{}:{}:{}",
                sel.scores, sel.threshold, sel.share
            )
            .as_bytes(),
        );
    }
    let mut hex = h.hex();
    hex.truncate(32);
    hex
}

/// Source shares by domain name, then source name.
type SourceMixture = BTreeMap<String, BTreeMap<String, f64>>;

/// Source shares per domain (by source id, normalised): given in `data.source_mixture`, or
/// proportional to the training chunks; and the positive ones by name, as a state records them.
fn source_shares(
    dataset: &Dataset,
    cfg: &DataConfig,
    chunks: &[Vec<u64>],
) -> Result<(Vec<Vec<f64>>, SourceMixture)> {
    let n_domains = dataset.domains().len();
    let mut source_weights = Vec::with_capacity(n_domains);
    let mut source_mixture = BTreeMap::new();
    for name in cfg.source_mixture.keys() {
        if dataset.domain_id(name).is_none() {
            return Err(unknown("data.source_mixture", name, dataset.domains()));
        }
    }
    for (d, domain) in dataset.domains().iter().enumerate() {
        let names = dataset.sources(d);
        let weights: Vec<f64> = match cfg.source_mixture.get(domain) {
            Some(given) => {
                for name in given.keys() {
                    if !names.contains(name) {
                        return Err(DataError::config(
                            format!("data.source_mixture.{domain}.{name}"),
                            format!(
                                "unknown source of domain `{domain}`; it has: {}",
                                names.join(", ")
                            ),
                        ));
                    }
                }
                names
                    .iter()
                    .map(|n| given.get(n).copied().unwrap_or(0.0))
                    .collect()
            }
            None => chunks[d].iter().map(|&c| c as f64).collect(),
        };
        let weights = normalise(&weights);
        source_mixture.insert(
            domain.clone(),
            names
                .iter()
                .zip(&weights)
                .filter(|(_, &w)| w > 0.0)
                .map(|(n, &w)| (n.clone(), w))
                .collect::<BTreeMap<_, _>>(),
        );
        source_weights.push(weights);
    }
    Ok((source_weights, source_mixture))
}

/// Every domain and source that can be drawn must hold at least one chunk of `chunk` tokens.
fn check_drawable(
    dataset: &Dataset,
    stages: &[StreamStage],
    source_weights: &[Vec<f64>],
    chunks: &[Vec<u64>],
    chunk: u64,
) -> Result<()> {
    for stage in stages {
        for (name, &w) in &stage.mixture {
            let Some(d) = dataset.domain_id(name) else {
                return Err(unknown("data.mixture", name, dataset.domains()));
            };
            if w <= 0.0 {
                continue;
            }
            for (s, &sw) in source_weights[d].iter().enumerate() {
                if sw > 0.0 && chunks[d][s] == 0 {
                    return Err(DataError::Mixture(format!(
                        "source {name}/{} has {} training tokens, fewer than one sequence of seq_len + 1 = {chunk}; \
                         give it no share in data.source_mixture.{name} or add data",
                        dataset.sources(d)[s],
                        dataset.train_counts(d, s).tokens
                    )));
                }
            }
            if source_weights[d].iter().all(|&sw| sw <= 0.0) {
                return Err(DataError::Mixture(format!(
                    "domain `{name}` has no training data of seq_len + 1 = {chunk} tokens"
                )));
            }
        }
    }
    Ok(())
}

/// Per domain, its `data.select` pools (None without a selection); a drawn selection must
/// leave both pools something to draw.
fn selections(
    dataset: &Dataset,
    cfg: &DataConfig,
    stages: &[StreamStage],
    source_weights: &[Vec<f64>],
    chunks: &[Vec<u64>],
) -> Result<Vec<Option<Selection>>> {
    let chunk = cfg.seq_len as u64 + 1;
    let mut selection: Vec<Option<Selection>> =
        (0..dataset.domains().len()).map(|_| None).collect();
    for (name, sel) in &cfg.select {
        let d = dataset
            .domain_id(name)
            .ok_or_else(|| unknown("data.select", name, dataset.domains()))?;
        let given = cfg
            .source_mixture
            .contains_key(name)
            .then_some(source_weights[d].as_slice());
        let pools = build_selection(dataset, d, sel, chunk, &chunks[d], given)?;
        let drawn = stages
            .iter()
            .any(|st| st.mixture.get(name).is_some_and(|&w| w > 0.0));
        if drawn && sel.share > 0.0 && pools.selected.is_empty() {
            return Err(DataError::Mixture(format!(
                "data.select.{name}: no training chunk of `{name}` has {}; lower the threshold or the share",
                pools.label
            )));
        }
        if drawn && sel.share < 1.0 && pools.rest_weights.iter().all(|&w| w <= 0.0) {
            return Err(DataError::Mixture(format!(
                "data.select.{name}: every drawn training chunk of `{name}` has {}, none is left for \
                 the other {:.2} of the domain; set share = 1.0 or raise the threshold",
                pools.label,
                1.0 - sel.share
            )));
        }
        selection[d] = Some(pools);
    }
    Ok(selection)
}

/// Per domain (of `n_domains`), the lowest and highest draw among `values` of (domain, draw).
fn span(n_domains: usize, values: impl Iterator<Item = (usize, u64)>) -> Vec<Option<(u64, u64)>> {
    let mut range: Vec<Option<(u64, u64)>> = vec![None; n_domains];
    for (d, k) in values {
        let r = &mut range[d];
        *r = Some(match *r {
            None => (k, k),
            Some((lo, hi)) => (lo.min(k), hi.max(k)),
        });
    }
    range
}
