//! Ablations: several variants of one base config, trained with the same seed and token budget
//! one after another, then compared on per-domain validation loss and on how each domain's
//! validation tokens are routed (Jensen-Shannon divergence against the baseline). With
//! `seeds = [..]` every variant is trained once per seed and the comparison reports spread,
//! bootstrap intervals and the routing noise floor (see `moelab_trace::compare`).
//!
//! An ablation file:
//! ```toml
//! base = "../tiny.toml"            # base run config, relative to this file
//! out_dir = "runs/ablations/small" # default for --out (relative to the working directory)
//! set = ["train.steps=150"]        # overrides applied to every variant
//! seeds = [1, 2, 3]                # optional: run.seed of each replicate (OUT/<name>/seed-<s>)
//! [[variant]]                      # the first variant is the baseline
//! name = "baseline"
//! [[variant]]
//! name = "no_code"
//! set = ["data.mixture.code=0.0"]
//! ```
//! Routing is compared on the final evaluation's validation-set counts
//! (`eval/step-N/chunk-N.safetensors`): the same tokens for every variant, unlike the training
//! router logs, whose tokens follow each variant's mixture. Experts are matched across runs on a
//! trace of the same validation tokens (`checkpoint_trace`), for the aligned JSD.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moelab_trace::compare::{
    compare_replicates, write_comparison, AblationComparison, ComparisonRow, ReplicateRun,
};
use moelab_trace::curves::plot_curves;
use moelab_trace::router_log::{self, RouterLog};
use serde::Deserialize;

use crate::eval::{evaluate_checkpoint, EvalFile};
use crate::run::RunDir;
use crate::trace_checkpoint::{trace_checkpoint, TraceOptions};
use crate::trainer::{train, Event, Resume, RunOptions, Summary};
use crate::{checkpoint, interrupt, Config, TrainError};

/// Sub-folder of the ablation's output with the comparison tables, plots and comparison.md.
pub const COMPARISON_DIR: &str = "comparison";
/// Sub-folder of the comparison with the training curves, variants overlaid.
pub const CURVES_DIR: &str = "curves";

/// The ablation file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AblationFile {
    base: PathBuf,
    #[serde(default)]
    out_dir: Option<PathBuf>,
    #[serde(default)]
    set: Vec<String>,
    #[serde(default)]
    seeds: Vec<u64>,
    #[serde(default, rename = "variant")]
    variants: Vec<VariantFile>,
}

/// One `[[variant]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantFile {
    name: String,
    #[serde(default)]
    set: Vec<String>,
}

/// One run of the ablation: a variant at one seed, with its resolved run config.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Variant name (`run.name`, or `<name>-seed-<s>` with seeds).
    pub name: String,
    /// Its seed (`run.seed`).
    pub seed: u64,
    /// The run folder under the output folder and the name in progress lines: the name, or
    /// `<name>/seed-<s>` when the ablation lists seeds.
    pub label: String,
    /// Overrides applied to the base config (the ablation's `set`, then the variant's).
    pub overrides: Vec<String>,
    /// The resolved config (run.name = name).
    pub config: Config,
}

/// A loaded and validated ablation file.
#[derive(Debug, Clone)]
pub struct Ablation {
    /// The ablation file.
    pub path: PathBuf,
    /// The base run config (resolved against the file's folder).
    pub base: PathBuf,
    /// Default output folder (`out_dir`, else `runs/ablations/<file stem>`).
    pub out_dir: PathBuf,
    /// Every run: each variant once, or once per seed (seed by seed); the first is the baseline.
    pub variants: Vec<Variant>,
    /// The ablation's `seeds` (empty: each variant once with the base config's seed).
    pub seeds: Vec<u64>,
}

