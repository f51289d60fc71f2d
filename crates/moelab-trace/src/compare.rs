//! Ablation comparisons over seed replicates: per variant and domain the validation loss (mean
//! and spread over seeds), the delta against the baseline with a bootstrap 95% interval over
//! seeds, and the routing JSD against the baseline, raw and after matching experts
//! ([`crate::align`]), beside the noise floor: the JSD between the baseline and itself trained
//! with another seed. A delta whose interval holds 0, or a JSD at or below the noise floor, is
//! marked as inside the noise.
//!
//! Nothing is claimed that was not measured. With one seed there is no standard deviation, no
//! interval and no noise floor: those cells read [`ONE_SEED`] and the tables say that no
//! difference can be called beyond noise. Every JSD says whether it is raw or aligned. Every loss
//! shows the validation tokens behind it, and domains with fewer than
//! [`MIN_RELIABLE_VAL_TOKENS`] are marked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::align::{match_experts, permute_experts};
use crate::analysis::{run_jsd, RunJsd};
use crate::error::{Result, TraceError};
use crate::plot::Heatmap;
use crate::report::{jsd_lines, num, Comparison, Out, VariantJsd};
use crate::router_log::RouterLog;
use crate::stats::{bootstrap_mean_interval, spread, Interval};
use crate::trace::Trace;

/// Confidence level of the delta intervals.
pub const INTERVAL_LEVEL: f64 = 0.95;

/// Validation tokens below which a domain's loss is marked as resting on too few tokens: 128
/// sequences of the bundled 128-token context; a handful of documents can dominate fewer.
pub const MIN_RELIABLE_VAL_TOKENS: u64 = 16_384;

/// What a spread, an interval or a noise verdict reads when only one seed was trained.
pub const ONE_SEED: &str = "n/a (one seed)";

/// One trained run of an ablation: a variant at one seed, with its final evaluation.
#[derive(Debug, Clone)]
pub struct ReplicateRun {
    /// Variant name.
    pub variant: String,
    /// Its seed (`run.seed`).
    pub seed: u64,
    /// Validation loss per domain.
    pub losses: BTreeMap<String, f64>,
    /// Validation bits per byte per domain (tokenizer-independent; empty for evaluations
    /// written before it was measured).
    pub bpb: BTreeMap<String, f64>,
    /// Task scores, metric name (`task/metric`) -> value.
    pub scores: BTreeMap<String, f64>,
    /// Router counts on the validation tokens.
    pub counts: RouterLog,
    /// Per-token routing on the same validation tokens, for expert matching (None: raw JSD only).
    pub trace: Option<Trace>,
}

/// One row of an ablation comparison: a variant's domain loss, its delta and routing shift.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparisonRow {
    /// Variant name (the baseline has its own rows with zero deltas).
    pub variant: String,
    /// Domain name.
    pub domain: String,
    /// Seeds with a validation loss on this domain.
    pub seeds: usize,
    /// Validation loss of the variant on this domain, mean over seeds.
    pub val_loss: Option<f64>,
    /// Sample standard deviation of that loss over seeds (`None` with one seed).
    pub val_loss_std: Option<f64>,
    /// Validation tokens behind `val_loss`: the fewest over the variant's seeds (`None` when
    /// the runs' counts do not name the domain).
    pub val_tokens: Option<u64>,
    /// Validation tokens behind `baseline_loss`, the fewest over the baseline's seeds.
    pub baseline_val_tokens: Option<u64>,
    /// Validation loss of the baseline on this domain, mean over seeds.
    pub baseline_loss: Option<f64>,
    /// Validation bits per byte of the variant on this domain, mean over seeds.
    pub val_bpb: Option<f64>,
    /// Mean over seeds of the variant's bits per byte minus the baseline's at the same seed.
    pub delta_bpb: Option<f64>,
    /// Mean over seeds of `val_loss - baseline_loss` at the same seed (negative = better).
    pub delta_loss: Option<f64>,
    /// Bootstrap 95% interval of that mean over seeds (resampling seeds, fixed resampling seed).
    pub delta_interval: Option<Interval>,
    /// True when the interval holds 0; empty with fewer than two seeds or for the baseline.
    pub delta_within_noise: Option<bool>,
    /// Raw routing JSD (experts compared by index) against the baseline at the same seed: mean
    /// over layers, then over seeds.
    pub mean_jsd: Option<f64>,
    /// The same after matching the variant's experts to the baseline's.
    pub aligned_jsd: Option<f64>,
    /// Noise floor: the largest raw JSD between the baseline and itself with another seed.
    pub noise_jsd: Option<f64>,
    /// Noise floor of the aligned JSD.
    pub noise_aligned_jsd: Option<f64>,
    /// True when the JSD (aligned where matched, else raw) is at or below its noise floor.
    pub jsd_within_noise: Option<bool>,
}

/// One task metric of a variant, over seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreRow {
    /// Variant name.
    pub variant: String,
    /// Metric name (`task/metric`).
    pub metric: String,
    /// Seeds with this metric.
    pub seeds: usize,
    /// Mean over seeds.
    pub mean: f64,
    /// Sample standard deviation over seeds (`None` with one seed).
    pub std: Option<f64>,
    /// Mean of the paired difference to the baseline.
    pub delta: Option<f64>,
    /// Bootstrap 95% interval of that difference.
    pub delta_interval: Option<Interval>,
    /// True when the interval holds 0 (two or more seeds).
    pub delta_within_noise: Option<bool>,
}

/// A whole ablation's comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AblationComparison {
    /// Baseline variant.
    pub baseline: String,
    /// Seeds, in the order they were trained.
    pub seeds: Vec<u64>,
    /// Variant x domain rows, baseline first.
    pub rows: Vec<ComparisonRow>,
    /// Variant x task metric rows.
    pub scores: Vec<ScoreRow>,
    /// Per variant, the per-layer raw JSD against the baseline averaged over seeds.
    pub jsd: Comparison,
    /// Things left out and why.
    pub notes: Vec<String>,
}

