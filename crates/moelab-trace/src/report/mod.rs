//! Reports: every number as CSV and JSON, heatmaps and line plots as PNG + SVG, and a `report.md`
//! that embeds the PNGs with a short explanation of each metric.
//!
//! - this module: the report's frame (all-inputs plots, notes, summary);
//! - `input`: loading a run folder, trace, router folder or chunk file;
//! - `run`: one input's routing tables (domain share, top experts, domain JSD, load, peaks);
//! - `per_token`: what only a trace has (vocabulary, co-activation, saturation over checkpoints);
//! - `compare_runs`: one domain's routing in a variant against a baseline;
//! - `writer`: the files, cell formats and the file-name sanitiser.

mod compare_runs;
mod input;
mod per_token;
mod run;
mod writer;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Result, TraceError};
use crate::plot::Lines;

pub(crate) use compare_runs::jsd_lines;
pub use compare_runs::{compare_runs, Comparison, VariantJsd};
pub use input::{load_input, AnalysisInput};
pub use run::RunSummary;
pub(crate) use writer::layer_points;
pub use writer::{file_name_chars, slug};
pub(crate) use writer::{num, Out};

/// What [`analyze`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportSummary {
    /// The report directory.
    pub out_dir: PathBuf,
    /// The markdown report.
    pub report: PathBuf,
    /// Every file written.
    pub files: Vec<PathBuf>,
    /// Per-input headline numbers.
    pub runs: Vec<RunSummary>,
    /// Things skipped and why.
    pub notes: Vec<String>,
}

const METRICS_MD: &str = "\
## Metrics

- **Domain share** `counts[l][d][e] / tokens[d]`: the fraction of domain d's tokens that layer l \
routes to expert e (OLMoE's domain specialisation). Each row sums to top_k; domain-blind routing \
gives top_k / n_experts everywhere, so cells well above that mark experts specialised on the domain.
- **Domain JSD** (raw: the experts of one model need no matching): Jensen-Shannon divergence (base 2, 0 = same routing, 1 = disjoint experts) between \
two domains' expert distributions `counts[l][d][:] / sum`, per layer and averaged over layers.
- **Load imbalance** `max_e load[e] / mean_e load[e]` per layer, load summed over domains: 1 is \
perfectly balanced, n_experts means one expert takes everything.
- **Peak share over steps**: per router-log chunk, the largest domain share of any expert averaged \
over layers; rising curves mean routing specialises during training.
- **Vocabulary specialisation** (traces): per token, the fraction of its routings (k per occurrence) \
that go to its most frequent expert, in [1/E, 1/k]; per expert, the tokens that make up most of its \
assignments. Computed for input tokens and for the model's predicted tokens.
- **Co-activation** (traces): `C[i][j]` = tokens whose top-k contains both i and j, divided by the \
tokens routed to i: of the tokens that chose i, the fraction that also chose j.
- **Router saturation** (traces of the same tokens at several checkpoints): mean over tokens of \
`|topk_a ∩ topk_final| / k` per layer; 1 means the routing has stopped changing.
- **Run JSD** (several inputs; raw: experts compared by index, `moelab ablate` adds the JSD aligned \
after matching experts): the same domain's expert distribution in a variant vs the first input \
(baseline), per layer; how a mixture change moves routing. Empty where either run has no tokens \
of the domain. Only inputs that count the same kind of tokens as the baseline are compared: run \
folders (router logs) with run folders, traces with traces.
";