impl Ablation {
    /// Reads and validates an ablation file, resolving every variant's config before any work.
    pub fn load(path: &Path) -> Result<Self, TrainError> {
        let fail = |message: String| TrainError::Ablation {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
        let value: toml::Value = text
            .parse::<toml::Table>()
            .map(toml::Value::Table)
            .map_err(|e| fail(e.to_string()))?;
        let file: AblationFile = serde_path_to_error::deserialize(value)
            .map_err(|e| fail(format!("key `{}`: {}", e.path(), e.inner())))?;
        if file.variants.is_empty() {
            return Err(fail(
                "no [[variant]] tables: add at least one (the first is the baseline)".into(),
            ));
        }
        let base = path
            .parent()
            .map_or_else(|| file.base.clone(), |dir| dir.join(&file.base));
        let stem = path
            .file_stem()
            .map_or_else(|| "ablation".into(), |s| s.to_string_lossy().into_owned());
        let out_dir = file
            .out_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join("ablations").join(stem));
        let mut variants: Vec<Variant> = Vec::with_capacity(file.variants.len());
        for (i, v) in file.variants.iter().enumerate() {
            check_name(&v.name).map_err(|reason| {
                fail(format!("key `variant[{i}].name`: `{}` {reason}", v.name))
            })?;
            if variants.iter().any(|w| w.name == v.name) {
                return Err(fail(format!(
                    "key `variant[{i}].name`: `{}` is used by an earlier variant; names must be unique",
                    v.name
                )));
            }
            let overrides: Vec<String> = file.set.iter().chain(&v.set).cloned().collect();
            let mut config = Config::load(&base, &overrides)
                .map_err(|e| fail(format!("variant `{}`: {e}", v.name)))?;
            // Config::load leaves [data] to the data layer; check it before any variant trains.
            config
                .data
                .validate()
                .map_err(|e| fail(format!("variant `{}`: {e}", v.name)))?;
            config.run.name = v.name.clone();
            if let Some(baseline) = variants.first() {
                same_budget(&baseline.config, &config).map_err(|(key, a, b)| {
                    fail(format!(
                        "variant `{}` changes {key} ({b} vs the baseline's {a}); every variant runs with \
                         the same seed and token budget, so put such overrides in the top-level `set`",
                        v.name
                    ))
                })?;
            }
            variants.push(Variant {
                name: v.name.clone(),
                seed: config.run.seed,
                label: v.name.clone(),
                overrides,
                config,
            });
        }
        for (i, seed) in file.seeds.iter().enumerate() {
            if file.seeds[..i].contains(seed) {
                return Err(fail(format!(
                    "key `seeds[{i}]`: seed {seed} is listed twice; each replicate needs its own seed"
                )));
            }
        }
        if !file.seeds.is_empty() {
            // Seed by seed, so a study stopped part-way has whole replicates to compare.
            variants = file
                .seeds
                .iter()
                .flat_map(|&seed| {
                    variants.iter().map(move |v| {
                        let mut run = v.clone();
                        run.seed = seed;
                        run.label = format!("{}/seed-{seed}", v.name);
                        run.config.run.seed = seed;
                        run.config.run.name = format!("{}-seed-{seed}", v.name);
                        run.overrides.push(format!("run.seed={seed}"));
                        run
                    })
                })
                .collect();
        }
        Ok(Ablation {
            path: path.to_path_buf(),
            base,
            out_dir,
            variants,
            seeds: file.seeds,
        })
    }
}

