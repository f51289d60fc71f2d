//! One input's section of the report: domain share (specialisation), top experts per domain,
//! domain JSD, expert load, peak share over training, then the trace-only analyses, and the
//! input's `analysis.json` with every number.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use crate::analysis::{self, DomainJsd, SpecializationOverSteps};
use crate::error::Result;
use crate::plot::{Heatmap, Lines};
use crate::router_log::RouterLog;

use super::input::AnalysisInput;
use super::per_token;
use super::writer::{num, Out};

/// Headline numbers of one analysed input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// Input name.
    pub name: String,
    /// Sub-directory holding this input's tables and plots.
    pub dir: PathBuf,
    /// First step covered.
    pub step_start: u64,
    /// Last step covered.
    pub step_end: u64,
    /// Tokens per domain.
    pub tokens: BTreeMap<String, i64>,
    /// Per layer: mean JSD over pairs of distinct domains (see [`analysis::domain_jsd`]).
    pub mean_domain_jsd_per_layer: Vec<Option<f64>>,
    /// Mean of the above over layers.
    pub mean_domain_jsd: Option<f64>,
    /// Per layer: max/mean expert load.
    pub load_imbalance: Vec<Option<f64>>,
    /// Whether per-token (trace) analyses were made.
    pub has_trace: bool,
}

/// Share of each domain's tokens per (layer, domain, expert); `None` for a domain without tokens.
type Shares = Vec<Vec<Option<Vec<f64>>>>;

/// Tables, plots and markdown for one input.
pub(super) fn analyze_run(
    w: &mut Out,
    md: &mut String,
    notes: &mut Vec<String>,
    input: &AnalysisInput,
    dir: &str,
) -> Result<RunSummary> {
    let c = &input.counts;
    c.validate()?;
    write_heading(md, input);
    let shares = write_domain_share(w, md, input, dir)?;
    let top = write_top_experts(md, c);
    let jsd = analysis::domain_jsd(c);
    notes.extend(jsd.notes.iter().map(|n| format!("{}: {n}", input.name)));
    write_domain_jsd(w, md, input, dir, &jsd)?;
    let per_layer_jsd: Vec<Option<f64>> =
        jsd.per_layer.iter().map(|m| mean_off_diagonal(m)).collect();
    let imbalance = write_expert_load(w, c, dir)?;
    let over_steps = if input.chunks.len() >= 2 {
        Some(write_over_steps(w, md, input, dir)?)
    } else {
        None
    };

    // Trace-only analyses.
    let mut trace_json = serde_json::Value::Null;
    if let Some(t) = &input.trace {
        trace_json =
            per_token::analyze_trace(w, md, t, dir, &input.name, input.token_text.as_deref())?;
    }

    w.json(
        &format!("{dir}/analysis.json"),
        &serde_json::json!({
            "name": input.name,
            "step_start": c.step_start,
            "step_end": c.step_end,
            "layers": c.layers,
            "domains": c.domains,
            "n_experts": c.n_experts,
            "top_k": c.top_k,
            "tokens": c.tokens,
            "uniform_share": analysis::uniform_share(c),
            "domain_share": shares,
            "top_experts": top,
            "domain_jsd": jsd,
            "mean_domain_jsd_per_layer": per_layer_jsd,
            "load_imbalance": imbalance,
            "specialization_over_steps": over_steps,
            "trace": trace_json,
        }),
    )?;

    Ok(RunSummary {
        name: input.name.clone(),
        dir: w.dir.join(dir),
        step_start: c.step_start,
        step_end: c.step_end,
        tokens: c
            .domains
            .iter()
            .cloned()
            .zip(c.tokens.iter().copied())
            .collect(),
        mean_domain_jsd: {
            let defined: Vec<f64> = per_layer_jsd.iter().flatten().copied().collect();
            (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64)
        },
        mean_domain_jsd_per_layer: per_layer_jsd,
        load_imbalance: imbalance,
        has_trace: input.trace.is_some(),
    })
}

/// The block index of MoE layer `l` (its position when the counts name no layers).
fn layer_name(c: &RouterLog, l: usize) -> usize {
    c.layers.get(l).copied().unwrap_or(l)
}

