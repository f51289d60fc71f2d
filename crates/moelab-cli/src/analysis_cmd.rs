//! `moelab trace`, `moelab analyze`, `moelab plot` and `moelab ablate`: per-token routing of a
//! checkpoint, routing reports, training curves, and mixture ablations with their comparison.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use moelab_train::ablate::{self, Ablation, AblationEvent};
use moelab_train::ablate_launch;
use moelab_train::trace_checkpoint::{tokens_per_domain, trace_checkpoint, TraceOptions};

use crate::progress::TrainProgress;

/// Arguments of `moelab trace`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab trace runs/tiny/checkpoints/step-00000200 --domains code,math --tokens 4096 --out runs/tiny/trace"
)]
pub struct TraceArgs {
    /// Checkpoint folder (or a run folder: its newest checkpoint).
    checkpoint: PathBuf,
    /// Domains to trace, comma-separated (default: every domain of the run's dataset).
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    domains: Vec<String>,
    /// Validation tokens per domain at most (default: the run's data.validation_tokens).
    #[arg(long, value_name = "N")]
    tokens: Option<u64>,
    /// Also record each token's full router distribution (layers x tokens x experts floats).
    #[arg(long)]
    probs: bool,
    /// Output folder: trace.safetensors, index.json, counts.safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Arguments of `moelab analyze`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab analyze runs/tiny runs/tiny/trace --out runs/tiny/report\n\nThe first input is the reference (baseline) for comparisons between inputs."
)]
pub struct AnalyzeArgs {
    /// Run folders (their router/ logs), trace folders (from `moelab trace`), router folders or
    /// single chunk files.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Report folder (report.md, CSV/JSON tables, PNG/SVG plots).
    #[arg(long)]
    out: PathBuf,
    /// Machine-readable output (the report summary).
    #[arg(long)]
    json: bool,
}

/// Arguments of `moelab ablate`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab ablate configs/ablations/small.toml --out runs/ablations/small\n\n\
Variants train one after another on this machine with the same seed and token budget, each in \
OUT/<name> (with `seeds = [..]`: once per seed, in OUT/<name>/seed-<s>); a finished variant is \
skipped and an interrupted one resumed, so re-running the command continues the study. \
--parallel N trains N variants at once as separate processes (on CUDA one GPU each); --slurm \
writes OUT/.variants/ablate.sbatch, a job array with one srun task per variant, and submits it \
with sbatch (--dry-run: only writes it); --compare compares the variants once those have \
finished. The comparison (per-domain validation loss and its delta against the first variant, \
routing JSD of each domain's validation tokens against it, raw and with experts matched; with \
seeds: spread, bootstrap 95% intervals and the noise floor) goes to OUT/comparison/.\n\n\
         moelab ablate ABL.toml --parallel 4\n\
         moelab ablate ABL.toml --slurm --ranks 8 && moelab ablate ABL.toml --compare"
)]
pub struct AblateArgs {
    /// Ablation file (TOML: base, out_dir, set, seeds, [[variant]] name/set).
    ablation: PathBuf,
    /// Output folder (default: the file's out_dir).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Machine-readable output (the comparison rows) at the end.
    #[arg(long)]
    json: bool,
    /// Train up to N variants at once as separate processes (on CUDA, one GPU each).
    #[arg(long, value_name = "N", conflicts_with_all = ["slurm", "compare"])]
    parallel: Option<usize>,
    /// Write a Slurm job array (one srun task per variant) and submit it with sbatch.
    #[arg(long, conflicts_with = "compare")]
    slurm: bool,
    /// With --slurm: write the script, do not submit it.
    #[arg(long, requires = "slurm")]
    dry_run: bool,
    /// With --slurm: ranks (srun tasks, data parallel) per variant.
    #[arg(long, value_name = "N", requires = "slurm", default_value_t = 1)]
    ranks: usize,
    /// Only compare variants trained before (by --parallel or --slurm); all must be finished.
    #[arg(long)]
    compare: bool,
}

/// Runs `moelab trace`.
pub fn trace(args: TraceArgs) -> anyhow::Result<()> {
    let options = TraceOptions {
        domains: args.domains,
        max_tokens: args.tokens,
        router_probs: args.probs,
    };
    let trace = trace_checkpoint(&args.checkpoint, &options)?;
    trace.write(&args.out)?;
    let tokens = tokens_per_domain(&trace);
    let asked = |d: &str| options.domains.is_empty() || options.domains.iter().any(|a| a == d);
    for (domain, _) in tokens.iter().filter(|(d, n)| *n == 0 && asked(d)) {
        eprintln!(
            "warning: domain `{domain}` not traced: its validation split holds no whole \
             sequence (`moelab data inspect` shows its validation tokens)"
        );
    }
    if args.json {
        let json = serde_json::json!({
            "out": args.out,
            "checkpoint": trace.checkpoint,
            "step": trace.step,
            "layers": trace.layers,
            "n_experts": trace.n_experts,
            "top_k": trace.top_k,
            "router_probs": trace.router_probs.is_some(),
            "tokens": tokens.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        });
        outln!(
            "{}",
            serde_json::to_string_pretty(&json).context("serialising the trace summary")?
        );
    } else {
        outln!(
            "traced {} tokens of {} (step {}) into {}",
            trace.n_tokens(),
            trace.checkpoint,
            trace.step,
            args.out.display()
        );
        for (domain, n) in tokens.iter().filter(|(_, n)| *n > 0) {
            outln!("  {domain:<14} {n:>9} tokens");
        }
    }
    Ok(())
}

