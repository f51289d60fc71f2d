//! Validation rates: the share of each (domain, source)'s documents held out for validation,
//! chosen by each document's content hash, raised for small sources and pinned once a
//! dataset has split them.

use std::collections::BTreeMap;

use crate::input;
use crate::manifest::{Counts, Manifest, Split};

use super::options::{PrepareOptions, ShortValidation};
use super::units::{Unit, UnitRecord};

/// Scale of the validation shares: parts per million.
pub(super) const PPM: u64 = 1_000_000;

/// Text a domain's validation split gets at least in expectation (about 4-5k tokens: a stable
/// loss estimate even for small corpora), as long as that stays within a quarter of the domain.
pub const MIN_VALIDATION_BYTES: u64 = 16 * 1024;

/// Most a small domain's validation share is raised to.
const MAX_RAISED_PPM: u32 = 250_000;

/// A generous text bytes per token, so that the first guess at a source's share usually
/// already yields `--min-validation-tokens` (byte-level BPEs give 2.5-4.5).
const BYTES_PER_TOKEN_GUESS: u64 = 5;

/// The key of a (domain, source) in the validation shares (names never hold '/').
pub(super) fn source_key(domain: &str, source: &str) -> String {
    format!("{domain}/{source}")
}

/// Per-(domain, source) validation shares: a first guess that is a pure function of the input
/// listing (so every part of a prepare agrees), raised where a first pass fell short of
/// `--min-validation-tokens`, and pinned for sources an earlier prepare into the folder
/// already split.
pub(super) struct Rates {
    pub(super) fraction_ppm: u32,
    /// By `domain/source` (or `domain`, as manifests before per-source shares have it).
    pinned: BTreeMap<String, u32>,
    /// Estimated text bytes of each (domain, source)'s folder files.
    folder_bytes: BTreeMap<(String, String), u64>,
    /// Estimated text bytes of the files whose records name their domain (any could hold any).
    mixed_bytes: u64,
    /// Text a source's validation split should get in expectation.
    target_bytes: u64,
    /// Shares raised after the first pass, by `domain/source`.
    pub(super) raised: BTreeMap<String, u32>,
}

/// The training documents of one (domain, source) next in line for validation: those with the
/// lowest hash residues, just enough to cover the minimum (bounded memory).
#[derive(Default)]
pub(super) struct NextInLine {
    /// (hash residue, tokens), a max-heap on the residue.
    heap: std::collections::BinaryHeap<(u32, u64)>,
    tokens: u64,
}

impl NextInLine {
    /// Adds a training document; drops the highest residues no longer needed to reach `want`.
    pub(super) fn push(&mut self, residue: u32, tokens: u64, want: u64) {
        self.heap.push((residue, tokens));
        self.tokens += tokens;
        while let Some(&(_, top)) = self.heap.peek() {
            if self.heap.len() < 2 || self.tokens - top < want {
                break;
            }
            self.heap.pop();
            self.tokens -= top;
        }
    }
}

impl Rates {
    pub(super) fn new(opts: &PrepareOptions, units: &[Unit], previous: Option<&Manifest>) -> Rates {
        let mut folder_bytes = BTreeMap::new();
        let mut mixed_bytes = 0;
        for u in units {
            // Compressed files hold about three times their size in text.
            let text_bytes: u64 = u
                .files
                .iter()
                .map(|f| {
                    let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
                    if input::is_compressed(f) {
                        size * 3
                    } else {
                        size
                    }
                })
                .sum();
            match &u.fixed {
                Some(key) => *folder_bytes.entry(key.clone()).or_default() += text_bytes,
                None => mixed_bytes += text_bytes,
            }
        }
        let pinned = match previous {
            Some(m) if opts.part.is_none() && m.validation_fraction == opts.validation_fraction => {
                m.validation_ppm.clone()
            }
            _ => BTreeMap::new(),
        };
        Rates {
            fraction_ppm: (opts.validation_fraction * PPM as f64).round() as u32,
            pinned,
            folder_bytes,
            mixed_bytes,
            target_bytes: MIN_VALIDATION_BYTES.max(
                opts.min_validation_tokens
                    .saturating_mul(BYTES_PER_TOKEN_GUESS),
            ),
            raised: BTreeMap::new(),
        }
    }