/// Analyses every input, writes tables, plots and `report.md` into `out`.
pub fn analyze(inputs: &[AnalysisInput], out: &Path) -> Result<ReportSummary> {
    if inputs.is_empty() {
        return Err(TraceError::Invalid(
            "nothing to analyse: no inputs".to_string(),
        ));
    }
    let mut w = Out::new(out)?;
    let mut md = String::from("# Routing analysis\n\n");
    let mut notes = Vec::new();
    let mut runs = Vec::new();
    for (input, dir) in inputs.iter().zip(input_dirs(inputs)) {
        runs.push(run::analyze_run(&mut w, &mut md, &mut notes, input, &dir)?);
    }
    write_all_inputs(&mut w, &mut md, inputs, &runs)?;
    if let Some((baseline, others)) = inputs.split_first() {
        // Only inputs that count the same kind of tokens as the baseline are its variants.
        let mut variants = Vec::new();
        for v in others {
            match compare_runs::token_set_mismatch(baseline, v) {
                Some(why) => notes.push(why),
                None => variants.push(v),
            }
        }
        if !variants.is_empty() {
            match compare_runs::compare_each(baseline, variants.into_iter()) {
                Ok(cmp) => {
                    compare_runs::write_run_jsd(&mut w, &mut md, &cmp)?;
                    w.json("run_jsd.json", &cmp)?;
                }
                Err(e) => notes.push(format!("run JSD against {} skipped: {e}", baseline.name)),
            }
        }
    }
    per_token::write_saturation(&mut w, &mut md, &mut notes, inputs)?;

    md.push_str(METRICS_MD);
    if !notes.is_empty() {
        md.push_str("\n## Notes\n\n");
        for n in &notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    w.text("report.md", &md)?;
    let report = out.join("report.md");
    let mut summary = ReportSummary {
        out_dir: out.to_path_buf(),
        report,
        files: Vec::new(),
        runs,
        notes,
    };
    w.files.push(out.join("summary.json"));
    summary.files = w.files.clone();
    w.json("summary.json", &summary)?;
    Ok(summary)
}

/// Each input's sub-directory: its slugged name, numbered when taken by an earlier input.
fn input_dirs(inputs: &[AnalysisInput]) -> Vec<String> {
    let mut used: Vec<String> = Vec::new();
    for input in inputs {
        let mut dir = slug(&input.name);
        // Duplicate names (two `router` dirs, say) must not overwrite each other.
        let mut n = 2;
        while used.contains(&dir) {
            dir = format!("{}-{n}", slug(&input.name));
            n += 1;
        }
        used.push(dir);
    }
    used
}

/// The "All inputs" section: per-layer domain JSD and load imbalance, one line per input.
fn write_all_inputs(
    w: &mut Out,
    md: &mut String,
    inputs: &[AnalysisInput],
    runs: &[RunSummary],
) -> Result<()> {
    md.push_str("## All inputs\n\n");
    // One line per input of a per-layer figure of its summary.
    let per_layer = |pick: fn(&RunSummary) -> &[Option<f64>]| -> Vec<(String, Vec<(f64, f64)>)> {
        inputs
            .iter()
            .zip(runs)
            .map(|(i, r)| (r.name.clone(), layer_points(&i.counts.layers, pick(r))))
            .collect()
    };
    let png = w.lines(
        "domain_jsd_per_layer",
        &Lines {
            title: "Mean pairwise raw domain JSD per layer",
            x_label: "layer (block index)",
            y_label: "raw JSD (bits)",
            series: &per_layer(|r| &r.mean_domain_jsd_per_layer),
            integer_x: true,
        },
    )?;
    let _ = writeln!(
        md,
        "Mean raw JSD between distinct domains per layer:\n\n![]({png})\n"
    );
    let png = w.lines(
        "load_imbalance",
        &Lines {
            title: "Load imbalance (max / mean expert load)",
            x_label: "layer (block index)",
            y_label: "max / mean",
            series: &per_layer(|r| &r.load_imbalance),
            integer_x: true,
        },
    )?;
    let _ = writeln!(md, "Load imbalance per layer:\n\n![]({png})\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::router_log::{self, RouterLog};
    use crate::test_util::tmp_dir;
    use crate::trace::tests::small_trace;
    use std::fs;

    fn chunk(step_start: u64, step_end: u64, skew: i64) -> RouterLog {
        let mut c = RouterLog::new(vec![0, 1], vec!["web".into(), "math".into()], 4, 2);
        c.step_start = step_start;
        c.step_end = step_end;
        c.tokens = vec![10, 10];
        c.counts = vec![
            5 + skew,
            5,
            5,
            5 - skew,
            5,
            5,
            5,
            5, //
            5,
            5 + skew,
            5 - skew,
            5,
            5,
            5,
            5,
            5,
        ];
        c.gate_sums = vec![1.0; 16];
        c
    }

    #[test]
    fn load_input_accepts_run_dir_trace_dir_and_chunk_file() {
        let dir = tmp_dir("load-input");
        let run = dir.join("baseline");
        let path = router_log::write_chunk(&run.join("router"), &chunk(0, 9, 1)).unwrap();
        router_log::write_chunk(&run.join("router"), &chunk(10, 19, 3)).unwrap();
        let input = load_input(&run).unwrap();
        assert_eq!(input.name, "baseline@0..19");
        assert_eq!(input.chunks.len(), 2);
        assert_eq!(input.counts.count(0, 0, 0), 14);
        assert_eq!(load_input(&path).unwrap().counts, chunk(0, 9, 1));
        small_trace().write(&dir.join("tr")).unwrap();
        let t = load_input(&dir.join("tr")).unwrap();
        assert_eq!(t.counts, small_trace().counts());
        assert!(t.trace.is_some());
        fs::create_dir_all(dir.join("empty")).unwrap();
        let err = load_input(&dir.join("empty")).unwrap_err().to_string();
        assert!(err.contains("empty") && err.contains("chunk"), "{err}");
        assert!(load_input(&dir.join("missing")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn analyze_writes_tables_plots_and_report() {
        let dir = tmp_dir("analyze");
        let chunks = vec![chunk(0, 9, 1), chunk(10, 19, 3)];
        let base = AnalysisInput {
            name: "base".into(),
            counts: router_log::total(&chunks).unwrap(),
            chunks,
            trace: None,
            token_text: None,
        };
        let variant = AnalysisInput {
            name: "no math".into(),
            counts: chunk(0, 19, 4),
            chunks: vec![],
            trace: None,
            token_text: None,
        };
        let early = small_trace();
        let mut late = small_trace();
        late.step = 20;
        late.expert_ids[0..2].copy_from_slice(&[1, 3]);
        let traces: Vec<AnalysisInput> = [("early", early), ("late", late)]
            .into_iter()
            .map(|(n, t)| AnalysisInput {
                name: n.into(),
                counts: t.counts(),
                chunks: vec![],
                trace: Some(t),
                token_text: None,
            })
            .collect();
        let mut early_named = traces[0].clone();
        early_named.token_text = Some((0..16).map(|i| format!("w{i} ")).collect());
        let inputs = vec![base, variant, early_named, traces[1].clone()];
        let summary = analyze(&inputs, &dir).unwrap();
        let md = fs::read_to_string(&summary.report).unwrap();
        for needle in [
            "## base",
            "domain_share_layer00.png",
            "peak_share_over_steps.png",
            "Router saturation",
            "coactivation_layer01.png",
            "Metrics",
            "### Top experts per domain",
            "| domain | web | math |",
            "| expert | assignments | top tokens |",
            // Decoded tokens where the input has a tokenizer's texts, ids where it has none.
            "`w7·`",
            "#7 ",
        ] {
            assert!(md.contains(needle), "report.md lacks {needle}");
        }
        for f in &summary.files {
            assert!(f.exists(), "{f:?} listed but missing");
        }
        // Every PNG referenced by the report exists.
        for line in md.lines().filter(|l| l.starts_with("![](")) {
            let rel = &line[4..line.len() - 1];
            assert!(dir.join(rel).is_file(), "{rel}");
        }
        // Saturation of early vs late: layer 0 token 0 changed {0,1} -> {1,3}: 9/10; layer 1: 1.
        let sat = fs::read_to_string(dir.join("saturation.csv")).unwrap();
        assert!(sat.contains("late,early,10,0,0.9\n"), "{sat}");
        assert!(sat.contains("late,late,20,0,1\n"), "{sat}");
        let share = fs::read_to_string(dir.join("base/domain_share.csv")).unwrap();
        // base total: layer 0 web expert 0 = 6 + 8 = 14 of 20 tokens -> 0.7.
        assert!(share.contains("0,web,0,14,20,0.7,2\n"), "{share}");
        assert!(dir.join("no_math/domain_share_layer01.svg").is_file());
        let run_jsd = fs::read_to_string(dir.join("run_jsd.csv")).unwrap();
        assert!(run_jsd.starts_with("variant,layer,domain,raw_jsd_vs_baseline\n"));
        // The traces route other tokens than the baseline's router log: not its variants.
        assert!(
            run_jsd.contains("\nno math,") && !run_jsd.contains("early"),
            "{run_jsd}"
        );
        assert!(
            summary
                .notes
                .iter()
                .any(|n| n.contains("early is not compared with base")
                    && n.contains("validation tokens routed at step 10")
                    && n.contains("steps 0..=19")),
            "{:?}",
            summary.notes
        );
        assert!(md.contains("Raw JSD (experts compared by index)"), "{md}");
        let svg = fs::read_to_string(dir.join("run_jsd_no_math.svg")).unwrap();
        assert!(svg.contains("Raw routing JSD: no math vs base"), "{svg}");
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("base/analysis.json")).unwrap())
                .unwrap();
        assert_eq!(json["domain_share"][0][0][0], 0.7);
        assert_eq!(summary.runs.len(), 4);
        assert!(summary.runs[2].has_trace);
        fs::remove_dir_all(&dir).unwrap();
    }
}
