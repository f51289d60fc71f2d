//! `moelab train` and `moelab eval`: run the trainer and draw its progress.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use moelab_train::{evaluate_checkpoint, train, Config, Event, Resume, RunOptions};

/// Arguments of `moelab train`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab train configs/tiny.toml --set train.steps=50 --resume auto"
)]
pub struct TrainArgs {
    /// Run config (TOML).
    config: PathBuf,
    /// Run folder (default: run.out_dir/run.name).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Resume: `auto` (newest complete checkpoint, or fresh if none) or a checkpoint folder.
    #[arg(long, value_name = "auto|PATH")]
    resume: Option<String>,
    /// Override a config key, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    overrides: Vec<String>,
    /// On resume, accept a changed [data.mixture]; it becomes a new data stage from here on.
    #[arg(long)]
    allow_mixture_change: bool,
}

/// Arguments of `moelab eval`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab eval runs/tiny/checkpoints/step-00000300 --json\n         moelab eval runs/tiny/checkpoints/step-00000300 --dump-logits logits.safetensors --tokens 64"
)]
pub struct EvalArgs {
    /// Checkpoint folder.
    checkpoint: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Instead of evaluating, write the logits on the first validation sequence of each domain
    /// (`input_ids` I64 (B,T), `logits` F32 (B,T,V)) as safetensors, for scripts/hf_parity.py.
    #[arg(long, value_name = "FILE")]
    dump_logits: Option<PathBuf>,
    /// With --dump-logits: tokens per sequence (default: data.seq_len).
    #[arg(long, value_name = "N", requires = "dump_logits")]
    tokens: Option<usize>,
}

/// Runs `moelab train`.
pub fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config, &args.overrides)?;
    let resume = args.resume.map(|r| {
        if r == "auto" {
            Resume::Auto
        } else {
            Resume::Path(r.into())
        }
    });
    let options = RunOptions {
        run_dir: args.run_dir,
        resume,
        allow_mixture_change: args.allow_mixture_change,
    };
    let progress = TrainProgress::new(cfg.train.steps, "")?;
    let mut on_event = |event: &Event| progress.on_event(event);
    let summary = train(cfg, options, &mut on_event)?;
    progress.finish();
    if summary.interrupted {
        println!(
            "stopped by signal after step {}; resume with --resume auto",
            summary.steps
        );
    } else {
        println!(
            "finished {} steps in {}",
            summary.steps,
            summary.run_dir.display()
        );
    }
    Ok(())
}

/// Draws a run's trainer events: a progress bar with lines above it on a terminal, plain lines
/// otherwise; every line starts with `prefix` (the ablation variant, or nothing).
pub(crate) struct TrainProgress {
    bar: ProgressBar,
    interactive: bool,
    total_steps: u64,
    prefix: String,
}

impl TrainProgress {
    /// A printer for a run of `total_steps` steps.
    pub(crate) fn new(total_steps: u64, prefix: &str) -> anyhow::Result<Self> {
        let interactive = std::io::stderr().is_terminal();
        let bar = ProgressBar::new(total_steps);
        if interactive {
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{prefix}{{bar:30}} {{pos}}/{{len}} steps  {{msg}}  ETA {{eta}}"
                ))
                .context("progress bar template")?,
            );
        } else {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        Ok(Self {
            bar,
            interactive,
            total_steps,
            prefix: prefix.to_string(),
        })
    }

    /// Prints a line (above the bar on a terminal).
    pub(crate) fn say(&self, line: &str) {
        let line = format!("{}{line}", self.prefix);
        if self.interactive {
            self.bar.println(line)
        } else {
            println!("{line}")
        }
    }

    /// Draws one trainer event.
    pub(crate) fn on_event(&self, event: &Event) {
        match event {
            Event::Started {
                run_dir,
                start_step,
                total_steps,
                resumed_from,
            } => {
                let from = resumed_from
                    .as_ref()
                    .map_or(String::new(), |p| format!(", resumed from {}", p.display()));
                self.say(&format!(
                    "run {}: steps {start_step}..{total_steps}{from}",
                    run_dir.display()
                ));
                self.bar.set_position(*start_step);
            }
            Event::Step(m) => {
                self.bar.set_position(m.step);
                let msg = format!(
                    "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                    m.loss, m.lr, m.tokens_per_s
                );
                if self.interactive {
                    self.bar.set_message(msg);
                } else {
                    println!(
                        "{}step {:>6}/{}  {msg}  grad {:.3}",
                        self.prefix, m.step, self.total_steps, m.grad_norm
                    );
                }
            }
            Event::Skipped { step, reason } => {
                self.say(&format!("step {step}: skipped ({reason})"))
            }
            Event::Eval(report) => self.say(report.summary().trim_end()),
            Event::Checkpoint(dir) => self.say(&format!("checkpoint {}", dir.display())),
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Runs `moelab eval`.
pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.dump_logits {
        let dump = moelab_train::hf::dump_logits(&args.checkpoint, file, args.tokens)?;
        println!(
            "wrote logits of {} sequences x {} tokens ({}) to {}",
            dump.sequences,
            dump.tokens,
            dump.domains.join(", "),
            file.display()
        );
        return Ok(());
    }
    let report = evaluate_checkpoint(&args.checkpoint)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.summary());
    }
    Ok(())
}