    /// The validation share of `source` in `domain`, in ppm.
    pub(super) fn ppm(&self, domain: &str, source: &str) -> u32 {
        let key = source_key(domain, source);
        let set = self.pinned.get(&key).or_else(|| self.raised.get(&key));
        if let Some(&p) = set.or_else(|| self.pinned.get(domain)) {
            return p;
        }
        if self.fraction_ppm == 0 {
            return 0;
        }
        let folder = self
            .folder_bytes
            .get(&(domain.to_string(), source.to_string()));
        let bytes = folder.copied().unwrap_or(0) + self.mixed_bytes;
        let raised = self
            .target_bytes
            .saturating_mul(PPM)
            .checked_div(bytes)
            .map_or(MAX_RAISED_PPM, |p| p.min(u64::from(MAX_RAISED_PPM)) as u32);
        self.fraction_ppm.max(raised)
    }

    /// Raised shares, by `domain/source`, for the sources of `records` whose validation split
    /// holds fewer than `want` tokens: the smallest threshold that brings each up to `want`,
    /// taking at most a quarter of its tokens (but one document when it has two or more).
    /// Pinned sources and a disabled split (fraction 0) are left alone.
    pub(super) fn top_up(
        &self,
        want: u64,
        records: &[Option<UnitRecord>],
        mut next: BTreeMap<(String, String), NextInLine>,
    ) -> BTreeMap<String, u32> {
        let mut counts: BTreeMap<(String, String), (Counts, Counts)> = BTreeMap::new();
        for s in records.iter().flatten().flat_map(|r| &r.shards) {
            let c = counts
                .entry((s.domain.clone(), s.source.clone()))
                .or_default();
            match s.shard.split {
                Split::Validation => c.0.add(s.shard.counts),
                Split::Train => c.1.add(s.shard.counts),
            }
        }
        let mut raised = BTreeMap::new();
        for ((domain, source), (val, train)) in counts {
            let key = source_key(&domain, &source);
            let pinned = self.pinned.contains_key(&key) || self.pinned.contains_key(&domain);
            if val.tokens >= want || pinned || self.fraction_ppm == 0 {
                continue;
            }
            let Some(line) = next.remove(&(domain.clone(), source.clone())) else {
                continue;
            };
            let spare = (val.tokens + train.tokens) / 4;
            let several = val.documents + train.documents >= 2;
            let (mut tokens, mut documents, mut threshold) = (val.tokens, val.documents, None);
            for (residue, t) in line.heap.into_sorted_vec() {
                if tokens >= want || (tokens + t > spare && !(documents == 0 && several)) {
                    break;
                }
                tokens += t;
                documents += 1;
                threshold = Some(residue + 1);
            }
            if let Some(t) = threshold.filter(|&t| t > self.ppm(&domain, &source)) {
                raised.insert(key, t);
            }
        }
        raised
    }
}

/// The (domain, source)s of `manifest` whose validation split is below the minimum asked for
/// (none when the minimum does not apply: no validation split, or one part of a prepare).
pub(super) fn short_validation(manifest: &Manifest, opts: &PrepareOptions) -> Vec<ShortValidation> {
    let want = opts.min_validation_tokens;
    if want == 0 || opts.validation_fraction == 0.0 || opts.part.is_some() {
        return Vec::new();
    }
    let mut short = Vec::new();
    for d in &manifest.domains {
        for s in &d.sources {
            if s.validation.tokens < want {
                short.push(ShortValidation {
                    domain: d.name.clone(),
                    source: s.name.clone(),
                    tokens: s.validation.tokens,
                    documents: s.validation.documents,
                    total_documents: s.validation.documents + s.train.documents,
                    wanted: want,
                });
            }
        }
    }
    short
}

/// Whether a document with content hash `hash` is held out at share `ppm`.
pub(super) fn is_validation(hash: u64, ppm: u32) -> bool {
    hash % PPM < u64::from(ppm)
}
