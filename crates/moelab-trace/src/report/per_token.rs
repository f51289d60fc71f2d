//! What only a per-token trace can show: vocabulary specialisation (which tokens each expert
//! takes), co-activation (which experts a token picks together), and router saturation across
//! traces of the same tokens at several checkpoints.

use std::fmt::Write as _;

use crate::analysis::{self, Coactivation, TokenKind, VocabSpecialization};
use crate::error::Result;
use crate::plot::{Heatmap, Lines};
use crate::trace::Trace;

use super::input::AnalysisInput;
use super::writer::{slug, Out};

/// Tokens listed per expert in vocabulary tables.
const TOP_TOKENS: usize = 10;

/// Vocabulary specialisation and co-activation tables/plots of one trace; returns their JSON.
pub(super) fn analyze_trace(
    w: &mut Out,
    md: &mut String,
    t: &Trace,
    dir: &str,
    name: &str,
    token_text: Option<&[String]>,
) -> Result<serde_json::Value> {
    let mut tables = TraceTables::default();
    let _ = writeln!(
        md,
        "### Trace: vocabulary specialisation and co-activation\n"
    );
    let experts: Vec<String> = (0..t.n_experts).map(|e| e.to_string()).collect();
    for l in 0..t.n_layers() {
        for kind in [TokenKind::Input, TokenKind::Predicted] {
            let v = analysis::vocab_specialization(t, l, kind, TOP_TOKENS)?;
            if kind == TokenKind::Input {
                vocab_table(md, &v, token_text);
            }
            tables.add_vocab(&v, kind);
        }
        let co = analysis::coactivation(t, l)?;
        tables.add_coactivation(&co);
        let values: Vec<Option<f64>> = co.normalized.iter().map(|&v| Some(v)).collect();
        let title = format!("{name}: co-activation, layer {}", co.layer);
        let png = w.heatmap(
            &format!("{dir}/coactivation_layer{:02}", co.layer),
            &Heatmap {
                title: &title,
                x_label: "expert j",
                y_label: "expert i",
                rows: &experts,
                cols: &experts,
                values: &values,
                vmin: 0.0,
                vmax: 1.0,
                diverging: false,
            },
        )?;
        let _ = writeln!(md, "![]({png})\n");
        tables.coact_json.push(co);
    }
    tables.write(w, dir)?;
    let _ = writeln!(
        md,
        "Per-token vocabulary tables: `{dir}/vocab_token_specialization.csv`, top tokens per expert: \
         `{dir}/vocab_expert_top_tokens.csv` (token ids; map them with the run's tokenizer).\n"
    );
    Ok(serde_json::json!({
        "checkpoint": t.checkpoint,
        "step": t.step,
        "n_tokens": t.n_tokens(),
        "vocab_specialization": tables.vocab_json,
        "coactivation": tables.coact_json,
    }))
}

/// The rows of a trace's CSV tables and its JSON, gathered layer by layer.
#[derive(Default)]
struct TraceTables {
    vocab_json: Vec<serde_json::Value>,
    coact_json: Vec<Coactivation>,
    expert_rows: Vec<Vec<String>>,
    token_rows: Vec<Vec<String>>,
    coact_rows: Vec<Vec<String>>,
}

impl TraceTables {
    /// One layer's vocabulary specialisation for one kind of token (input or predicted).
    fn add_vocab(&mut self, v: &VocabSpecialization, kind: TokenKind) {
        for e in &v.experts {
            for (rank, s) in e.top.iter().enumerate() {
                self.expert_rows.push(vec![
                    v.layer.to_string(),
                    kind.name().to_string(),
                    e.expert.to_string(),
                    e.assignments.to_string(),
                    rank.to_string(),
                    s.token.to_string(),
                    s.count.to_string(),
                    s.share.to_string(),
                ]);
            }
        }
        for s in &v.tokens {
            self.token_rows.push(vec![
                v.layer.to_string(),
                kind.name().to_string(),
                s.token.to_string(),
                s.routings.to_string(),
                s.top_expert.to_string(),
                s.specialization.to_string(),
            ]);
        }
        // Routing-weighted mean specialisation: one number per layer and kind.
        let routings: u64 = v.tokens.iter().map(|s| s.routings).sum();
        let weighted = (routings > 0).then(|| {
            v.tokens
                .iter()
                .map(|s| s.specialization * s.routings as f64)
                .sum::<f64>()
                / routings as f64
        });
        self.vocab_json.push(serde_json::json!({
            "layer": v.layer, "kind": kind, "mean_token_specialization": weighted,
            "experts": v.experts,
        }));
    }

    /// One layer's co-activation matrix as CSV rows.
    fn add_coactivation(&mut self, co: &Coactivation) {
        for i in 0..co.n_experts {
            for j in 0..co.n_experts {
                let k = i * co.n_experts + j;
                self.coact_rows.push(vec![
                    co.layer.to_string(),
                    i.to_string(),
                    j.to_string(),
                    co.together[k].to_string(),
                    co.routed[i].to_string(),
                    co.normalized[k].to_string(),
                ]);
            }
        }
    }