/// The input's heading: steps, shape and tokens per domain.
fn write_heading(md: &mut String, input: &AnalysisInput) {
    let c = &input.counts;
    let _ = writeln!(
        md,
        "## {}\n\nSteps {}..={}, {} MoE layers, {} experts, top-{}. Tokens: {}.\n",
        input.name,
        c.step_start,
        c.step_end,
        c.n_layers(),
        c.n_experts,
        c.top_k,
        c.domains
            .iter()
            .zip(&c.tokens)
            .map(|(d, t)| format!("{d} {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Domain share (specialisation): the CSV table and one heatmap per layer; returns the shares.
fn write_domain_share(
    w: &mut Out,
    md: &mut String,
    input: &AnalysisInput,
    dir: &str,
) -> Result<Shares> {
    let c = &input.counts;
    let mut rows = Vec::new();
    let mut max_share: f64 = 0.0;
    let shares: Shares = (0..c.n_layers())
        .map(|l| {
            (0..c.n_domains())
                .map(|d| analysis::domain_share(c, l, d))
                .collect()
        })
        .collect();
    for (l, per_domain) in shares.iter().enumerate() {
        for (d, share) in per_domain.iter().enumerate() {
            for e in 0..c.n_experts {
                let s = share.as_ref().and_then(|s| s.get(e).copied());
                max_share = max_share.max(s.unwrap_or(0.0));
                rows.push(vec![
                    layer_name(c, l).to_string(),
                    c.domains[d].clone(),
                    e.to_string(),
                    c.count(l, d, e).to_string(),
                    c.tokens_of(d).to_string(),
                    num(s),
                    c.gate_sum(l, d, e).to_string(),
                ]);
            }
        }
    }
    w.csv(
        &format!("{dir}/domain_share.csv"),
        &[
            "layer",
            "domain",
            "expert",
            "count",
            "domain_tokens",
            "share",
            "gate_sum",
        ],
        &rows,
    )?;
    let experts: Vec<String> = (0..c.n_experts).map(|e| e.to_string()).collect();
    let _ = writeln!(
        md,
        "### Domain share per layer\n\nUniform routing would give {:.3} in every cell.\n",
        analysis::uniform_share(c)
    );
    for (l, per_domain) in shares.iter().enumerate() {
        let values: Vec<Option<f64>> = per_domain
            .iter()
            .flat_map(|s| (0..c.n_experts).map(move |e| s.as_ref().and_then(|s| s.get(e).copied())))
            .collect();
        let title = format!("{}: domain share, layer {}", input.name, layer_name(c, l));
        let png = w.heatmap(
            &format!("{dir}/domain_share_layer{:02}", layer_name(c, l)),
            &Heatmap {
                title: &title,
                x_label: "expert",
                y_label: "domain",
                rows: &c.domains,
                cols: &experts,
                values: &values,
                vmin: 0.0,
                vmax: max_share.max(f64::MIN_POSITIVE),
                diverging: false,
            },
        )?;
        let _ = writeln!(md, "![]({png})\n");
    }
    Ok(shares)
}

/// The top-experts-per-domain markdown table; returns the same as JSON.
fn write_top_experts(md: &mut String, c: &RouterLog) -> Vec<serde_json::Value> {
    let top: Vec<serde_json::Value> = (0..c.n_layers())
        .flat_map(|l| {
            (0..c.n_domains()).map(move |d| {
                serde_json::json!({
                    "layer": layer_name(c, l),
                    "domain": c.domains[d],
                    "top_experts": analysis::top_experts(c, l, d, c.top_k.max(1) * 2),
                })
            })
        })
        .collect();

    md.push_str("### Top experts per domain (share of the domain's tokens)\n\n| layer | domain | top experts |\n| --- | --- | --- |\n");
    for l in 0..c.n_layers() {
        for d in 0..c.n_domains() {
            let top = analysis::top_experts(c, l, d, c.top_k.max(1) * 2);
            if top.is_empty() {
                continue;
            }
            let cells: Vec<String> = top.iter().map(|(e, s)| format!("e{e} {s:.3}")).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                layer_name(c, l),
                c.domains[d],
                cells.join(", ")
            );
        }
    }
    md.push('\n');
    top
}

/// Domain JSD: the CSV table (per layer and the mean), the heatmap and table of the mean.
fn write_domain_jsd(
    w: &mut Out,
    md: &mut String,
    input: &AnalysisInput,
    dir: &str,
    jsd: &DomainJsd,
) -> Result<()> {
    let c = &input.counts;
    let mut rows = Vec::new();
    let layer_labels = jsd
        .per_layer
        .iter()
        .enumerate()
        .map(|(l, m)| (layer_name(c, l).to_string(), m))
        .chain(std::iter::once(("mean".to_string(), &jsd.mean)));
    for (label, m) in layer_labels {
        for (a, row) in m.iter().enumerate() {
            for (b, v) in row.iter().enumerate() {
                rows.push(vec![
                    label.clone(),
                    c.domains[a].clone(),
                    c.domains[b].clone(),
                    num(*v),
                ]);
            }
        }
    }
    w.csv(
        &format!("{dir}/domain_jsd.csv"),
        &["layer", "domain_a", "domain_b", "raw_jsd"],
        &rows,
    )?;
    let flat: Vec<Option<f64>> = jsd.mean.iter().flatten().copied().collect();
    let vmax = flat.iter().flatten().copied().fold(0.0, f64::max);
    let title = format!("{}: raw domain JSD, mean over layers", input.name);
    let png = w.heatmap(
        &format!("{dir}/domain_jsd_mean"),
        &Heatmap {
            title: &title,
            x_label: "domain",
            y_label: "domain",
            rows: &c.domains,
            cols: &c.domains,
            values: &flat,
            vmin: 0.0,
            vmax: vmax.max(f64::MIN_POSITIVE),
            diverging: false,
        },
    )?;
    let _ = writeln!(
        md,
        "### Domain JSD, raw (one model: its experts need no matching; mean over layers)\n\n![]({png})\n"
    );
    let _ = writeln!(md, "| domain | {} |", c.domains.join(" | "));
    let _ = writeln!(md, "| --- |{}", " --- |".repeat(c.n_domains()));
    for (a, row) in jsd.mean.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .map(|v| v.map_or_else(|| "-".to_string(), |x| format!("{x:.3}")))
            .collect();
        let _ = writeln!(md, "| {} | {} |", c.domains[a], cells.join(" | "));
    }
    md.push('\n');
    Ok(())
}

/// Mean over pairs a < b of distinct domains of a symmetric matrix.
fn mean_off_diagonal(m: &[Vec<Option<f64>>]) -> Option<f64> {
    let vals: Vec<f64> = m
        .iter()
        .enumerate()
        .flat_map(|(a, row)| {
            row.iter()
                .enumerate()
                .filter(move |(b, _)| *b > a)
                .map(|(_, v)| *v)
        })
        .flatten()
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
}

/// Expert load per layer as CSV; returns the per-layer imbalance (max / mean).
fn write_expert_load(w: &mut Out, c: &RouterLog, dir: &str) -> Result<Vec<Option<f64>>> {
    let imbalance = analysis::load_imbalance(c);
    let mut rows = Vec::new();
    for (l, imb) in imbalance.iter().enumerate() {
        let load = analysis::expert_load(c, l);
        for (e, n) in load.iter().enumerate() {
            rows.push(vec![
                layer_name(c, l).to_string(),
                e.to_string(),
                n.to_string(),
                num(*imb),
            ]);
        }
    }
    w.csv(
        &format!("{dir}/expert_load.csv"),
        &["layer", "expert", "assignments", "layer_max_over_mean"],
        &rows,
    )?;
    Ok(imbalance)
}

/// Peak domain share per router-log chunk (two or more chunks): CSV and line plot.
fn write_over_steps(
    w: &mut Out,
    md: &mut String,
    input: &AnalysisInput,
    dir: &str,
) -> Result<SpecializationOverSteps> {
    let s = analysis::specialization_over_steps(&input.chunks)?;
    let mut rows = Vec::new();
    for (i, step) in s.steps.iter().enumerate() {
        for (d, name) in s.domains.iter().enumerate() {
            rows.push(vec![
                step.to_string(),
                name.clone(),
                num(s.peak_share[i][d]),
            ]);
        }
    }
    w.csv(
        &format!("{dir}/peak_share_over_steps.csv"),
        &["step_end", "domain", "peak_share"],
        &rows,
    )?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = s
        .domains
        .iter()
        .enumerate()
        .map(|(d, name)| {
            let pts = s
                .steps
                .iter()
                .zip(&s.peak_share)
                .filter_map(|(&st, row)| row[d].map(|v| (st as f64, v)))
                .collect();
            (name.clone(), pts)
        })
        .collect();
    let (first, last) = (
        s.steps.first().copied().unwrap_or(0),
        s.steps.last().copied().unwrap_or(0),
    );
    series.push((
        "uniform".to_string(),
        vec![(first as f64, s.uniform), (last as f64, s.uniform)],
    ));
    let title = format!("{}: peak domain share over training", input.name);
    let png = w.lines(
        &format!("{dir}/peak_share_over_steps"),
        &Lines {
            title: &title,
            x_label: "step",
            y_label: "peak share (mean over layers)",
            series: &series,
            integer_x: true,
        },
    )?;
    let _ = writeln!(md, "### Specialisation over training\n\n![]({png})\n");
    Ok(s)
}
