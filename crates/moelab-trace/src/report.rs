//! Reports: every number as CSV and JSON, heatmaps and line plots as PNG + SVG, and a `report.md`
//! that embeds the PNGs with a short explanation of each metric.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::analysis::{self, RunJsd, TokenKind};
use crate::error::{Result, TraceError};
use crate::plot::{self, Heatmap, Lines};
use crate::router_log::{self, RouterCounts};
use crate::st;
use crate::trace::{self, Trace};

/// Tokens listed per expert in vocabulary tables.
const TOP_TOKENS: usize = 10;

/// One named run (or checkpoint) to analyse: router counts, optionally per chunk and a trace.
#[derive(Debug, Clone)]
pub struct AnalysisInput {
    /// Display name (also the sub-directory of the report).
    pub name: String,
    /// Summed router counts (a run's total, or a trace's aggregate).
    pub counts: RouterCounts,
    /// The router-log chunks the total was summed from, by step (empty when not from a log).
    pub chunks: Vec<RouterCounts>,
    /// The per-token trace, when the input is a trace directory.
    pub trace: Option<Trace>,
    /// Text of each token id (the run's tokenizer), for readable vocabulary tables.
    pub token_text: Option<Vec<String>>,
}

/// Loads a run dir (its `router/` chunks), a trace dir (`trace.safetensors`), a bare router
/// directory, or a single chunk file. The name is `run@step`: a run dir's name and the steps its
/// router log covers (`run@first..last`), a trace's run (from its checkpoint path) and
/// checkpoint step, a chunk file's stem.
pub fn load_input(path: &Path) -> Result<AnalysisInput> {
    let stem = path
        .file_stem()
        .or_else(|| path.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".to_string());
    // A run folder `R/router` is named after R.
    let run_name = if stem == router_log::ROUTER_DIR {
        path.parent().map_or(stem.clone(), run_label)
    } else {
        run_label(path)
    };
    let name = stem;
    if path.is_file() {
        let chunk = router_log::read_chunk(path)?;
        return Ok(AnalysisInput {
            name,
            counts: chunk.clone(),
            chunks: vec![chunk],
            trace: None,
            token_text: None,
        });
    }
    if path.join(trace::TRACE_FILE).is_file() {
        let trace = Trace::read(path)?;
        // checkpoint = .../<run>/checkpoints/step-N: the run is two folders up.
        let run = Path::new(&trace.checkpoint)
            .parent()
            .and_then(Path::parent)
            .map_or(name, run_label);
        return Ok(AnalysisInput {
            name: format!("{run}@{}", trace.step),
            counts: trace.counts(),
            chunks: Vec::new(),
            trace: Some(trace),
            token_text: None,
        });
    }
    if !path.is_dir() {
        return Err(TraceError::NothingToRead {
            path: path.to_path_buf(),
            reason: "no such file or directory".to_string(),
        });
    }
    let chunks = router_log::read_dir(path)?;
    if chunks.is_empty() {
        return Err(TraceError::NothingToRead {
            path: path.to_path_buf(),
            reason: format!(
                "no {} (trace dir), no {}/chunk-*.safetensors (run dir) and no chunk files",
                trace::TRACE_FILE,
                router_log::ROUTER_DIR
            ),
        });
    }
    let counts = router_log::total(&chunks)?;
    Ok(AnalysisInput {
        // Router logs cover a range of steps; a trace is one checkpoint.
        name: if counts.step_start == counts.step_end {
            format!("{run_name}@{}", counts.step_end)
        } else {
            format!("{run_name}@{}..{}", counts.step_start, counts.step_end)
        },
        counts,
        chunks,
        trace: None,
        token_text: None,
    })
}

/// A run folder's display name: its name, with the variant in front for an ablation replicate
/// (`<variant>/seed-<s>`).
fn run_label(path: &Path) -> String {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    match (name(path), path.parent().and_then(name)) {
        (Some(n), Some(parent)) if n.starts_with("seed-") => format!("{parent}/{n}"),
        (Some(n), _) => n,
        (None, _) => "run".to_string(),
    }
}

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

/// Tracks written files under the report directory.
pub(crate) struct Out {
    dir: PathBuf,
    pub(crate) files: Vec<PathBuf>,
}

impl Out {
    pub(crate) fn new(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| TraceError::io("creating directory", dir, e))?;
        Ok(Out {
            dir: dir.to_path_buf(),
            files: Vec::new(),
        })
    }

    pub(crate) fn csv(&mut self, rel: &str, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
        let mut text = header.join(",");
        text.push('\n');
        for row in rows {
            let cells: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
            text.push_str(&cells.join(","));
            text.push('\n');
        }
        self.text(rel, &text)
    }

    pub(crate) fn json<T: Serialize>(&mut self, rel: &str, value: &T) -> Result<()> {
        let path = self.dir.join(rel);
        let text = serde_json::to_string_pretty(value).map_err(|source| TraceError::Json {
            path: path.clone(),
            source,
        })?;
        self.text(rel, &text)
    }

    pub(crate) fn text(&mut self, rel: &str, text: &str) -> Result<()> {
        let path = self.dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| TraceError::io("creating directory", parent, e))?;
        }
        st::write_atomic(&path, text.as_bytes())?;
        self.files.push(path);
        Ok(())
    }

    pub(crate) fn heatmap(&mut self, rel_stem: &str, h: &Heatmap<'_>) -> Result<String> {
        let stem = self.dir.join(rel_stem);
        self.ensure_parent(&stem)?;
        self.files.extend(plot::heatmap(&stem, h)?);
        Ok(format!("{rel_stem}.png"))
    }

    pub(crate) fn lines(&mut self, rel_stem: &str, l: &Lines<'_>) -> Result<String> {
        let stem = self.dir.join(rel_stem);
        self.ensure_parent(&stem)?;
        self.files.extend(plot::lines(&stem, l)?);
        Ok(format!("{rel_stem}.png"))
    }

    fn ensure_parent(&self, path: &Path) -> Result<()> {
        match path.parent() {
            Some(p) => {
                fs::create_dir_all(p).map_err(|e| TraceError::io("creating directory", p, e))
            }
            None => Ok(()),
        }
    }
}