/// Mean of the defined values.
fn mean(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.into_iter().flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Largest of the defined values.
fn largest(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    values.into_iter().flatten().reduce(f64::max)
}

/// Raw and aligned mean-over-layers JSD per domain name of `b` against `a`, plus the raw table.
struct PairJsd {
    raw: RunJsd,
    aligned: Option<RunJsd>,
}

impl PairJsd {
    fn of(a: &ReplicateRun, b: &ReplicateRun, notes: &mut Vec<String>) -> Result<Self> {
        let raw = run_jsd(&a.counts, &b.counts)?;
        let aligned = match (&a.trace, &b.trace) {
            (Some(ta), Some(tb)) => {
                let perm = match_experts(ta, tb)?;
                Some(run_jsd(&a.counts, &permute_experts(&b.counts, &perm)?)?)
            }
            _ => {
                notes.push(format!(
                    "{}@seed {} vs {}@seed {}: no validation trace, only the raw JSD",
                    b.variant, b.seed, a.variant, a.seed
                ));
                None
            }
        };
        Ok(PairJsd { raw, aligned })
    }

    fn raw_mean(&self, domain: &str) -> Option<f64> {
        domain_mean(&self.raw, domain)
    }

    fn aligned_mean(&self, domain: &str) -> Option<f64> {
        self.aligned.as_ref().and_then(|j| domain_mean(j, domain))
    }
}

/// The layer mean of one domain of a run JSD table.
fn domain_mean(j: &RunJsd, domain: &str) -> Option<f64> {
    j.domains
        .iter()
        .position(|d| d == domain)
        .and_then(|i| j.mean.get(i).copied().flatten())
}

/// Per-layer JSD averaged over several tables of the same model (domains matched by name).
fn average_jsd(tables: &[&RunJsd]) -> Option<RunJsd> {
    let first = tables.first()?;
    let per_layer: Vec<Vec<Option<f64>>> = (0..first.layers.len())
        .map(|l| {
            first
                .domains
                .iter()
                .map(|d| {
                    mean(tables.iter().map(|t| {
                        t.domains
                            .iter()
                            .position(|x| x == d)
                            .and_then(|i| t.per_layer.get(l).and_then(|row| row[i]))
                    }))
                })
                .collect()
        })
        .collect();
    let mean_per_domain = (0..first.domains.len())
        .map(|d| mean(per_layer.iter().map(|row| row[d])))
        .collect();
    let mut notes: Vec<String> = tables.iter().flat_map(|t| t.notes.clone()).collect();
    notes.dedup();
    Some(RunJsd {
        layers: first.layers.clone(),
        domains: first.domains.clone(),
        per_layer,
        mean: mean_per_domain,
        notes,
    })
}

/// The fewest validation tokens of domain `d` over `runs` that have a loss on it (every position
/// of the validation sequences is both scored and routed, so the routed count is the loss's).
fn fewest_tokens(runs: &[&ReplicateRun], d: &str) -> Option<u64> {
    runs.iter()
        .filter(|r| r.losses.contains_key(d))
        .filter_map(|r| {
            let i = r.counts.domain_index(d)?;
            u64::try_from(r.counts.tokens_of(i)).ok()
        })
        .min()
}

/// Delta statistics of paired differences: (mean, interval, within noise).
fn delta_stats(diffs: &[f64]) -> (Option<f64>, Option<Interval>, Option<bool>) {
    let mean = spread(diffs).map(|s| s.mean);
    let interval = bootstrap_mean_interval(diffs, INTERVAL_LEVEL);
    let within = (diffs.len() >= 2)
        .then(|| interval.map(|iv| iv.contains(0.0)))
        .flatten();
    (mean, interval, within)
}

/// Compares every variant of `runs` against `baseline` (see the module docs). Variants and seeds
/// keep their first-seen order; a variant and the baseline are paired by seed.
pub fn compare_replicates(baseline: &str, runs: &[ReplicateRun]) -> Result<AblationComparison> {
    let mut variants: Vec<&str> = vec![baseline];
    let mut seeds: Vec<u64> = Vec::new();
    for r in runs {
        if !variants.contains(&r.variant.as_str()) {
            variants.push(&r.variant);
        }
        if !seeds.contains(&r.seed) {
            seeds.push(r.seed);
        }
    }
    let base_runs: Vec<&ReplicateRun> = runs.iter().filter(|r| r.variant == baseline).collect();
    if base_runs.is_empty() {
        return Err(TraceError::Invalid(format!(
            "no run of the baseline {baseline} to compare against"
        )));
    }
    let mut notes = Vec::new();
    let mut domains: Vec<String> = Vec::new();
    for r in runs {
        for d in r.counts.domains.iter().chain(r.losses.keys()) {
            if !domains.contains(d) {
                domains.push(d.clone());
            }
        }
    }
    let noise_pairs = noise_floor_pairs(&base_runs, &mut notes)?;

    let mut rows = Vec::new();
    let mut scores = Vec::new();
    let mut jsd = Comparison {
        baseline: baseline.to_string(),
        variants: Vec::new(),
    };
    for v in &variants {
        let group = VariantRuns::of(v, baseline, runs, &seeds, &mut notes);
        if let Some(avg) = average_jsd(&group.jsd_pairs.iter().map(|p| &p.raw).collect::<Vec<_>>())
        {
            jsd.variants.push(VariantJsd {
                name: v.to_string(),
                jsd: avg,
            });
        }
        for d in &domains {
            rows.push(group.loss_row(d, &base_runs, &noise_pairs));
        }
        scores.extend(group.score_rows());
    }
    for v in &jsd.variants {
        notes.extend(v.jsd.notes.iter().cloned());
    }
    notes.dedup();
    Ok(AblationComparison {
        baseline: baseline.to_string(),
        seeds,
        rows,
        scores,
        jsd,
        notes,
    })
}

/// Noise floor: the baseline against itself with another seed, every pair.
fn noise_floor_pairs(base_runs: &[&ReplicateRun], notes: &mut Vec<String>) -> Result<Vec<PairJsd>> {
    let mut noise_pairs = Vec::new();
    for (i, a) in base_runs.iter().enumerate() {
        for b in &base_runs[i + 1..] {
            noise_pairs.push(PairJsd::of(a, b, notes)?);
        }
    }
    if noise_pairs.is_empty() {
        notes.push(
            "one seed of the baseline: no noise floor (add `seeds = [..]` with two or more to \
             the ablation file)"
                .into(),
        );
    }
    Ok(noise_pairs)
}

/// One variant's runs: its own, each paired with the baseline's at the same seed, and the
/// routing JSD of every pair.
struct VariantRuns<'a> {
    name: &'a str,
    is_base: bool,
    own: Vec<&'a ReplicateRun>,
    /// (variant, baseline) at each seed both have.
    pairs: Vec<(&'a ReplicateRun, &'a ReplicateRun)>,
    /// JSD of each pair (none for the baseline itself).
    jsd_pairs: Vec<PairJsd>,
}

