//! One domain's routing in a variant against a baseline (same-domain raw JSD per layer: experts
//! compared by index): the comparison itself, its tables and line plots (also drawn by the
//! ablation comparison, which adds the aligned JSD). Only inputs routing the same kind of tokens
//! are compared: a trace's validation tokens at one checkpoint against training tokens summed
//! over a run would read the difference in tokens and in time as a routing shift.

use std::fmt::Write as _;

use serde::Serialize;

use crate::analysis::{self, RunJsd};
use crate::error::{Result, TraceError};
use crate::plot::Lines;

use super::input::AnalysisInput;
use super::writer::{layer_points, num, slug, Out};

/// Run-JSD tables and plots for the report (`analyze`).
pub(super) fn write_run_jsd(w: &mut Out, md: &mut String, cmp: &Comparison) -> Result<()> {
    let mut rows = Vec::new();
    let _ = writeln!(
        md,
        "### Routing shift against {}\n\nRaw JSD (experts compared by index) of each domain's \
         expert distribution in a variant and in the baseline.\n",
        cmp.baseline
    );
    for v in &cmp.variants {
        for (l, row) in v.jsd.per_layer.iter().enumerate() {
            for (d, val) in row.iter().enumerate() {
                rows.push(vec![
                    v.name.clone(),
                    v.jsd.layers.get(l).copied().unwrap_or(l).to_string(),
                    v.jsd.domains[d].clone(),
                    num(*val),
                ]);
            }
        }
        for (d, val) in v.jsd.mean.iter().enumerate() {
            rows.push(vec![
                v.name.clone(),
                "mean".to_string(),
                v.jsd.domains[d].clone(),
                num(*val),
            ]);
        }
        let png = jsd_lines(w, &v.name, &cmp.baseline, &v.jsd, "")?;
        let _ = writeln!(md, "![]({png})\n");
    }
    w.csv(
        "run_jsd.csv",
        &["variant", "layer", "domain", "raw_jsd_vs_baseline"],
        &rows,
    )
}

/// Line plot of one variant's per-domain raw JSD over layers.
pub(crate) fn jsd_lines(
    w: &mut Out,
    variant: &str,
    baseline: &str,
    jsd: &RunJsd,
    prefix: &str,
) -> Result<String> {
    let series: Vec<(String, Vec<(f64, f64)>)> = jsd
        .domains
        .iter()
        .enumerate()
        .map(|(d, name)| {
            let vals: Vec<Option<f64>> = jsd.per_layer.iter().map(|row| row[d]).collect();
            (name.clone(), layer_points(&jsd.layers, &vals))
        })
        .collect();
    let title = format!("Raw routing JSD: {variant} vs {baseline}");
    w.lines(
        &format!("{prefix}run_jsd_{}", slug(variant)),
        &Lines {
            title: &title,
            x_label: "layer (block index)",
            y_label: "raw JSD vs baseline (bits)",
            series: &series,
            integer_x: true,
        },
    )
}

/// One variant's per-domain, per-layer JSD against the baseline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantJsd {
    /// Variant name.
    pub name: String,
    /// JSD of each domain between baseline and this variant.
    pub jsd: RunJsd,
}

/// Routing shift of several variants against one baseline (an ablation).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Baseline name.
    pub baseline: String,
    /// Per-variant JSD tables.
    pub variants: Vec<VariantJsd>,
}

/// What tokens an input's counts come from, in words.
fn token_set(input: &AnalysisInput) -> String {
    match &input.trace {
        Some(t) => format!(
            "the {} validation tokens routed at step {} (a trace)",
            t.n_tokens(),
            t.step
        ),
        None => format!(
            "the tokens counted over steps {}..={} (router-log counts)",
            input.counts.step_start, input.counts.step_end
        ),
    }
}

/// Why `variant` cannot be compared with `baseline`, when one is a trace and the other counts:
/// different tokens (validation vs training) at different times (one checkpoint vs a whole run).
pub(super) fn token_set_mismatch(
    baseline: &AnalysisInput,
    variant: &AnalysisInput,
) -> Option<String> {
    (baseline.trace.is_some() != variant.trace.is_some()).then(|| {
        format!(
            "{} is not compared with {} as variant vs baseline: it counts {}, the baseline {}; a \
             JSD between different tokens is not a routing shift. Compare run folders with run \
             folders, or traces with traces (`moelab trace` each run's checkpoint)",
            variant.name,
            baseline.name,
            token_set(variant),
            token_set(baseline)
        )
    })
}

/// Same-domain raw JSD of each variant against the baseline ([`analysis::run_jsd`], baseline
/// first); an error when a variant counts other tokens than the baseline (a trace against counts).
pub fn compare_runs(baseline: &AnalysisInput, variants: &[AnalysisInput]) -> Result<Comparison> {
    compare_each(baseline, variants.iter())
}

/// [`compare_runs`] over borrowed variants.
pub(super) fn compare_each<'a>(
    baseline: &AnalysisInput,
    variants: impl Iterator<Item = &'a AnalysisInput>,
) -> Result<Comparison> {
    let variants = variants
        .map(|v| {
            if let Some(why) = token_set_mismatch(baseline, v) {
                return Err(TraceError::Mismatch(why));
            }
            let mut jsd = analysis::run_jsd(&baseline.counts, &v.counts)?;
            for n in &mut jsd.notes {
                *n = n
                    .replace("the first run", &format!("baseline {}", baseline.name))
                    .replace("the second run", &format!("variant {}", v.name));
            }
            Ok(VariantJsd {
                name: v.name.clone(),
                jsd,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Comparison {
        baseline: baseline.name.clone(),
        variants,
    })
}