/// Quotes a CSV cell when it contains a separator, quote or newline (RFC 4180).
fn csv_cell(c: &str) -> String {
    if c.contains([',', '"', '\n']) {
        format!("\"{}\"", c.replace('"', "\"\""))
    } else {
        c.to_string()
    }
}

/// Full-precision number, empty for undefined.
pub(crate) fn num(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

/// A name safe as a directory/file component.
pub(crate) fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("run{s}")
    } else {
        s
    }
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

/// Points of a per-layer series, skipping undefined values; x = block index.
fn layer_points(layers: &[usize], values: &[Option<f64>]) -> Vec<(f64, f64)> {
    layers
        .iter()
        .zip(values)
        .filter_map(|(&l, v)| v.map(|v| (l as f64, v)))
        .collect()
}

const METRICS_MD: &str = "\
## Metrics

- **Domain share** `counts[l][d][e] / tokens[d]`: the fraction of domain d's tokens that layer l \
routes to expert e (OLMoE's domain specialisation). Each row sums to top_k; domain-blind routing \
gives top_k / n_experts everywhere, so cells well above that mark experts specialised on the domain.
- **Domain JSD**: Jensen-Shannon divergence (base 2, 0 = same routing, 1 = disjoint experts) between \
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
- **Run JSD** (several inputs): the same domain's expert distribution in a variant vs the first \
input (baseline), per layer; how a mixture change moves routing. Empty where either run has no \
tokens of the domain.
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
    let mut used = Vec::new();
    for input in inputs {
        let mut dir = slug(&input.name);
        // Duplicate names (two `router` dirs, say) must not overwrite each other.
        let mut n = 2;
        while used.contains(&dir) {
            dir = format!("{}-{n}", slug(&input.name));
            n += 1;
        }
        used.push(dir.clone());
        runs.push(analyze_run(&mut w, &mut md, &mut notes, input, &dir)?);
    }

    md.push_str("## All inputs\n\n");
    // One line per input of a per-layer figure of its summary.
    let per_layer = |pick: fn(&RunSummary) -> &[Option<f64>]| -> Vec<(String, Vec<(f64, f64)>)> {
        inputs
            .iter()
            .zip(&runs)
            .map(|(i, r)| (r.name.clone(), layer_points(&i.counts.layers, pick(r))))
            .collect()
    };
    let png = w.lines(
        "domain_jsd_per_layer",
        &Lines {
            title: "Mean pairwise domain JSD per layer",
            x_label: "layer (block index)",
            y_label: "JSD (bits)",
            series: &per_layer(|r| &r.mean_domain_jsd_per_layer),
            integer_x: true,
        },
    )?;
    let _ = writeln!(
        md,
        "Mean JSD between distinct domains per layer:\n\n![]({png})\n"
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

    if let Some((baseline, variants)) = inputs.split_first() {
        if !variants.is_empty() {
            match compare_runs(baseline, variants) {
                Ok(cmp) => {
                    write_run_jsd(&mut w, &mut md, &cmp)?;
                    w.json("run_jsd.json", &cmp)?;
                }
                Err(e) => notes.push(format!("run JSD against {} skipped: {e}", baseline.name)),
            }
        }
    }
    write_saturation(&mut w, &mut md, &mut notes, inputs)?;

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

/// Tables, plots and markdown for one input.
fn analyze_run(
    w: &mut Out,
    md: &mut String,
    notes: &mut Vec<String>,
    input: &AnalysisInput,
    dir: &str,
) -> Result<RunSummary> {
    let c = &input.counts;
    c.validate()?;
    let layer_name = |l: usize| c.layers.get(l).copied().unwrap_or(l);
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

    // Domain share (specialisation) table + heatmaps.
    let mut rows = Vec::new();
    let mut max_share: f64 = 0.0;
    let shares: Vec<Vec<Option<Vec<f64>>>> = (0..c.n_layers())
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
                    layer_name(l).to_string(),
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
        let title = format!("{}: domain share, layer {}", input.name, layer_name(l));
        let png = w.heatmap(
            &format!("{dir}/domain_share_layer{:02}", layer_name(l)),
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
    let top: Vec<serde_json::Value> = (0..c.n_layers())
        .flat_map(|l| {
            (0..c.n_domains()).map(move |d| {
                serde_json::json!({
                    "layer": layer_name(l),
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
                layer_name(l),
                c.domains[d],
                cells.join(", ")
            );
        }
    }
    md.push('\n');

    // Domain JSD.
    let jsd = analysis::domain_jsd(c);
    notes.extend(jsd.notes.iter().map(|n| format!("{}: {n}", input.name)));
    let mut rows = Vec::new();
    let layer_labels = jsd
        .per_layer
        .iter()
        .enumerate()
        .map(|(l, m)| (layer_name(l).to_string(), m))
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
        &["layer", "domain_a", "domain_b", "jsd"],
        &rows,
    )?;
    let flat: Vec<Option<f64>> = jsd.mean.iter().flatten().copied().collect();
    let vmax = flat.iter().flatten().copied().fold(0.0, f64::max);
    let title = format!("{}: domain JSD, mean over layers", input.name);
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
    let _ = writeln!(md, "### Domain JSD (mean over layers)\n\n![]({png})\n");
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
    let per_layer_jsd: Vec<Option<f64>> =
        jsd.per_layer.iter().map(|m| mean_off_diagonal(m)).collect();

    // Load imbalance.
    let imbalance = analysis::load_imbalance(c);
    let mut rows = Vec::new();
    for (l, imb) in imbalance.iter().enumerate() {
        let load = analysis::expert_load(c, l);
        for (e, n) in load.iter().enumerate() {
            rows.push(vec![
                layer_name(l).to_string(),
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

    // Specialisation over steps.
    let over_steps = if input.chunks.len() >= 2 {
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
        Some(s)
    } else {
        None
    };

    // Trace-only analyses.
    let mut trace_json = serde_json::Value::Null;
    if let Some(t) = &input.trace {
        trace_json = analyze_trace(w, md, t, dir, &input.name, input.token_text.as_deref())?;
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
fn vocab_table(md: &mut String, v: &analysis::VocabSpecialization, token_text: Option<&[String]>) {
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

/// Vocabulary specialisation and co-activation tables/plots of one trace; returns their JSON.
fn analyze_trace(
    w: &mut Out,
    md: &mut String,
    t: &Trace,
    dir: &str,
    name: &str,
    token_text: Option<&[String]>,
) -> Result<serde_json::Value> {
    let mut vocab_json = Vec::new();
    let mut coact_json = Vec::new();
    let mut expert_rows = Vec::new();
    let mut token_rows = Vec::new();
    let mut coact_rows = Vec::new();
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
            for e in &v.experts {
                for (rank, s) in e.top.iter().enumerate() {
                    expert_rows.push(vec![
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
                token_rows.push(vec![
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
            vocab_json.push(serde_json::json!({
                "layer": v.layer, "kind": kind, "mean_token_specialization": weighted,
                "experts": v.experts,
            }));
        }
        let co = analysis::coactivation(t, l)?;
        for i in 0..co.n_experts {
            for j in 0..co.n_experts {
                let k = i * co.n_experts + j;
                coact_rows.push(vec![
                    co.layer.to_string(),
                    i.to_string(),
                    j.to_string(),
                    co.together[k].to_string(),
                    co.routed[i].to_string(),
                    co.normalized[k].to_string(),
                ]);
            }
        }
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
        coact_json.push(co);
    }
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
        &expert_rows,
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
        &token_rows,
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
        &coact_rows,
    )?;
    let _ = writeln!(
        md,
        "Per-token vocabulary tables: `{dir}/vocab_token_specialization.csv`, top tokens per expert: \
         `{dir}/vocab_expert_top_tokens.csv` (token ids; map them with the run's tokenizer).\n"
    );
    Ok(serde_json::json!({
        "checkpoint": t.checkpoint,
        "step": t.step,
        "n_tokens": t.n_tokens(),
        "vocab_specialization": vocab_json,
        "coactivation": coact_json,
    }))
}

/// Run-JSD tables and plots for [`analyze`].
fn write_run_jsd(w: &mut Out, md: &mut String, cmp: &Comparison) -> Result<()> {
    let mut rows = Vec::new();
    let _ = writeln!(md, "### Routing shift against {}\n", cmp.baseline);
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
        &["variant", "layer", "domain", "jsd_vs_baseline"],
        &rows,
    )
}

/// Line plot of one variant's per-domain JSD over layers.
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
    let title = format!("Routing shift: {variant} vs {baseline}");
    w.lines(
        &format!("{prefix}run_jsd_{}", slug(variant)),
        &Lines {
            title: &title,
            x_label: "layer (block index)",
            y_label: "JSD vs baseline (bits)",
            series: &series,
            integer_x: true,
        },
    )
}

/// Router saturation of traces of the same tokens, each against the latest one.
fn write_saturation(
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

/// Same-domain JSD of each variant against the baseline ([`analysis::run_jsd`], baseline first).
pub fn compare_runs(baseline: &AnalysisInput, variants: &[AnalysisInput]) -> Result<Comparison> {
    let variants = variants
        .iter()
        .map(|v| {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_util::tmp_dir;
    use crate::trace::tests::small_trace;

    fn chunk(step_start: u64, step_end: u64, skew: i64) -> RouterCounts {
        let mut c = RouterCounts::new(vec![0, 1], vec!["web".into(), "math".into()], 4, 2);
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
        assert!(run_jsd.starts_with("variant,layer,domain,jsd_vs_baseline\n"));
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("base/analysis.json")).unwrap())
                .unwrap();
        assert_eq!(json["domain_share"][0][0][0], 0.7);
        assert_eq!(summary.runs.len(), 4);
        assert!(summary.runs[2].has_trace);
        fs::remove_dir_all(&dir).unwrap();
    }
}