/// Runs `moelab analyze`.
pub fn analyze(args: AnalyzeArgs) -> anyhow::Result<()> {
    let mut inputs = args
        .inputs
        .iter()
        .map(|p| moelab_trace::report::load_input(p).with_context(|| format!("{}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Vocabulary tables show decoded tokens when the traced run's tokenizer can be found.
    for input in &mut inputs {
        if let Some(trace) = &input.trace {
            match moelab_train::trace_checkpoint::token_texts(std::path::Path::new(
                &trace.checkpoint,
            )) {
                Ok(texts) => input.token_text = Some(texts),
                Err(e) => eprintln!("note: {}: tokens shown as ids ({e})", input.name),
            }
        }
    }
    let summary = moelab_trace::report::analyze(&inputs, &args.out)?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&summary).context("serialising the report summary")?
        );
        return Ok(());
    }
    outln!(
        "report {} ({} files)",
        summary.report.display(),
        summary.files.len()
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.4}"));
    outln!(
        "{:<20} {:>15} {:>12} {:>14}  trace",
        "input",
        "steps",
        "tokens",
        "raw domain JSD"
    );
    for run in &summary.runs {
        let tokens: i64 = run.tokens.values().sum();
        outln!(
            "{:<20} {:>15} {:>12} {:>14}  {}",
            run.name,
            format!("{}..{}", run.step_start, run.step_end),
            tokens,
            fmt(run.mean_domain_jsd),
            if run.has_trace { "yes" } else { "no" }
        );
    }
    for note in &summary.notes {
        outln!("note: {note}");
    }
    Ok(())
}

/// Runs `moelab ablate`.
pub fn ablate(args: AblateArgs) -> anyhow::Result<()> {
    let ablation = Ablation::load(&args.ablation)?;
    let out = args.out.clone().unwrap_or_else(|| ablation.out_dir.clone());
    if args.slurm {
        ablate_slurm(&args, &ablation, &out)
    } else if let Some(parallel) = args.parallel {
        ablate_parallel(&args, &ablation, &out, parallel)
    } else if args.compare {
        print_comparison(&args, &ablate::compare_finished(&ablation, &out)?)
    } else {
        ablate_here(&args, &ablation, &out)
    }
}

/// With --json, stdout holds only the final JSON: progress lines go to stderr.
fn say_line(json: bool) -> impl Fn(String) {
    move |line: String| {
        if json {
            eprintln!("{line}")
        } else {
            outln!("{line}")
        }
    }
}

/// `--slurm`: checks every variant (preparing the datasets once), then writes (and unless
/// --dry-run submits) the job array script.
fn ablate_slurm(args: &AblateArgs, ablation: &Ablation, out: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the moelab binary")?;
    let options = ablate_launch::SlurmOptions {
        exe,
        ranks: args.ranks,
    };
    ablate_launch::check_before_submitting(ablation, out, &mut |line| outln!("{line}"))?;
    let script = ablate_launch::write_slurm_script(ablation, out, &options)?;
    outln!("wrote {}", script.display());
    if !args.dry_run {
        outln!("{}", ablate_launch::submit_slurm(&script)?);
    }
    outln!(
        "when the jobs have finished: moelab ablate {} --out {} --compare",
        args.ablation.display(),
        out.display()
    );
    Ok(())
}

/// `--parallel N`: the variants as N child processes, then the comparison.
fn ablate_parallel(
    args: &AblateArgs,
    ablation: &Ablation,
    out: &Path,
    parallel: usize,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the moelab binary")?;
    let say = say_line(args.json);
    let ran = ablate_launch::run_parallel(ablation, out, parallel, &exe, &mut |l| say(l))?;
    if ran.interrupted {
        say(format!(
            "stopped by signal; run `moelab ablate {} --out {} --parallel {parallel}` again to resume",
            args.ablation.display(),
            out.display()
        ));
        return Ok(());
    }
    print_comparison(args, &ablate::compare_finished(ablation, out)?)
}