/// Why a variant name cannot be a folder name, if it cannot.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name == COMPARISON_DIR {
        return Err(format!(
            "is reserved for the comparison folder ({COMPARISON_DIR}/)"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("must not start with `.` or `-`".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(
            "may only hold ASCII letters, digits, `_`, `-` and `.` (it names a folder)".into(),
        );
    }
    Ok(())
}

/// The first of seed, steps, tokens per step that differs: (key, baseline value, variant value).
fn same_budget(baseline: &Config, variant: &Config) -> Result<(), (&'static str, String, String)> {
    let tokens_per_step = |c: &Config| (c.global_sequences() * c.data.seq_len) as u64;
    let checks = [
        ("run.seed", baseline.run.seed, variant.run.seed),
        ("train.steps", baseline.train.steps, variant.train.steps),
        (
            "the tokens per step (train.global_batch_tokens / data.seq_len)",
            tokens_per_step(baseline),
            tokens_per_step(variant),
        ),
    ];
    for (key, a, b) in checks {
        if a != b {
            return Err((key, a.to_string(), b.to_string()));
        }
    }
    Ok(())
}

/// What [`run_ablation`] reports as it goes.
#[derive(Debug)]
pub enum AblationEvent<'a> {
    /// A variant starts (or resumes) training.
    VariantStarted {
        /// 1-based position among the variants.
        index: usize,
        /// Number of variants.
        total: usize,
        /// Variant name.
        name: &'a str,
        /// Its run folder.
        run_dir: &'a Path,
    },
    /// A variant already has its final checkpoint and is not trained again.
    VariantSkipped {
        /// 1-based position among the variants.
        index: usize,
        /// Number of variants.
        total: usize,
        /// Variant name.
        name: &'a str,
        /// Its run folder.
        run_dir: &'a Path,
        /// The final step it reached.
        step: u64,
    },
    /// A trainer event of the running variant.
    Train {
        /// Variant name.
        name: &'a str,
        /// The trainer's event.
        event: &'a Event,
    },
    /// A variant finished (or was stopped by a signal).
    VariantFinished {
        /// Variant name.
        name: &'a str,
        /// How its training ended.
        summary: &'a Summary,
    },
}

/// How an ablation ended.
#[derive(Debug, Clone)]
pub struct AblationOutcome {
    /// The output folder.
    pub out_dir: PathBuf,
    /// True when a signal stopped a variant; no comparison was made (run again to resume).
    pub interrupted: bool,
    /// The comparison folder, when the comparison was written.
    pub comparison_dir: Option<PathBuf>,
    /// The comparison rows (variant x domain), baseline first.
    pub rows: Vec<ComparisonRow>,
    /// The whole comparison (rows, task scores, per-layer JSD against the baseline).
    pub comparison: Option<AblationComparison>,
    /// Things left out of the comparison and why.
    pub notes: Vec<String>,
}

