//! Ablation comparisons over seed replicates: per variant and domain the validation loss (mean
//! and spread over seeds), the delta against the baseline with a bootstrap 95% interval over
//! seeds, and the routing JSD against the baseline, raw and after matching experts
//! ([`crate::align`]), beside the noise floor: the JSD between the baseline and itself trained
//! with another seed. A delta whose interval holds 0, or a JSD at or below the noise floor, is
//! marked as inside the noise.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::align::{match_experts, permute_experts};
use crate::analysis::{run_jsd, RunJsd};
use crate::error::{Result, TraceError};
use crate::plot::Heatmap;
use crate::report::{jsd_lines, num, Comparison, Out, VariantJsd};
use crate::router_log::RouterCounts;
use crate::stats::{bootstrap_mean_interval, spread, Interval};
use crate::trace::Trace;

/// Confidence level of the delta intervals.
pub const INTERVAL_LEVEL: f64 = 0.95;

/// One trained run of an ablation: a variant at one seed, with its final evaluation.
#[derive(Debug, Clone)]
pub struct ReplicateRun {
    /// Variant name.
    pub variant: String,
    /// Its seed (`run.seed`).
    pub seed: u64,
    /// Validation loss per domain.
    pub losses: BTreeMap<String, f64>,
    /// Task scores, metric name (`task/metric`) -> value.
    pub scores: BTreeMap<String, f64>,
    /// Router counts on the validation tokens.
    pub counts: RouterCounts,
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
    /// Sample standard deviation of that loss over seeds (0 with one seed).
    pub val_loss_std: Option<f64>,
    /// Validation loss of the baseline on this domain, mean over seeds.
    pub baseline_loss: Option<f64>,
    /// Mean over seeds of `val_loss - baseline_loss` at the same seed (negative = better).
    pub delta_loss: Option<f64>,
    /// Bootstrap 95% interval of that mean over seeds (resampling seeds, fixed resampling seed).
    pub delta_interval: Option<Interval>,
    /// True when the interval holds 0; empty with fewer than two seeds or for the baseline.
    pub delta_within_noise: Option<bool>,
    /// Routing JSD against the baseline at the same seed: mean over layers, then over seeds.
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
    /// Sample standard deviation over seeds.
    pub std: f64,
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
        let s = spread(&losses);
        ComparisonRow {
            variant: self.name.to_string(),
            domain: d.to_string(),
            seeds: losses.len(),
            val_loss: s.map(|s| s.mean),
            val_loss_std: s.map(|s| s.std),
            baseline_loss: spread(&base_losses).map(|s| s.mean),
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

/// `[lo, hi]`, or `-`.
fn interval_cell(iv: Option<Interval>) -> String {
    iv.map_or_else(
        || "-".into(),
        |iv| format!("[{:+.4}, {:+.4}]", iv.lo, iv.hi),
    )
}

/// `noise` / `shift` / `-` for a within-noise mark.
fn noise_cell(within: Option<bool>) -> &'static str {
    match within {
        Some(true) => "within noise",
        Some(false) => "beyond noise",
        None => "-",
    }
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
    md.push_str(
        "### Validation loss per domain (mean ± standard deviation over seeds)\n\n| variant | domain | seeds | val_loss | std |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in &cmp.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            r.variant,
            r.domain,
            r.seeds,
            cell(r.val_loss),
            cell(r.val_loss_std)
        );
    }
    md.push_str(
        "\n### Loss delta against the baseline (same seed; bootstrap 95% interval over seeds)\n\n| variant | domain | delta_loss | 95% interval | noise |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in cmp.rows.iter().filter(|r| r.variant != cmp.baseline) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            r.variant,
            r.domain,
            r.delta_loss
                .map_or_else(|| "-".into(), |x| format!("{x:+.4}")),
            interval_cell(r.delta_interval),
            noise_cell(r.delta_within_noise)
        );
    }
    md.push_str(
        "\n### Routing JSD against the baseline, beside the noise floor (baseline vs baseline with another seed)\n\n| variant | domain | raw JSD | aligned JSD | noise floor (raw) | noise floor (aligned) | noise |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in cmp.rows.iter().filter(|r| r.variant != cmp.baseline) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.variant,
            r.domain,
            cell(r.mean_jsd),
            cell(r.aligned_jsd),
            cell(r.noise_jsd),
            cell(r.noise_aligned_jsd),
            noise_cell(r.jsd_within_noise)
        );
    }
    if !cmp.scores.is_empty() {
        md.push_str(
            "\n### Task scores (mean ± std over seeds; delta against the baseline with its 95% interval)\n\n| variant | metric | seeds | mean | std | delta | 95% interval | noise |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for s in &cmp.scores {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.4} | {:.4} | {} | {} | {} |",
                s.variant,
                s.metric,
                s.seeds,
                s.mean,
                s.std,
                s.delta.map_or_else(|| "-".into(), |x| format!("{x:+.4}")),
                interval_cell(s.delta_interval),
                noise_cell(s.delta_within_noise)
            );
        }
    }
    md
}