/// The default: every variant in turn in this process, with progress bars, then the comparison.
fn ablate_here(args: &AblateArgs, ablation: &Ablation, out: &Path) -> anyhow::Result<()> {
    let json = args.json;
    let say = say_line(json);
    let seeds = if ablation.seeds.is_empty() {
        String::new()
    } else {
        format!(" x {} seeds", ablation.seeds.len())
    };
    say(format!(
        "ablation {}: {} runs{seeds} of {} -> {} (baseline: {})",
        args.ablation.display(),
        ablation.variants.len(),
        ablation.base.display(),
        out.display(),
        ablation.variants.first().map_or("-", |v| v.name.as_str())
    ));
    let mut progress: Option<TrainProgress> = None;
    let mut failure: Option<anyhow::Error> = None;
    let mut on_event = |event: &AblationEvent<'_>| match event {
        AblationEvent::VariantStarted {
            index,
            total,
            name,
            run_dir,
        } => {
            say(format!(
                "[{index}/{total}] {name}: training in {}",
                run_dir.display()
            ));
            let steps = ablation
                .variants
                .iter()
                .find(|v| v.label == *name)
                .map_or(0, |v| v.config.train.steps);
            match TrainProgress::new(steps, &format!("[{name}] ")) {
                Ok(p) => progress = Some(if json { p.lines_to_stderr() } else { p }),
                Err(e) => failure = Some(e),
            }
        }
        AblationEvent::VariantSkipped {
            index,
            total,
            name,
            run_dir,
            step,
        } => say(format!(
            "[{index}/{total}] {name}: skip (finished at step {step} in {})",
            run_dir.display()
        )),
        AblationEvent::Train { event, .. } => {
            if let Some(p) = &mut progress {
                p.on_event(event);
            }
        }
        AblationEvent::VariantFinished { name, summary } => {
            if let Some(mut p) = progress.take() {
                p.finish();
            }
            if summary.interrupted {
                say(format!(
                    "{name}: stopped by signal after step {}",
                    summary.steps
                ));
            } else {
                say(format!("{name}: finished {} steps", summary.steps));
            }
        }
    };
    let outcome = ablate::run_ablation(ablation, out, &mut on_event)?;
    if let Some(e) = failure {
        return Err(e);
    }
    if outcome.interrupted {
        say(format!(
            "stopped by signal; run `moelab ablate {} --out {}` again to resume",
            args.ablation.display(),
            out.display()
        ));
        return Ok(());
    }
    print_comparison(args, &outcome)
}

/// Prints an ablation's comparison: the rows as JSON with --json, else the table and notes.
fn print_comparison(args: &AblateArgs, outcome: &ablate::AblationOutcome) -> anyhow::Result<()> {
    if args.json {
        let json = serde_json::json!({
            "out": outcome.out_dir,
            "comparison": outcome.comparison_dir,
            "rows": outcome.rows,
            "notes": outcome.notes,
        });
        outln!(
            "{}",
            serde_json::to_string_pretty(&json).context("serialising the comparison")?
        );
        return Ok(());
    }
    out!("{}", ablate::table(&outcome.rows));
    for note in &outcome.notes {
        outln!("note: {note}");
    }
    if let Some(dir) = &outcome.comparison_dir {
        outln!("comparison {}", dir.join("comparison.md").display());
    }
    Ok(())
}

/// Arguments of `moelab plot`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab plot runs/ablations/small/baseline runs/ablations/small/no_code --out runs/curves\n\n\
One plot per metric with every run overlaid: training loss, per-domain train and validation loss, \
aux and z loss, load imbalance (means over MoE layers) and task scores, from each run's \
metrics.jsonl; curves.md embeds them."
)]
pub struct PlotArgs {
    /// Run folders (each holds metrics.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output folder (PNG + SVG per metric, curves.md).
    #[arg(long)]
    out: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Short labels for run folders: the folder name, or parent/name where names repeat.
fn run_labels(runs: &[PathBuf]) -> Vec<String> {
    let name = |p: &PathBuf, parts: usize| {
        let comps: Vec<String> = p
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .filter(|c| c != "." && !c.is_empty())
            .collect();
        comps[comps.len().saturating_sub(parts)..].join("/")
    };
    let short: Vec<String> = runs.iter().map(|p| name(p, 1)).collect();
    short
        .iter()
        .zip(runs)
        .map(|(s, p)| {
            if short.iter().filter(|x| *x == s).count() > 1 {
                name(p, 2)
            } else {
                s.clone()
            }
        })
        .collect()
}

/// Runs `moelab plot`.
pub fn plot(args: PlotArgs) -> anyhow::Result<()> {
    let groups: Vec<(String, Vec<PathBuf>)> = run_labels(&args.runs)
        .into_iter()
        .zip(&args.runs)
        .map(|(label, run)| (label, vec![run.clone()]))
        .collect();
    let summary = moelab_trace::curves::plot_curves(&groups, &args.out)?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&summary).context("serialising the summary")?
        );
        return Ok(());
    }
    outln!(
        "{} plots of {} runs in {}",
        summary.plots.len(),
        args.runs.len(),
        args.out.display()
    );
    outln!("curves {}", args.out.join("curves.md").display());
    Ok(())
}