    /// Writes the vocabulary and co-activation CSVs under `dir`.
    fn write(&self, w: &mut Out, dir: &str) -> Result<()> {
        w.csv(
            &format!("{dir}/vocab_expert_top_tokens.csv"),
            &[
                "layer",
                "kind",
                "expert",
                "expert_assignments",
                "rank",
                "token",
                "count",
                "share",
            ],
            &self.expert_rows,
        )?;
        w.csv(
            &format!("{dir}/vocab_token_specialization.csv"),
            &[
                "layer",
                "kind",
                "token",
                "routings",
                "top_expert",
                "specialization",
            ],
            &self.token_rows,
        )?;
        w.csv(
            &format!("{dir}/coactivation.csv"),
            &[
                "layer",
                "expert_i",
                "expert_j",
                "together",
                "routed_i",
                "normalized",
            ],
            &self.coact_rows,
        )
    }
}

/// A token as table text: its decoded form (quoted, whitespace made visible) or its id.
fn token_cell(id: u32, token_text: Option<&[String]>) -> String {
    match token_text.and_then(|t| t.get(id as usize)) {
        Some(text) => {
            let shown: String = text
                .chars()
                .map(|c| match c {
                    '\n' => '⏎',
                    ' ' => '·',
                    '|' => '¦',
                    '`' => '\'',
                    c if c.is_control() => '?',
                    c => c,
                })
                .collect();
            format!("`{shown}`")
        }
        None => format!("#{id}"),
    }
}

/// Markdown table of each expert's most frequent input tokens in one layer.
fn vocab_table(md: &mut String, v: &VocabSpecialization, token_text: Option<&[String]>) {
    let _ = writeln!(
        md,
        "Layer {} — each expert's most frequent input tokens (share of its assignments){}:\n\n| expert | assignments | top tokens |\n| --- | --- | --- |",
        v.layer,
        if token_text.is_some() { "" } else { " (token ids: no tokenizer given)" }
    );
    for e in &v.experts {
        let cells: Vec<String> = e
            .top
            .iter()
            .take(6)
            .map(|s| format!("{} {:.2}", token_cell(s.token, token_text), s.share))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            e.expert,
            e.assignments,
            cells.join(", ")
        );
    }
    md.push('\n');
}

/// Router saturation of traces of the same tokens, each against the latest one.
pub(super) fn write_saturation(
    w: &mut Out,
    md: &mut String,
    notes: &mut Vec<String>,
    inputs: &[AnalysisInput],
) -> Result<()> {
    let traces: Vec<(&str, &Trace)> = inputs
        .iter()
        .filter_map(|i| i.trace.as_ref().map(|t| (i.name.as_str(), t)))
        .collect();
    if traces.len() < 2 {
        return Ok(());
    }
    // Group traces of the same tokens and model; the latest checkpoint is the reference.
    let mut groups: Vec<Vec<(&str, &Trace)>> = Vec::new();
    for (name, t) in traces {
        match groups.iter_mut().find(|g| {
            let r = g[0].1;
            r.token_ids == t.token_ids && r.layers == t.layers && r.top_k == t.top_k
        }) {
            Some(g) => g.push((name, t)),
            None => groups.push(vec![(name, t)]),
        }
    }
    let mut rows = Vec::new();
    for group in groups.iter_mut().filter(|g| g.len() >= 2) {
        group.sort_by_key(|(_, t)| t.step);
        let Some(&(ref_name, reference)) = group.last() else {
            continue;
        };
        let mut per_layer: Vec<Vec<(f64, f64)>> = vec![Vec::new(); reference.n_layers()];
        for &(name, t) in group.iter() {
            match analysis::router_saturation(t, reference) {
                Ok(s) => {
                    for (l, v) in s.iter().enumerate() {
                        rows.push(vec![
                            ref_name.to_string(),
                            name.to_string(),
                            t.step.to_string(),
                            reference.layers[l].to_string(),
                            v.to_string(),
                        ]);
                        per_layer[l].push((t.step as f64, *v));
                    }
                }
                Err(e) => notes.push(format!("saturation of {name} vs {ref_name} skipped: {e}")),
            }
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = per_layer
            .into_iter()
            .enumerate()
            .map(|(l, pts)| (format!("layer {}", reference.layers[l]), pts))
            .collect();
        let title = format!("Router saturation vs {ref_name} (step {})", reference.step);
        let png = w.lines(
            &format!("saturation_vs_{}", slug(ref_name)),
            &Lines {
                title: &title,
                x_label: "checkpoint step",
                y_label: "top-k overlap with final",
                series: &series,
                integer_x: true,
            },
        )?;
        let _ = writeln!(md, "### Router saturation\n\n![]({png})\n");
    }
    if !rows.is_empty() {
        w.csv(
            "saturation.csv",
            &["reference", "trace", "step", "layer", "saturation"],
            &rows,
        )?;
    }
    Ok(())
}