impl<'a> VariantRuns<'a> {
    fn of(
        name: &'a str,
        baseline: &str,
        runs: &'a [ReplicateRun],
        seeds: &[u64],
        notes: &mut Vec<String>,
    ) -> Self {
        let is_base = name == baseline;
        let run_of = |v: &str, s: u64| runs.iter().find(|r| r.variant == v && r.seed == s);
        let pairs: Vec<(&ReplicateRun, &ReplicateRun)> = seeds
            .iter()
            .filter_map(|&s| Some((run_of(name, s)?, run_of(baseline, s)?)))
            .collect();
        let own: Vec<&ReplicateRun> = runs.iter().filter(|r| r.variant == name).collect();
        let mut jsd_pairs = Vec::new();
        if !is_base {
            for (run, base) in &pairs {
                match PairJsd::of(base, run, notes) {
                    Ok(p) => jsd_pairs.push(p),
                    Err(e) => notes.push(format!(
                        "routing of {}@seed {} not compared: {e}",
                        run.variant, run.seed
                    )),
                }
            }
        }
        VariantRuns {
            name,
            is_base,
            own,
            pairs,
            jsd_pairs,
        }
    }

    /// The variant's loss, delta and routing shift on domain `d`.
    fn loss_row(
        &self,
        d: &str,
        base_runs: &[&ReplicateRun],
        noise_pairs: &[PairJsd],
    ) -> ComparisonRow {
        let is_base = self.is_base;
        let losses: Vec<f64> = self
            .own
            .iter()
            .filter_map(|r| r.losses.get(d).copied())
            .collect();
        let base_losses: Vec<f64> = base_runs
            .iter()
            .filter_map(|r| r.losses.get(d).copied())
            .collect();
        let diffs: Vec<f64> = self
            .pairs
            .iter()
            .filter_map(|(r, b)| Some(r.losses.get(d)? - b.losses.get(d)?))
            .collect();
        let (delta_loss, delta_interval, delta_within_noise) = if is_base {
            (spread(&losses).map(|_| 0.0), None, None)
        } else {
            delta_stats(&diffs)
        };
        let noise_jsd = largest(noise_pairs.iter().map(|p| p.raw_mean(d)));
        let noise_aligned_jsd = largest(noise_pairs.iter().map(|p| p.aligned_mean(d)));
        let (mean_jsd, aligned_jsd) = if is_base {
            (Some(0.0), Some(0.0))
        } else {
            (
                mean(self.jsd_pairs.iter().map(|p| p.raw_mean(d))),
                mean(self.jsd_pairs.iter().map(|p| p.aligned_mean(d))),
            )
        };
        let jsd_within_noise = if is_base {
            None
        } else {
            match (aligned_jsd, noise_aligned_jsd) {
                (Some(j), Some(n)) => Some(j <= n),
                _ => mean_jsd.zip(noise_jsd).map(|(j, n)| j <= n),
            }
        };
        let bpb: Vec<f64> = self
            .own
            .iter()
            .filter_map(|r| r.bpb.get(d).copied())
            .collect();
        let bpb_diffs: Vec<f64> = self
            .pairs
            .iter()
            .filter_map(|(r, b)| Some(r.bpb.get(d)? - b.bpb.get(d)?))
            .collect();
        let s = spread(&losses);
        ComparisonRow {
            variant: self.name.to_string(),
            domain: d.to_string(),
            seeds: losses.len(),
            val_loss: s.map(|s| s.mean),
            val_loss_std: s.and_then(|s| s.std),
            val_tokens: fewest_tokens(&self.own, d),
            baseline_val_tokens: fewest_tokens(base_runs, d),
            baseline_loss: spread(&base_losses).map(|s| s.mean),
            val_bpb: spread(&bpb).map(|s| s.mean),
            delta_bpb: spread(&bpb_diffs).map(|s| s.mean),
            delta_loss,
            delta_interval,
            delta_within_noise,
            mean_jsd,
            aligned_jsd,
            noise_jsd,
            noise_aligned_jsd,
            jsd_within_noise,
        }
    }

    /// The variant's task metrics over seeds, with deltas against the baseline.
    fn score_rows(&self) -> Vec<ScoreRow> {
        let mut metrics: Vec<&String> = Vec::new();
        for r in &self.own {
            for m in r.scores.keys() {
                if !metrics.contains(&m) {
                    metrics.push(m);
                }
            }
        }
        let mut scores = Vec::new();
        for m in metrics {
            let values: Vec<f64> = self
                .own
                .iter()
                .filter_map(|r| r.scores.get(m).copied())
                .collect();
            let Some(s) = spread(&values) else { continue };
            let diffs: Vec<f64> = self
                .pairs
                .iter()
                .filter_map(|(r, b)| Some(r.scores.get(m)? - b.scores.get(m)?))
                .collect();
            let (delta, delta_interval, delta_within_noise) = if self.is_base {
                (Some(0.0), None, None)
            } else {
                delta_stats(&diffs)
            };
            scores.push(ScoreRow {
                variant: self.name.to_string(),
                metric: m.clone(),
                seeds: s.n,
                mean: s.mean,
                std: s.std,
                delta,
                delta_interval,
                delta_within_noise,
            });
        }
        scores
    }
}

/// `x.xxxx`, or `-` when undefined.
fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.4}"))
}

/// A spread cell: the value, or [`ONE_SEED`] when fewer than two seeds measured it.
fn spread_cell(v: Option<f64>, seeds: usize) -> String {
    if seeds < 2 {
        ONE_SEED.into()
    } else {
        cell(v)
    }
}

/// `[lo, hi]`, [`ONE_SEED`] with fewer than two seeds, or `-`.
fn interval_cell(iv: Option<Interval>, seeds: usize) -> String {
    if seeds < 2 {
        return ONE_SEED.into();
    }
    iv.map_or_else(
        || "-".into(),
        |iv| format!("[{:+.4}, {:+.4}]", iv.lo, iv.hi),
    )
}

/// `within noise` / `beyond noise`, [`ONE_SEED`] with fewer than two seeds, or `-`.
fn noise_cell(within: Option<bool>, seeds: usize) -> &'static str {
    match within {
        Some(true) => "within noise",
        Some(false) => "beyond noise",
        None if seeds < 2 => ONE_SEED,
        None => "-",
    }
}

/// A token count, with ` (< 16384)` when below [`MIN_RELIABLE_VAL_TOKENS`], or `-`.
fn tokens_cell(tokens: Option<u64>) -> String {
    match tokens {
        Some(n) if n < MIN_RELIABLE_VAL_TOKENS => format!("{n} (< {MIN_RELIABLE_VAL_TOKENS})"),
        Some(n) => n.to_string(),
        None => "-".into(),
    }
}

impl ComparisonRow {
    /// Whether the loss or the baseline's rests on fewer than [`MIN_RELIABLE_VAL_TOKENS`].
    pub fn few_val_tokens(&self) -> bool {
        [self.val_tokens, self.baseline_val_tokens]
            .iter()
            .flatten()
            .any(|&n| n < MIN_RELIABLE_VAL_TOKENS)
    }
}