const EXPLANATION: &str = "\
`delta_loss` = variant validation loss - baseline loss on the domain at the same seed, averaged \
over seeds (negative = better); its interval is a percentile bootstrap over seeds (10,000 \
resamples, fixed resampling seed), and a delta whose interval holds 0 is marked *within noise*. \
`raw JSD` = Jensen-Shannon divergence (base 2) between the domain's expert distribution in the \
variant and in the baseline, averaged over MoE layers and seeds. `aligned JSD` is the same after \
each layer's experts of the variant are matched to the baseline's by optimal assignment \
(Hungarian) on how many of the same validation tokens they both receive. The noise floor is the \
largest JSD between the baseline and the baseline trained with another seed; a JSD at or below \
it (aligned where available) is marked *within noise*.\n\n";

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

/// `comparison.csv`: one line per variant and domain, every number at full precision.
fn write_csv(w: &mut Out, cmp: &AblationComparison) -> Result<()> {
    let csv_rows: Vec<Vec<String>> = cmp
        .rows
        .iter()
        .map(|r| {
            vec![
                r.variant.clone(),
                r.domain.clone(),
                r.seeds.to_string(),
                num(r.val_loss),
                num(r.val_loss_std),
                num(r.baseline_loss),
                num(r.delta_loss),
                num(r.delta_interval.map(|i| i.lo)),
                num(r.delta_interval.map(|i| i.hi)),
                r.delta_within_noise
                    .map_or_else(String::new, |b| b.to_string()),
                num(r.mean_jsd),
                num(r.aligned_jsd),
                num(r.noise_jsd),
                num(r.noise_aligned_jsd),
                r.jsd_within_noise
                    .map_or_else(String::new, |b| b.to_string()),
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
            "baseline_loss",
            "delta_loss",
            "delta_lo",
            "delta_hi",
            "delta_within_noise",
            "mean_jsd_vs_baseline",
            "aligned_jsd_vs_baseline",
            "noise_jsd",
            "noise_aligned_jsd",
            "jsd_within_noise",
        ],
        &csv_rows,
    )
}

/// Heatmaps (variant x domain) of the loss delta and of the routing JSD, embedded in `md`.
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
    let title = format!(
        "Validation loss delta vs {} (mean over seeds)",
        cmp.baseline
    );
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
    let aligned = grid(&|r| r.aligned_jsd.or(r.mean_jsd));
    let vmax = aligned
        .iter()
        .flatten()
        .copied()
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let title = format!("Routing JSD vs {} (aligned where matched)", cmp.baseline);
    let png = w.heatmap(
        "comparison_mean_jsd",
        &Heatmap {
            title: &title,
            x_label: "domain",
            y_label: "variant",
            rows: &variants,
            cols: &domains,
            values: &aligned,
            vmin: 0.0,
            vmax,
            diverging: false,
        },
    )?;
    let _ = writeln!(md, "![]({png})\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::analysis::jensen_shannon;
    use crate::test_util::tmp_dir;

    /// Two domains, one layer, four experts; `web` routes by `web_row`, `math` uniformly.
    fn counts(web_row: [i64; 4]) -> RouterCounts {
        let mut c = RouterCounts::new(vec![0], vec!["web".into(), "math".into()], 4, 1);
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

        let dir = tmp_dir("compare-replicates");
        let files = write_comparison(&dir, &cmp).unwrap();
        let md = std::fs::read_to_string(dir.join("comparison.md")).unwrap();
        assert!(
            md.contains("| no_code | web | -0.4000 | [-0.5000, -0.3000] | beyond noise |"),
            "{md}"
        );
        assert!(
            md.contains("noise floor (raw)") && md.contains("Task scores"),
            "{md}"
        );
        assert!(files
            .iter()
            .any(|f| f.ends_with("comparison_loss_delta.png")));
        let csv = std::fs::read_to_string(dir.join("comparison.csv")).unwrap();
        assert!(csv.lines().next().unwrap().contains("delta_lo,delta_hi"));
        std::fs::remove_dir_all(&dir).unwrap();
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
        assert!(cmp.notes.iter().any(|n| n.contains("no noise floor")));
        assert!(compare_replicates("missing", &runs).is_err());
    }
}