/// Trains every variant of `ablation` under `out_dir` (`out_dir/<name>`), skipping finished ones
/// and resuming interrupted ones, then writes the comparison into `out_dir/comparison/`.
pub fn run_ablation(
    ablation: &Ablation,
    out_dir: &Path,
    on_event: &mut dyn FnMut(&AblationEvent<'_>),
) -> Result<AblationOutcome, TrainError> {
    // Ctrl-C is a request to stop at the next safe point in every phase, not only in training.
    interrupt::install().map_err(TrainError::io(out_dir))?;
    let interrupted = || AblationOutcome {
        out_dir: out_dir.to_path_buf(),
        interrupted: true,
        comparison_dir: None,
        rows: Vec::new(),
        comparison: None,
        notes: Vec::new(),
    };
    let total = ablation.variants.len();
    // Every variant still to train gets train's own checks (data, mixture, vocabulary, tasks,
    // memory) before the first step of the first: a bad variant 2 must not cost variant 1's run.
    check_variants(ablation, out_dir, true, &mut |label, event| {
        on_event(&AblationEvent::Train { name: label, event })
    })?;
    let mut finished = Vec::with_capacity(total);
    for (i, variant) in ablation.variants.iter().enumerate() {
        if interrupt::requested() {
            return Ok(interrupted());
        }
        let run_dir = out_dir.join(&variant.label);
        let mut cfg = variant.config.clone();
        cfg.run.out_dir = out_dir.to_path_buf();
        if let Some(step) = finished_step(&run_dir, &cfg)? {
            on_event(&AblationEvent::VariantSkipped {
                index: i + 1,
                total,
                name: &variant.label,
                run_dir: &run_dir,
                step,
            });
            finished.push((variant, run_dir, step));
            continue;
        }
        on_event(&AblationEvent::VariantStarted {
            index: i + 1,
            total,
            name: &variant.label,
            run_dir: &run_dir,
        });
        let options = RunOptions {
            run_dir: Some(run_dir.clone()),
            resume: Some(Resume::Auto),
            ..RunOptions::default()
        };
        let summary = train(cfg.clone(), options, &mut |event| {
            on_event(&AblationEvent::Train {
                name: &variant.label,
                event,
            })
        })?;
        on_event(&AblationEvent::VariantFinished {
            name: &variant.label,
            summary: &summary,
        });
        if summary.interrupted {
            return Ok(interrupted());
        }
        finished.push((variant, run_dir, summary.steps));
    }

    compare(ablation, out_dir, &finished)
}

/// Runs [`crate::trainer::preflight`] on every variant of `ablation` that is not finished under
/// `out_dir`, before any trains; the error names the ablation file and the variant.
/// `check_memory`: also compare each variant's memory estimate with the device.
pub(crate) fn check_variants(
    ablation: &Ablation,
    out_dir: &Path,
    check_memory: bool,
    on_event: &mut dyn FnMut(&str, &Event),
) -> Result<(), TrainError> {
    for variant in &ablation.variants {
        let mut cfg = variant.config.clone();
        cfg.run.out_dir = out_dir.to_path_buf();
        if finished_step(&out_dir.join(&variant.label), &cfg)?.is_some() {
            continue;
        }
        crate::trainer::preflight(&cfg, check_memory, &mut |event| {
            on_event(&variant.label, event)
        })
        .map_err(|e| TrainError::Ablation {
            path: ablation.path.clone(),
            message: format!(
                "variant `{}` cannot train (checked before any variant trains): {e}",
                variant.label
            ),
        })?;
    }
    Ok(())
}

/// Writes the comparison of variants trained elsewhere (`--parallel`, `--slurm`) once all have
/// finished; the error names those that have not.
pub fn compare_finished(
    ablation: &Ablation,
    out_dir: &Path,
) -> Result<AblationOutcome, TrainError> {
    interrupt::install().map_err(TrainError::io(out_dir))?;
    let mut finished = Vec::with_capacity(ablation.variants.len());
    let mut missing = Vec::new();
    for variant in &ablation.variants {
        let run_dir = out_dir.join(&variant.label);
        let mut cfg = variant.config.clone();
        cfg.run.out_dir = out_dir.to_path_buf();
        match finished_step(&run_dir, &cfg)? {
            Some(step) => finished.push((variant, run_dir, step)),
            None => missing.push(variant.label.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(TrainError::Ablation {
            path: ablation.path.clone(),
            message: format!(
                "cannot compare yet: {} not finished under {} (no final checkpoint); wait for the jobs, or train them with `moelab ablate` without --compare",
                missing.join(", "),
                out_dir.display()
            ),
        });
    }
    compare(ablation, out_dir, &finished)
}

/// Evaluates (if needed) and compares finished variants: (variant, run folder, final step).
fn compare(
    ablation: &Ablation,
    out_dir: &Path,
    finished: &[(&Variant, PathBuf, u64)],
) -> Result<AblationOutcome, TrainError> {
    let interrupted = || AblationOutcome {
        out_dir: out_dir.to_path_buf(),
        interrupted: true,
        comparison_dir: None,
        rows: Vec::new(),
        comparison: None,
        notes: Vec::new(),
    };
    let mut notes = Vec::new();
    let mut runs = Vec::with_capacity(finished.len());
    for (variant, run_dir, step) in finished {
        let (losses, bpb, scores, counts) = match final_eval(run_dir, *step) {
            Err(TrainError::Interrupted) => return Ok(interrupted()),
            result => result?,
        };
        // The same validation tokens through every run: experts are matched on them.
        let trace = match trace_checkpoint(
            &RunDir::new(run_dir).checkpoint(*step),
            &TraceOptions::default(),
        ) {
            Ok(t) => Some(t),
            Err(TrainError::Interrupted) => return Ok(interrupted()),
            Err(e) => {
                notes.push(format!(
                    "{}: no validation trace ({e}); raw JSD only",
                    variant.label
                ));
                None
            }
        };
        runs.push(ReplicateRun {
            variant: variant.name.clone(),
            seed: variant.seed,
            losses,
            bpb,
            scores,
            counts,
            trace,
        });
    }
    let baseline = ablation
        .variants
        .first()
        .ok_or_else(|| TrainError::Ablation {
            path: ablation.path.clone(),
            message: "no variants".into(),
        })?;
    let comparison = compare_replicates(&baseline.name, &runs)?;
    notes.extend(comparison.notes.iter().cloned());
    if interrupt::requested() {
        return Ok(interrupted());
    }
    let comparison_dir = out_dir.join(COMPARISON_DIR);
    write_comparison(&comparison_dir, &comparison)?;
    // Curves with the variants overlaid (each the mean over its seeds).
    let mut groups: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for (variant, run_dir, _) in finished {
        match groups.iter_mut().find(|(name, _)| *name == variant.name) {
            Some((_, dirs)) => dirs.push(run_dir.clone()),
            None => groups.push((variant.name.clone(), vec![run_dir.clone()])),
        }
    }
    if let Err(e) = plot_curves(&groups, &comparison_dir.join(CURVES_DIR)) {
        notes.push(format!("training curves not drawn: {e}"));
    }
    Ok(AblationOutcome {
        out_dir: out_dir.to_path_buf(),
        interrupted: false,
        comparison_dir: Some(comparison_dir),
        rows: comparison.rows.clone(),
        comparison: Some(comparison),
        notes,
    })
}

/// The final step when `run_dir` holds this variant's finished run (final checkpoint and final
/// evaluation written); an error when it holds a finished run of another config (it would be
/// silently mixed into the comparison).
pub(crate) fn finished_step(run_dir: &Path, cfg: &Config) -> Result<Option<u64>, TrainError> {
    let run_dir = RunDir::new(run_dir);
    let last = checkpoint::list(&run_dir.checkpoints())?.pop();
    match last {
        Some((step, _)) if step >= cfg.train.steps => {
            let saved = std::fs::read_to_string(run_dir.config()).unwrap_or_default();
            if saved != cfg.to_toml() {
                return Err(TrainError::RunDir {
                    path: run_dir.root().to_path_buf(),
                    reason:
                        "it holds a finished run whose config.toml differs from this variant's \
                             resolved config (was the ablation file edited?); delete the folder to \
                             train the variant again, or choose another --out"
                            .into(),
                });
            }
            // A signal or kill during the final evaluation leaves the checkpoint without it:
            // the variant is finished only once its final evaluation is written, so a re-run
            // resumes it and writes the evaluation (and its metrics line).
            Ok(run_dir.eval_json(step).is_file().then_some(step))
        }
        _ => Ok(None),
    }
}

/// What [`final_eval`] reads: loss per domain, bits per byte per domain, task scores
/// (`task/metric` -> value) and the validation set's router log.
pub type FinalEval = (
    BTreeMap<String, f64>,
    BTreeMap<String, f64>,
    BTreeMap<String, f64>,
    RouterLog,
);

/// Validation loss and bits per byte per domain, task scores and the validation set's router log of a run's
/// evaluation at `step`, evaluating the step's checkpoint first when the files are missing.
pub fn final_eval(run_dir: &Path, step: u64) -> Result<FinalEval, TrainError> {
    let run = RunDir::new(run_dir);
    // The evaluation may write into the run folder: it is taken like a training run.
    let _lock = run.lock()?;
    let json_path = run.eval_json(step);
    let chunk_dir = run.eval_router_log(step);
    let mut chunks = if json_path.is_file() && chunk_dir.is_dir() {
        router_log::read_dir(&chunk_dir)?
    } else {
        Vec::new()
    };
    if chunks.is_empty() {
        let report = evaluate_checkpoint(&run.checkpoint(step))?;
        report.write(&run)?;
        chunks = router_log::read_dir(&chunk_dir)?;
    }
    let eval = EvalFile::read(&json_path).map_err(|e| TrainError::RunDir {
        path: run_dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok((
        eval.losses(),
        eval.bits_per_byte(),
        eval.scores(),
        router_log::total(&chunks)?,
    ))
}

/// The compact terminal table of a comparison (see [`moelab_trace::compare::terminal_table`]):
/// per domain its validation tokens, each variant's loss, delta, raw and aligned JSD, and the
/// noise floors, or "n/a (one seed)"; then the losses in bits per byte
/// ([`moelab_trace::compare::terminal_bpb_table`]).
pub fn table(rows: &[ComparisonRow]) -> String {
    let bpb = moelab_trace::compare::terminal_bpb_table(rows);
    let table = moelab_trace::compare::terminal_table(rows);
    if bpb.is_empty() {
        table
    } else {
        format!("{table}\n{bpb}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moelab-ablate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("ablations")).unwrap();
        dir
    }

    const BASE: &str = r#"
[run]
name = "base"
seed = 3
[model]
vocab_size = 64
d_model = 16
n_layers = 1
n_heads = 2
max_seq_len = 8
[model.moe]
n_experts = 2
top_k = 1
expert_ff = 8
[data]
dataset = "nowhere"
seq_len = 8
[data.mixture]
a = 0.5
b = 0.5
[train]
steps = 10
micro_batch = 2
lr = 1e-3
"#;

    fn write(dir: &Path, ablation: &str) -> PathBuf {
        std::fs::write(dir.join("base.toml"), BASE).unwrap();
        let path = dir.join("ablations").join("study.toml");
        std::fs::write(&path, ablation).unwrap();
        path
    }

    /// A variant whose final checkpoint is written but whose final evaluation is not (a
    /// signal or kill during it) is not finished: a re-run resumes it and writes the evaluation.
    /// `train --resume auto` reads the folder the same way.
    #[test]
    fn a_variant_is_finished_only_once_its_final_evaluation_is_written() {
        let dir = temp_dir("finished");
        std::fs::write(dir.join("base.toml"), BASE).unwrap();
        let cfg = Config::load(&dir.join("base.toml"), &[]).unwrap();
        let run = RunDir::new(dir.join("run"));
        std::fs::create_dir_all(run.checkpoint(10)).unwrap();
        std::fs::write(run.checkpoint(10).join("state.json"), "{}").unwrap();
        std::fs::write(run.config(), cfg.to_toml()).unwrap();
        let options = RunOptions {
            run_dir: Some(run.root().to_path_buf()),
            resume: Some(Resume::Auto),
            ..RunOptions::default()
        };
        assert_eq!(finished_step(run.root(), &cfg).unwrap(), None);
        assert_eq!(crate::trainer::finished_step(&cfg, &options).unwrap(), None);
        std::fs::create_dir_all(run.eval()).unwrap();
        std::fs::write(run.eval_json(10), "{}").unwrap();
        assert_eq!(finished_step(run.root(), &cfg).unwrap(), Some(10));
        assert_eq!(
            crate::trainer::finished_step(&cfg, &options).unwrap(),
            Some(10)
        );
        // More steps asked for: unfinished again.
        let mut longer = cfg.clone();
        longer.train.steps = 12;
        assert_eq!(finished_step(run.root(), &longer).unwrap(), None);
        assert_eq!(
            crate::trainer::finished_step(&longer, &options).unwrap(),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loads_resolves_and_defaults() {
        let dir = temp_dir("load");
        let path = write(
            &dir,
            r#"
base = "../base.toml"
set = ["train.steps=4"]
[[variant]]
name = "baseline"
[[variant]]
name = "no_b"
set = ["data.mixture.b=0.0"]
"#,
        );
        let a = Ablation::load(&path).unwrap();
        assert_eq!(a.out_dir, PathBuf::from("runs/ablations/study"));
        assert_eq!(a.variants.len(), 2);
        assert_eq!(a.variants[0].config.run.name, "baseline");
        assert_eq!(a.variants[1].config.train.steps, 4);
        assert_eq!(a.variants[1].config.data.mixture["b"], 0.0);
        assert_eq!(a.variants[0].config.data.mixture["b"], 0.5);
    }

    #[test]
    fn bundled_ablation_files_load() {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../configs/ablations"
        ));
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let a = Ablation::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!a.variants.is_empty());
                seen += 1;
            }
        }
        assert!(seen >= 3, "small, study and study-reduced");
        let study = Ablation::load(&dir.join("study.toml")).unwrap();
        assert_eq!((study.seeds.len(), study.variants.len()), (3, 24));
        // The paper's arms; no_code holds code_text at its share, no_code_to_web moves the
        // code budget to web only.
        let arm = |name: &str| study.variants.iter().find(|v| v.name == name).unwrap();
        for (name, code_text, web, math) in [
            ("full", 0.1, 0.3, 0.15),
            ("no_code", 0.1, 0.36, 0.18),
            ("no_code_to_web", 0.1, 0.45, 0.15),
        ] {
            let m = &arm(name).config.data.mixture;
            assert_eq!((m["code"] == 0.0), name != "full", "{name}");
            assert_eq!(
                (m["code_text"], m["web"], m["math"]),
                (code_text, web, math),
                "{name}"
            );
            assert!(
                (m.values().sum::<f64>() - 1.0).abs() < 1e-9,
                "{name} sums to 1"
            );
        }
    }

    #[test]
    fn seeds_replicate_every_variant_seed_by_seed() {
        let dir = temp_dir("seeds");
        let path = write(
            &dir,
            "base = \"../base.toml\"\nseeds = [4, 9]\n[[variant]]\nname = \"a\"\n[[variant]]\nname = \"b\"\n",
        );
        let a = Ablation::load(&path).unwrap();
        let runs: Vec<(&str, u64, &str)> = a
            .variants
            .iter()
            .map(|v| (v.name.as_str(), v.config.run.seed, v.label.as_str()))
            .collect();
        assert_eq!(
            runs,
            vec![
                ("a", 4, "a/seed-4"),
                ("b", 4, "b/seed-4"),
                ("a", 9, "a/seed-9"),
                ("b", 9, "b/seed-9")
            ]
        );
        assert_eq!(a.seeds, vec![4, 9]);
        let path = write(
            &dir,
            "base = \"../base.toml\"\nseeds = [4, 4]\n[[variant]]\nname = \"a\"\n",
        );
        let err = Ablation::load(&path).unwrap_err().to_string();
        assert!(err.contains("seeds[1]"), "{err}");
    }

    #[test]
    fn refuses_bad_files_naming_the_key() {
        let dir = temp_dir("bad");
        let cases = [
            (
                "base = \"../base.toml\"\nsteps = 3\n[[variant]]\nname = \"a\"\n",
                "steps",
            ),
            (
                "base = \"../base.toml\"\n[[variant]]\nname = \"a\"\nsett = []\n",
                "variant[0]",
            ),
            ("base = \"../base.toml\"\n", "no [[variant]]"),
            (
                "base = \"../base.toml\"\n[[variant]]\nname = \"a\"\n[[variant]]\nname = \"a\"\n",
                "unique",
            ),
            (
                "base = \"../base.toml\"\n[[variant]]\nname = \"a/b\"\n",
                "variant[0].name",
            ),
            (
                "base = \"../base.toml\"\n[[variant]]\nname = \"a\"\n[[variant]]\nname = \"b\"\nset = [\"run.seed=9\"]\n",
                "run.seed",
            ),
            (
                "base = \"../base.toml\"\n[[variant]]\nname = \"a\"\nset = [\"model.bogus=1\"]\n",
                "variant `a`",
            ),
        ];
        for (text, needle) in cases {
            let path = write(&dir, text);
            let err = Ablation::load(&path).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
