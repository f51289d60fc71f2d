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
#[command(after_help = "Example: moelab eval runs/tiny/checkpoints/step-00000300 --json")]
pub struct EvalArgs {
    /// Checkpoint folder.
    checkpoint: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
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
    let interactive = std::io::stderr().is_terminal();
    let bar = ProgressBar::new(cfg.train.steps);
    if interactive {
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                .context("progress bar template")?,
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // Lines above the bar on a terminal, plain lines otherwise.
    let say = |line: String| {
        if interactive {
            bar.println(line)
        } else {
            println!("{line}")
        }
    };
    let mut on_event = |event: &Event| match event {
        Event::Started {
            run_dir,
            start_step,
            total_steps,
            resumed_from,
        } => {
            let from = resumed_from
                .as_ref()
                .map_or(String::new(), |p| format!(", resumed from {}", p.display()));
            say(format!(
                "run {}: steps {start_step}..{total_steps}{from}",
                run_dir.display()
            ));
            bar.set_position(*start_step);
        }
        Event::Step(m) => {
            bar.set_position(m.step);
            let msg = format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                m.loss, m.lr, m.tokens_per_s
            );
            if interactive {
                bar.set_message(msg);
            } else {
                println!(
                    "step {:>6}/{}  {msg}  grad {:.3}",
                    m.step, cfg.train.steps, m.grad_norm
                );
            }
        }
        Event::Skipped { step, reason } => say(format!("step {step}: skipped ({reason})")),
        Event::Eval(report) => say(report.summary()),
        Event::Checkpoint(dir) => say(format!("checkpoint {}", dir.display())),
    };
    let summary = train(cfg.clone(), options, &mut on_event)?;
    bar.finish_and_clear();
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

/// Runs `moelab eval`.
pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let report = evaluate_checkpoint(&args.checkpoint)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.summary());
    }
    Ok(())
}