impl AblationComparison {
    /// Seeds of the baseline (the noise floor needs two).
    fn baseline_seeds(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.variant == self.baseline)
            .map(|r| r.seeds)
            .max()
            .unwrap_or(0)
    }

    /// Domains whose loss somewhere rests on fewer than [`MIN_RELIABLE_VAL_TOKENS`].
    pub fn few_token_domains(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for r in self.rows.iter().filter(|r| r.few_val_tokens()) {
            if !out.contains(&r.domain.as_str()) {
                out.push(&r.domain);
            }
        }
        out
    }
}

/// The paragraph under the seeds line: what one seed cannot show, and which domains' losses
/// rest on few validation tokens.
fn caveats(cmp: &AblationComparison) -> String {
    let mut md = String::new();
    if cmp.seeds.len() < 2 {
        let _ = writeln!(
            md,
            "**One seed.** There is no standard deviation, no interval and no noise floor \
             (written {ONE_SEED}): nothing below can be called beyond noise. Train two or more \
             seeds (`seeds = [..]` in the ablation file) to tell a difference from seed noise.\n"
        );
    }
    let few = cmp.few_token_domains();
    if !few.is_empty() {
        let _ = writeln!(
            md,
            "**Few validation tokens.** {}: fewer than {MIN_RELIABLE_VAL_TOKENS} validation tokens \
             behind a loss (marked `(< {MIN_RELIABLE_VAL_TOKENS})`); a few documents decide it. \
             Raise `data.validation_tokens`, or give the domain more validation text.\n",
            few.join(", ")
        );
    }
    md
}

/// The comparison's markdown tables (losses, deltas, routing, task scores).
pub fn markdown_tables(cmp: &AblationComparison) -> String {
    let mut md = String::new();
    let seeds: Vec<String> = cmp.seeds.iter().map(u64::to_string).collect();
    let _ = writeln!(
        md,
        "Seeds: {} ({}). Baseline: {}.\n",
        seeds.join(", "),
        cmp.seeds.len(),
        cmp.baseline
    );
    md.push_str(&caveats(cmp));
    md.push_str(
        "### Validation loss per domain (mean ± standard deviation over seeds; val_bpb = bits per UTF-8 byte, which does not depend on the tokenizer)\n\n| variant | domain | seeds | val tokens | val_loss | std | val_bpb |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in &cmp.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.variant,
            r.domain,
            r.seeds,
            tokens_cell(r.val_tokens),
            cell(r.val_loss),
            spread_cell(r.val_loss_std, r.seeds),
            cell(r.val_bpb)
        );
    }
    md.push_str(
        "\n### Loss delta against the baseline (same seed; bootstrap 95% interval over seeds)\n\n| variant | domain | val tokens (variant / baseline) | delta_loss | 95% interval | noise | delta_bpb |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in cmp.rows.iter().filter(|r| r.variant != cmp.baseline) {
        let _ = writeln!(
            md,
            "| {} | {} | {} / {} | {} | {} | {} | {} |",
            r.variant,
            r.domain,
            tokens_cell(r.val_tokens),
            tokens_cell(r.baseline_val_tokens),
            r.delta_loss
                .map_or_else(|| "-".into(), |x| format!("{x:+.4}")),
            interval_cell(r.delta_interval, r.seeds),
            noise_cell(r.delta_within_noise, r.seeds),
            r.delta_bpb
                .map_or_else(|| "-".into(), |x| format!("{x:+.4}"))
        );
    }
    md.push_str(&jsd_table(cmp));
    if !cmp.scores.is_empty() {
        md.push_str(
            "\n### Task scores (mean ± std over seeds; delta against the baseline with its 95% interval)\n\n| variant | metric | seeds | mean | std | delta | 95% interval | noise |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for s in &cmp.scores {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.4} | {} | {} | {} | {} |",
                s.variant,
                s.metric,
                s.seeds,
                s.mean,
                spread_cell(s.std, s.seeds),
                s.delta.map_or_else(|| "-".into(), |x| format!("{x:+.4}")),
                interval_cell(s.delta_interval, s.seeds),
                noise_cell(s.delta_within_noise, s.seeds)
            );
        }
    }
    md
}

/// The routing table: raw and aligned JSD beside their noise floors.
fn jsd_table(cmp: &AblationComparison) -> String {
    let mut md = String::from(
        "\n### Routing JSD against the baseline, raw and aligned, beside the noise floor (baseline vs baseline with another seed)\n\n| variant | domain | raw JSD | aligned JSD | noise floor (raw) | noise floor (aligned) | noise |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let base_seeds = cmp.baseline_seeds();
    for r in cmp.rows.iter().filter(|r| r.variant != cmp.baseline) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.variant,
            r.domain,
            cell(r.mean_jsd),
            cell(r.aligned_jsd),
            spread_cell(r.noise_jsd, base_seeds),
            spread_cell(r.noise_aligned_jsd, base_seeds),
            noise_cell(r.jsd_within_noise, base_seeds)
        );
    }
    md
}

const EXPLANATION: &str = "\
`delta_loss` = variant validation loss - baseline loss on the domain at the same seed, averaged \
over seeds (negative = better); its interval is a percentile bootstrap over seeds (10,000 \
resamples, fixed resampling seed), and a delta whose interval holds 0 is marked *within noise*. \
`val tokens` = the validation tokens each loss is measured on (the fewest over seeds). \
`raw JSD` = Jensen-Shannon divergence (base 2) between the domain's expert distribution in the \
variant and in the baseline, experts compared by index, averaged over MoE layers and seeds. \
`aligned JSD` is the same after each layer's experts of the variant are matched to the \
baseline's by optimal assignment (Hungarian) on how many of the same validation tokens they \
both receive. The noise floor is the largest raw or aligned JSD between the baseline and the \
baseline trained with another seed; a raw or aligned JSD at or below its floor (aligned where \
available) is marked *within noise*.\n\n";

/// Writes `cmp` into `out`: `comparison.csv`/`.json`, `comparison.md` with the tables, heatmaps
/// of loss deltas and aligned JSD and per-variant JSD line plots; returns the files written.
pub fn write_comparison(out: &Path, cmp: &AblationComparison) -> Result<Vec<PathBuf>> {
    let mut w = Out::new(out)?;
    write_csv(&mut w, cmp)?;
    w.json("comparison.json", cmp)?;

    let mut md = format!("# Ablation comparison against {}\n\n", cmp.baseline);
    md.push_str(EXPLANATION);
    md.push_str(&markdown_tables(cmp));
    md.push('\n');
    write_heatmaps(&mut w, &mut md, cmp)?;
    for v in &cmp.jsd.variants {
        let png = jsd_lines(&mut w, &v.name, &cmp.baseline, &v.jsd, "comparison_")?;
        let _ = writeln!(md, "![]({png})\n");
    }
    if !cmp.notes.is_empty() {
        md.push_str("## Notes\n\n");
        for n in &cmp.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    w.text("comparison.md", &md)?;
    Ok(w.files)
}

/// `comparison.csv`: one line per variant and domain, every number at full precision; a spread,
/// interval or noise verdict that one seed cannot give reads [`ONE_SEED`].
fn write_csv(w: &mut Out, cmp: &AblationComparison) -> Result<()> {
    let base_seeds = cmp.baseline_seeds();
    let one_seed = |seeds: usize, v: String| if seeds < 2 { ONE_SEED.to_string() } else { v };
    let is_base = |r: &ComparisonRow| r.variant == cmp.baseline;
    let tokens = |n: Option<u64>| n.map_or_else(String::new, |n| n.to_string());
    let csv_rows: Vec<Vec<String>> = cmp
        .rows
        .iter()
        .map(|r| {
            // The baseline has no interval of its own: not applicable, rather than unmeasured.
            let delta_seeds = if is_base(r) { 2 } else { r.seeds };
            let jsd_seeds = if is_base(r) { 2 } else { base_seeds };
            vec![
                r.variant.clone(),
                r.domain.clone(),
                r.seeds.to_string(),
                num(r.val_loss),
                one_seed(r.seeds, num(r.val_loss_std)),
                tokens(r.val_tokens),
                tokens(r.baseline_val_tokens),
                r.few_val_tokens().to_string(),
                num(r.baseline_loss),
                num(r.delta_loss),
                one_seed(delta_seeds, num(r.delta_interval.map(|i| i.lo))),
                one_seed(delta_seeds, num(r.delta_interval.map(|i| i.hi))),
                one_seed(
                    delta_seeds,
                    r.delta_within_noise
                        .map_or_else(String::new, |b| b.to_string()),
                ),
                num(r.mean_jsd),
                num(r.aligned_jsd),
                one_seed(base_seeds, num(r.noise_jsd)),
                one_seed(base_seeds, num(r.noise_aligned_jsd)),
                one_seed(
                    jsd_seeds,
                    r.jsd_within_noise
                        .map_or_else(String::new, |b| b.to_string()),
                ),
                num(r.val_bpb),
                num(r.delta_bpb),
            ]
        })
        .collect();
    w.csv(
        "comparison.csv",
        &[
            "variant",
            "domain",
            "seeds",
            "val_loss",
            "val_loss_std",
            "val_tokens",
            "baseline_val_tokens",
            "few_val_tokens",
            "baseline_loss",
            "delta_loss",
            "delta_lo",
            "delta_hi",
            "delta_within_noise",
            "raw_jsd_vs_baseline",
            "aligned_jsd_vs_baseline",
            "noise_raw_jsd",
            "noise_aligned_jsd",
            "aligned_else_raw_jsd_within_noise",
            "val_bpb",
            "delta_bpb",
        ],
        &csv_rows,
    )
}

/// Heatmaps (variant x domain) of the loss delta, the raw JSD and, where experts were matched,
/// the aligned JSD, embedded in `md`.
fn write_heatmaps(w: &mut Out, md: &mut String, cmp: &AblationComparison) -> Result<()> {
    let mut variants: Vec<String> = Vec::new();
    let mut domains: Vec<String> = Vec::new();
    for r in &cmp.rows {
        if r.variant != cmp.baseline && !variants.contains(&r.variant) {
            variants.push(r.variant.clone());
        }
        if !domains.contains(&r.domain) {
            domains.push(r.domain.clone());
        }
    }
    if variants.is_empty() {
        return Ok(());
    }
    let grid = |f: &dyn Fn(&ComparisonRow) -> Option<f64>| -> Vec<Option<f64>> {
        variants
            .iter()
            .flat_map(|v| domains.iter().map(move |d| (v, d)))
            .map(|(v, d)| {
                cmp.rows
                    .iter()
                    .find(|r| r.variant == *v && r.domain == *d)
                    .and_then(f)
            })
            .collect()
    };
    let deltas = grid(&|r| r.delta_loss);
    let bound = deltas
        .iter()
        .flatten()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let seeds = if cmp.seeds.len() < 2 {
        "one seed: no interval".to_string()
    } else {
        format!("mean over {} seeds", cmp.seeds.len())
    };
    let title = format!("Validation loss delta vs {} ({seeds})", cmp.baseline);
    let png = w.heatmap(
        "comparison_loss_delta",
        &Heatmap {
            title: &title,
            x_label: "domain",
            y_label: "variant",
            rows: &variants,
            cols: &domains,
            values: &deltas,
            vmin: -bound,
            vmax: bound,
            diverging: true,
        },
    )?;
    let _ = writeln!(md, "![]({png})\n");
    type Pick<'a> = &'a dyn Fn(&ComparisonRow) -> Option<f64>;
    let kinds: [(&str, &str, &str, Pick<'_>); 2] = [
        ("raw", "Raw", "experts compared by index", &|r| r.mean_jsd),
        ("aligned", "Aligned", "experts matched", &|r| r.aligned_jsd),
    ];
    for (kind, label, how, pick) in kinds {
        let values = grid(pick);
        if values.iter().all(Option::is_none) {
            continue;
        }
        let vmax = values
            .iter()
            .flatten()
            .copied()
            .fold(0.0, f64::max)
            .max(f64::MIN_POSITIVE);
        let title = format!("{label} routing JSD vs {} ({how})", cmp.baseline);
        let png = w.heatmap(
            &format!("comparison_{kind}_jsd"),
            &Heatmap {
                title: &title,
                x_label: "domain",
                y_label: "variant",
                rows: &variants,
                cols: &domains,
                values: &values,
                vmin: 0.0,
                vmax,
                diverging: false,
            },
        )?;
        let _ = writeln!(md, "![]({png})\n");
    }
    Ok(())
}

/// The terminal table: one line per domain with its validation tokens (the fewest behind any
/// loss on the line, `!` when below [`MIN_RELIABLE_VAL_TOKENS`]), one column per variant with its
/// validation loss (mean over seeds), and for the other variants the delta against the baseline
/// (the first variant in `rows`) with its 95% interval when there are several seeds, and the raw
/// and the aligned routing JSD; `~` marks a delta or JSD inside the noise. The noise floors come
/// last, or [`ONE_SEED`]. Lines under the table explain the marks in use.
pub fn terminal_table(rows: &[ComparisonRow]) -> String {
    let (variants, domains) = variants_and_domains(rows);
    let one_seed = rows.iter().all(|r| r.seeds < 2);
    let has_aligned = rows.iter().any(|r| r.aligned_jsd.is_some());
    let mut cells: Vec<Vec<String>> = vec![terminal_header(&variants, has_aligned)];
    for d in &domains {
        let of_domain: Vec<&ComparisonRow> = rows.iter().filter(|r| r.domain == *d).collect();
        cells.push(terminal_line(
            d,
            &variants,
            &of_domain,
            one_seed,
            has_aligned,
        ));
    }
    let mut out = columns(&cells);
    if !one_seed {
        out +=
            "~ = inside the noise (delta interval holds 0, or JSD at or below the noise floor)\n";
    } else {
        let _ = writeln!(
            out,
            "one seed: no std, no interval and no noise floor ({ONE_SEED}); nothing here can be \
             called beyond noise"
        );
    }
    if rows.iter().any(ComparisonRow::few_val_tokens) {
        let _ = writeln!(
            out,
            "! fewer than {MIN_RELIABLE_VAL_TOKENS} validation tokens behind a loss: a few \
             documents decide it"
        );
    }
    out
}

/// Bits per byte per domain (rows) and variant (columns; mean over seeds), the other variants
/// with their delta against the baseline at the same seed: the losses of [`terminal_table`] in a
/// unit that does not depend on the tokenizer. Empty when no run recorded its bytes.
pub fn terminal_bpb_table(rows: &[ComparisonRow]) -> String {
    if rows.iter().all(|r| r.val_bpb.is_none()) {
        return String::new();
    }
    let (variants, domains) = variants_and_domains(rows);
    let mut header = vec!["domain (bits per byte)".to_string()];
    header.extend(variants.iter().map(|v| v.to_string()));
    let mut cells = vec![header];
    for d in &domains {
        let mut line = vec![d.to_string()];
        for (i, v) in variants.iter().enumerate() {
            let row = rows.iter().find(|r| r.domain == *d && r.variant == *v);
            let mut cell = row
                .and_then(|r| r.val_bpb)
                .map_or_else(|| "-".to_string(), |x| format!("{x:.4}"));
            if let (true, Some(delta)) = (i > 0, row.and_then(|r| r.delta_bpb)) {
                cell += &format!(" ({delta:+.4})");
            }
            line.push(cell);
        }
        cells.push(line);
    }
    columns(&cells)
}

/// The variants and the domains of `rows`, each in order of first appearance.
fn variants_and_domains(rows: &[ComparisonRow]) -> (Vec<&str>, Vec<&str>) {
    let mut variants: Vec<&str> = Vec::new();
    let mut domains: Vec<&str> = Vec::new();
    for r in rows {
        if !variants.contains(&r.variant.as_str()) {
            variants.push(&r.variant);
        }
        if !domains.contains(&r.domain.as_str()) {
            domains.push(&r.domain);
        }
    }
    (variants, domains)
}

/// `cells` as text columns: the first left-aligned, the others right-aligned, two spaces apart.
fn columns(cells: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..cells.first().map_or(0, Vec::len))
        .map(|c| {
            cells
                .iter()
                .map(|l| l.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in cells {
        let padded: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (s, w))| {
                if c == 0 {
                    format!("{s:<w$}")
                } else {
                    format!("{s:>w$}")
                }
            })
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The terminal table's header line.
fn terminal_header(variants: &[&str], has_aligned: bool) -> Vec<String> {
    let mut header = vec!["domain".to_string(), "val tokens".to_string()];
    for (i, v) in variants.iter().enumerate() {
        header.push(format!("{v} loss"));
        if i > 0 {
            header.extend(["delta".into(), "raw jsd".into()]);
            if has_aligned {
                header.push("aligned jsd".into());
            }
        }
    }
    header.push("raw jsd noise".into());
    if has_aligned {
        header.push("aligned jsd noise".into());
    }
    header
}

/// One domain's line of the terminal table (`rows`: that domain's rows).
fn terminal_line(
    domain: &str,
    variants: &[&str],
    rows: &[&ComparisonRow],
    one_seed: bool,
    has_aligned: bool,
) -> Vec<String> {
    let num = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.4}"));
    let mark = |within: Option<bool>| if within == Some(true) { "~" } else { "" };
    let tokens: Vec<u64> = rows
        .iter()
        .flat_map(|r| [r.val_tokens, r.baseline_val_tokens])
        .flatten()
        .collect();
    let mut line = vec![domain.to_string(), tokens_range(&tokens)];
    let (mut noise, mut noise_aligned) = (None, None);
    for (i, v) in variants.iter().enumerate() {
        let row = rows.iter().find(|r| r.variant == *v);
        line.push(num(row.and_then(|r| r.val_loss)));
        if i == 0 {
            continue;
        }
        let Some(r) = row else {
            line.extend(["-".into(), "-".into()]);
            if has_aligned {
                line.push("-".into());
            }
            continue;
        };
        let mut delta = r
            .delta_loss
            .map_or_else(|| "-".to_string(), |x| format!("{x:+.4}"));
        if let (Some(iv), true) = (r.delta_interval, r.seeds > 1) {
            delta += &format!(" [{:+.3},{:+.3}]", iv.lo, iv.hi);
        }
        delta += mark(r.delta_within_noise);
        line.push(delta);
        // The noise verdict is on the aligned JSD where experts were matched, else the raw one.
        let verdict_on_aligned = r.aligned_jsd.is_some() && r.noise_aligned_jsd.is_some();
        line.push(
            num(r.mean_jsd)
                + if verdict_on_aligned {
                    ""
                } else {
                    mark(r.jsd_within_noise)
                },
        );
        if has_aligned {
            line.push(
                num(r.aligned_jsd)
                    + if verdict_on_aligned {
                        mark(r.jsd_within_noise)
                    } else {
                        ""
                    },
            );
        }
        noise = noise.or(r.noise_jsd);
        noise_aligned = noise_aligned.or(r.noise_aligned_jsd);
    }
    let floor = |v: Option<f64>| {
        if one_seed {
            ONE_SEED.to_string()
        } else {
            num(v)
        }
    };
    line.push(floor(noise));
    if has_aligned {
        line.push(floor(noise_aligned));
    }
    line
}

/// `n`, or `min-max` when the counts differ, with `!` when the fewest is below
/// [`MIN_RELIABLE_VAL_TOKENS`]; `-` when none is known.
fn tokens_range(tokens: &[u64]) -> String {
    let (Some(&lo), Some(&hi)) = (tokens.iter().min(), tokens.iter().max()) else {
        return "-".into();
    };
    let mut s = if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    };
    if lo < MIN_RELIABLE_VAL_TOKENS {
        s.push('!');
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::analysis::jensen_shannon;
    use crate::test_util::tmp_dir;

    /// Two domains, one layer, four experts; `web` routes by `web_row`, `math` uniformly.
    fn counts(web_row: [i64; 4]) -> RouterLog {
        let mut c = RouterLog::new(vec![0], vec!["web".into(), "math".into()], 4, 1);
        c.tokens = vec![web_row.iter().sum(), 8];
        c.counts = [web_row, [2, 2, 2, 2]].concat();
        c.gate_sums = vec![1.0; 8];
        c
    }

    fn run(variant: &str, seed: u64, web: f64, web_row: [i64; 4]) -> ReplicateRun {
        ReplicateRun {
            variant: variant.into(),
            seed,
            losses: BTreeMap::from([("web".into(), web), ("math".into(), 2.0)]),
            bpb: BTreeMap::from([("web".into(), web / 2.0)]),
            scores: BTreeMap::from([("arith/accuracy".into(), web / 10.0)]),
            counts: counts(web_row),
            trace: None,
        }
    }

    #[test]
    fn replicates_give_spread_intervals_and_a_noise_floor() {
        let runs = vec![
            run("base", 1, 3.0, [4, 2, 1, 1]),
            run("base", 2, 3.2, [4, 1, 2, 1]),
            run("no_code", 1, 2.5, [1, 1, 1, 5]),
            run("no_code", 2, 2.9, [1, 1, 5, 1]),
        ];
        let cmp = compare_replicates("base", &runs).unwrap();
        assert_eq!(cmp.seeds, vec![1, 2]);
        let row = |v: &str, d: &str| {
            cmp.rows
                .iter()
                .find(|r| r.variant == v && r.domain == d)
                .unwrap()
        };
        let web = row("no_code", "web");
        assert_eq!(web.seeds, 2);
        assert!((web.val_loss.unwrap() - 2.7).abs() < 1e-12);
        // std of (2.5, 2.9) = 0.4 / sqrt(2).
        assert!((web.val_loss_std.unwrap() - 0.4 / 2f64.sqrt()).abs() < 1e-12);
        // Paired deltas -0.5 and -0.3: mean -0.4; two values bootstrap to [min, max].
        assert!((web.delta_loss.unwrap() + 0.4).abs() < 1e-12);
        let iv = web.delta_interval.unwrap();
        assert!(
            (iv.lo + 0.5).abs() < 1e-12 && (iv.hi + 0.3).abs() < 1e-12,
            "{iv:?}"
        );
        assert_eq!(web.delta_within_noise, Some(false));
        // Math: deltas 0 and 0 -> within noise.
        assert_eq!(row("no_code", "math").delta_within_noise, Some(true));
        // Noise floor of web: baseline seed 1 vs seed 2.
        let p = [0.5, 0.25, 0.125, 0.125];
        let q = [0.5, 0.125, 0.25, 0.125];
        let floor = jensen_shannon(&p, &q).unwrap();
        assert!((web.noise_jsd.unwrap() - floor).abs() < 1e-12);
        let jsd1 = jensen_shannon(&p, &[0.125, 0.125, 0.125, 0.625]).unwrap();
        let jsd2 = jensen_shannon(&q, &[0.125, 0.125, 0.625, 0.125]).unwrap();
        assert!((web.mean_jsd.unwrap() - (jsd1 + jsd2) / 2.0).abs() < 1e-12);
        assert_eq!(web.jsd_within_noise, Some(false));
        // Math routes identically everywhere: JSD 0, inside a noise floor of 0.
        assert_eq!(row("no_code", "math").jsd_within_noise, Some(true));
        // No traces: no aligned JSD, and a note says so.
        assert_eq!(web.aligned_jsd, None);
        assert!(cmp.notes.iter().any(|n| n.contains("no validation trace")));
        let base = row("base", "web");
        assert_eq!((base.delta_loss, base.mean_jsd), (Some(0.0), Some(0.0)));
        let score = cmp.scores.iter().find(|s| s.variant == "no_code").unwrap();
        assert!((score.delta.unwrap() + 0.04).abs() < 1e-12);
        // Bits per byte (web / 2 here): mean (1.25 + 1.45) / 2, paired deltas -0.25 and -0.15.
        assert!((web.val_bpb.unwrap() - 1.35).abs() < 1e-12);
        assert!((web.delta_bpb.unwrap() + 0.2).abs() < 1e-12);
        assert_eq!(
            row("no_code", "math").val_bpb,
            None,
            "not measured: no value"
        );

        let dir = tmp_dir("compare-replicates");
        let files = write_comparison(&dir, &cmp).unwrap();
        let md = std::fs::read_to_string(dir.join("comparison.md")).unwrap();
        assert!(
            md.contains(
                "| no_code | web | 8 (< 16384) / 8 (< 16384) | -0.4000 | [-0.5000, -0.3000] | beyond noise | -0.2000 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("noise floor (raw)")
                && md.contains("Task scores")
                && md.contains("| no_code | web | 2 | 8 (< 16384) | 2.7000 | 0.2828 | 1.3500 |"),
            "{md}"
        );
        assert!(files
            .iter()
            .any(|f| f.ends_with("comparison_loss_delta.png")));
        let csv = std::fs::read_to_string(dir.join("comparison.csv")).unwrap();
        assert!(csv.lines().next().unwrap().contains("delta_lo,delta_hi"));
        assert_jsd_labelled(&dir, &files);
        // Two seeds: spreads and intervals are numbers, and no cell says one seed.
        assert!(
            !md.contains(ONE_SEED) && !csv.contains(ONE_SEED),
            "{md}\n{csv}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every JSD in comparison.md (per table cell or sentence), in the CSV headers and in the
    /// plot titles (the SVGs' text) says whether it is raw or aligned.
    fn assert_jsd_labelled(dir: &Path, files: &[PathBuf]) {
        let labelled = |s: &str| {
            let s = s.to_lowercase();
            !s.contains("jsd") || s.contains("raw") || s.contains("aligned")
        };
        let md = std::fs::read_to_string(dir.join("comparison.md")).unwrap();
        let mut jsd_mentions = 0;
        // Image links name files, not values.
        let text = md.lines().filter(|l| !l.starts_with("![]("));
        for part in text.flat_map(|l| l.split(['|', '.'])) {
            jsd_mentions += usize::from(part.contains("JSD"));
            assert!(labelled(part), "unlabelled JSD in comparison.md: {part}");
        }
        assert!(jsd_mentions >= 5, "{md}");
        let csv = std::fs::read_to_string(dir.join("comparison.csv")).unwrap();
        let header = csv.lines().next().unwrap();
        for column in header.split(',') {
            assert!(labelled(column), "unlabelled CSV column {column}");
        }
        let mut titles = 0;
        for svg in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "svg"))
        {
            let text = std::fs::read_to_string(svg).unwrap();
            for t in text.split("<text").skip(1) {
                let content = t
                    .split('>')
                    .nth(1)
                    .unwrap_or("")
                    .split('<')
                    .next()
                    .unwrap_or("");
                titles += usize::from(content.contains("JSD"));
                assert!(labelled(content), "{}: unlabelled {content}", svg.display());
            }
        }
        assert!(titles >= 2, "no JSD plot title found");
    }

    #[test]
    fn one_seed_writes_no_spread_or_interval_and_shows_the_tokens() {
        let runs = vec![
            run("base", 7, 3.0, [4, 2, 1, 1]),
            run("v", 7, 2.0, [1, 1, 1, 5]),
        ];
        let cmp = compare_replicates("base", &runs).unwrap();
        for r in &cmp.rows {
            assert_eq!((r.val_loss_std, r.delta_interval), (None, None), "{r:?}");
            // counts(): 8 tokens of each domain, far below the threshold.
            assert_eq!((r.val_tokens, r.baseline_val_tokens), (Some(8), Some(8)));
            assert!(r.few_val_tokens());
        }
        assert!(cmp
            .scores
            .iter()
            .all(|s| s.std.is_none() && s.delta_interval.is_none()));
        let dir = tmp_dir("compare-one-seed");
        let files = write_comparison(&dir, &cmp).unwrap();
        let md = std::fs::read_to_string(dir.join("comparison.md")).unwrap();
        assert!(
            md.contains("nothing below can be called beyond noise"),
            "{md}"
        );
        // No number in a std, interval or noise-floor column, and no interval anywhere.
        assert!(!md.contains("[+") && !md.contains("[-"), "{md}");
        for line in md
            .lines()
            .filter(|l| l.starts_with("| base |") || l.starts_with("| v |"))
        {
            assert!(line.contains(ONE_SEED), "{line}");
        }
        assert!(
            md.contains("| v | web | 1 | 8 (< 16384) | 2.0000 | n/a (one seed) |"),
            "{md}"
        );
        assert!(md.contains("| v | web | 8 (< 16384) / 8 (< 16384) | -1.0000 | n/a (one seed) | n/a (one seed) |"), "{md}");
        assert!(md.contains("**Few validation tokens.** web, math"), "{md}");
        let csv = std::fs::read_to_string(dir.join("comparison.csv")).unwrap();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        for line in csv.lines().skip(1) {
            let cells: Vec<&str> = line.split(',').collect();
            for name in ["val_loss_std", "noise_raw_jsd", "noise_aligned_jsd"] {
                assert_eq!(cells[col(name)], ONE_SEED, "{name}: {line}");
            }
            assert_eq!(cells[col("val_tokens")], "8", "{line}");
            if cells[0] == "v" {
                assert_eq!(cells[col("delta_lo")], ONE_SEED, "{line}");
            }
        }
        assert_jsd_labelled(&dir, &files);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("comparison.json")).unwrap())
                .unwrap();
        assert!(json["rows"][0]["val_loss_std"].is_null(), "{json}");
        let table = terminal_table(&cmp.rows);
        assert!(
            table.contains("raw jsd") && table.contains("raw jsd noise"),
            "{table}"
        );
        assert!(
            table.contains("n/a (one seed)") && table.contains("8!"),
            "{table}"
        );
        assert!(
            table.contains("nothing here can be called beyond noise"),
            "{table}"
        );
        assert!(!table.contains('['), "no interval with one seed: {table}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn terminal_table_lists_every_variant_with_tokens_and_both_jsds() {
        let row = |variant: &str, domain: &str, loss: f64, delta: f64, jsd: f64| ComparisonRow {
            variant: variant.into(),
            domain: domain.into(),
            seeds: 2,
            val_loss: Some(loss),
            val_loss_std: Some(0.1),
            val_tokens: Some(20_000),
            baseline_val_tokens: Some(20_000),
            baseline_loss: Some(loss - delta),
            val_bpb: Some(loss / 2.0),
            delta_bpb: Some(delta / 2.0),
            delta_loss: Some(delta),
            delta_interval: Some(Interval {
                lo: delta - 0.1,
                hi: delta + 0.1,
            }),
            delta_within_noise: Some(false),
            mean_jsd: Some(jsd),
            aligned_jsd: Some(jsd / 2.0),
            noise_jsd: Some(0.05),
            noise_aligned_jsd: Some(0.01),
            jsd_within_noise: Some(false),
        };
        let mut code = row("no_code", "code", 2.5, 0.5, 0.2);
        code.val_tokens = Some(249);
        let rows = [
            row("base", "web", 3.0, 0.0, 0.0),
            row("base", "code", 2.0, 0.0, 0.0),
            row("no_code", "web", 2.9, -0.1, 0.01),
            code,
        ];
        let text = terminal_table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "header, two domains, two legends: {text}");
        for needle in [
            "base loss",
            "no_code loss",
            "val tokens",
            "raw jsd",
            "aligned jsd",
            "aligned jsd noise",
        ] {
            assert!(lines[0].contains(needle), "{needle}: {text}");
        }
        assert!(
            lines[1].starts_with("web") && lines[1].contains("20000"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("code")
                && lines[2].contains("249-20000!")
                && lines[2].contains("+0.5000 [+0.400,+0.600]"),
            "{text}"
        );
        assert!(lines[4].starts_with("! fewer than 16384"), "{text}");
        // The same losses in bits per byte, the variant's with its delta.
        let bpb = terminal_bpb_table(&rows);
        let bpb_lines: Vec<&str> = bpb.lines().collect();
        assert_eq!(bpb_lines.len(), 3, "{bpb}");
        assert!(
            bpb_lines[0].starts_with("domain (bits per byte)") && bpb_lines[0].ends_with("no_code")
        );
        assert!(
            bpb_lines[2].starts_with("code") && bpb_lines[2].ends_with("1.2500 (+0.2500)"),
            "{bpb}"
        );
        let mut no_bytes = rows.to_vec();
        no_bytes.iter_mut().for_each(|r| r.val_bpb = None);
        assert_eq!(terminal_bpb_table(&no_bytes), "");
    }

    #[test]
    fn one_seed_has_no_noise_floor_and_no_marks() {
        let runs = vec![
            run("base", 7, 3.0, [4, 2, 1, 1]),
            run("v", 7, 2.0, [1, 1, 1, 5]),
        ];
        let cmp = compare_replicates("base", &runs).unwrap();
        let web = cmp
            .rows
            .iter()
            .find(|r| r.variant == "v" && r.domain == "web")
            .unwrap();
        assert_eq!(web.delta_loss, Some(-1.0));
        assert_eq!((web.noise_jsd, web.delta_within_noise), (None, None));
        assert_eq!(web.delta_interval, None, "one seed has no interval");
        assert!(cmp.notes.iter().any(|n| n.contains("no noise floor")));
        assert!(compare_replicates("missing", &runs).is_err());
    }
}
