//! What a user sees while work runs: a progress bar on a terminal with lines above it, plain
//! lines on stdout otherwise (logs, pipes). The bar is cleared at the end; the lines stay.

use std::io::IsTerminal;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moelab_data::PrepareEvent;
use moelab_train::{Event, StepMetrics, Summary};

/// True when both stdout and stderr are a terminal: the bar (stderr) and the lines share it.
fn interactive() -> bool {
    std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// A bar on a terminal, nothing otherwise; its lines go above it, or to stdout.
struct Bar {
    bar: ProgressBar,
    interactive: bool,
    prefix: String,
    /// Plain lines go to stderr (stdout is reserved for `--json`).
    stderr: bool,
}

impl Bar {
    fn new(len: u64, template: &str, prefix: &str) -> anyhow::Result<Self> {
        let interactive = interactive();
        let bar = ProgressBar::new(len);
        if interactive {
            bar.set_style(
                ProgressStyle::with_template(&format!("{prefix}{template}"))
                    .context("progress bar template")?
                    .progress_chars("=> "),
            );
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        Ok(Self {
            bar,
            interactive,
            prefix: prefix.to_string(),
            stderr: false,
        })
    }

    /// Clears the bar for good: later lines are printed plainly, so no bar is drawn again.
    fn finish(&mut self) {
        self.bar.finish_and_clear();
        self.interactive = false;
    }

    /// A line that stays: above the bar on a terminal, on stdout otherwise.
    fn say(&self, line: &str) {
        for line in line.lines() {
            let line = format!("{}{line}", self.prefix);
            if self.interactive {
                self.bar.println(line)
            } else if self.stderr {
                eprintln!("{line}")
            } else {
                outln!("{line}")
            }
        }
    }
}

/// Draws the progress of preparing a corpus (`moelab prepare`, and `train` on first use).
pub(crate) struct PrepareProgress {
    bar: Bar,
}

impl PrepareProgress {
    /// A printer whose lines start with `prefix`.
    pub(crate) fn new(prefix: &str) -> anyhow::Result<Self> {
        Ok(Self {
            bar: Bar::new(
                0,
                "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                prefix,
            )?,
        })
    }

    /// Sends the plain lines to stderr, keeping stdout for the command's own output.
    pub(crate) fn lines_to_stderr(mut self) -> Self {
        self.bar.stderr = true;
        self
    }

    /// Draws one event.
    pub(crate) fn on_event(&self, event: &PrepareEvent) {
        let bar = &self.bar.bar;
        match event {
            PrepareEvent::Found { files, bytes } => {
                bar.set_length(*bytes);
                bar.set_message("reading");
                self.bar.say(&format!(
                    "reading {files} files ({:.1} MB)",
                    *bytes as f64 / 1e6
                ));
            }
            PrepareEvent::FileRead { bytes, .. } => bar.inc(*bytes),
            PrepareEvent::TrainingTokenizer { files } => {
                bar.set_message("training");
                self.bar
                    .say(&format!("training a BPE tokenizer on {files} files"));
            }
            PrepareEvent::Encoding { units, reused } => {
                bar.set_position(0);
                bar.set_message("encoding");
                if *reused > 0 {
                    self.bar.say(&format!(
                        "{reused} of {units} units are complete from a previous run: kept"
                    ));
                }
            }
            PrepareEvent::UnitDone { bytes, .. } => bar.inc(*bytes),
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&mut self) {
        self.bar.finish();
    }
}

/// Draws a run's trainer events; every line starts with `prefix` (the ablation variant, or
/// nothing).
pub(crate) struct TrainProgress {
    bar: Bar,
    total_steps: u64,
    prefix: String,
    prepare: Option<PrepareProgress>,
}

impl TrainProgress {
    /// A printer for a run of `total_steps` steps.
    pub(crate) fn new(total_steps: u64, prefix: &str) -> anyhow::Result<Self> {
        Ok(Self {
            bar: Bar::new(
                total_steps,
                "{bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
                prefix,
            )?,
            total_steps,
            prefix: prefix.to_string(),
            prepare: None,
        })
    }

    /// Sends the plain lines to stderr, keeping stdout for machine-readable output.
    pub(crate) fn lines_to_stderr(mut self) -> Self {
        self.bar.stderr = true;
        self
    }

    /// Prints a line that stays.
    pub(crate) fn say(&self, line: &str) {
        self.bar.say(line);
    }

    /// Draws one trainer event.
    pub(crate) fn on_event(&mut self, event: &Event) {
        if !matches!(event, Event::Preparing(_)) {
            if let Some(mut prepare) = self.prepare.take() {
                prepare.finish();
                self.say("data prepared");
            }
        }
        match event {
            Event::Preparing(e) => {
                if self.prepare.is_none() {
                    self.say("preparing the dataset from data.sources (first use)");
                    let stderr = self.bar.stderr;
                    self.prepare = PrepareProgress::new(&self.prefix).ok().map(|p| {
                        if stderr {
                            p.lines_to_stderr()
                        } else {
                            p
                        }
                    });
                }
                if let Some(prepare) = &self.prepare {
                    prepare.on_event(e);
                }
            }
            Event::Validation(check) => {
                self.say(&check.line());
                for warning in check.warnings() {
                    self.bar.bar.suspend(|| eprintln!("warning: {warning}"));
                }
            }
            Event::Started {
                run_dir,
                start_step,
                total_steps,
                resumed_from,
                set_aside,
            } => {
                let from = resumed_from
                    .as_ref()
                    .map_or(String::new(), |p| format!(", resumed from {}", p.display()));
                self.say(&format!(
                    "run {}: steps {}..{total_steps}{from}",
                    run_dir.display(),
                    start_step + 1
                ));
                if let Some(dir) = set_aside {
                    self.say(&format!(
                        "the checkpoints past step {start_step} (an earlier continuation) were moved to {}",
                        dir.display()
                    ));
                }
                self.bar.bar.set_position(*start_step);
            }
            Event::Layout(ranks) => {
                for r in ranks {
                    self.say(&format!(
                        "rank {}: experts {}..{} of every MoE layer, parameters {}, optimizer state {}",
                        r.rank,
                        r.experts.start,
                        r.experts.end,
                        moelab_model::fmt_bytes(r.parameter_bytes),
                        moelab_model::fmt_bytes(r.optimizer_bytes)
                    ));
                }
            }
            Event::Step(m) => {
                self.bar.bar.set_position(m.step);
                self.bar
                    .bar
                    .set_message(format!("loss {:.4}  {:.0} tok/s", m.loss, m.tokens_per_s));
                self.say(&step_line(m, self.total_steps));
            }
            Event::Skipped { step, reason } => {
                self.say(&format!("step {step}: skipped ({reason})"))
            }
            Event::Eval(report) => self.say(report.summary().trim_end()),
            Event::Checkpoint(dir) => self.say(&format!("checkpoint {}", dir.display())),
        }
    }

    /// Removes the bar; later lines are printed plainly.
    pub(crate) fn finish(&mut self) {
        self.bar.finish();
    }
}

/// One logged step: loss, learning rate, gradient norm, throughput, mean aux loss and the worst
/// layer's load imbalance.
fn step_line(m: &StepMetrics, total_steps: u64) -> String {
    let aux = m.aux_loss.iter().sum::<f64>() / m.aux_loss.len().max(1) as f64;
    let imbalance = m.load_imbalance.iter().copied().fold(0.0, f64::max);
    let width = total_steps.to_string().len();
    format!(
        "step {:>width$}/{total_steps}  loss {:.4}  lr {:.2e}  grad {:.3}  {:.0} tok/s  aux {:.4}  imbalance {:.2}",
        m.step, m.loss, m.lr, m.grad_norm, m.tokens_per_s, aux, imbalance
    )
}

/// The closing block of a run: what was done, the validation loss per domain, what to run next.
pub(crate) fn summary_lines(summary: &Summary) -> String {
    let mut lines = Vec::new();
    if summary.already_finished {
        return format!(
            "{} is already finished: its checkpoint and final evaluation at step {} are written; nothing was done or changed (raise train.steps to train further)",
            summary.run_dir.display(),
            summary.steps
        );
    }
    if summary.interrupted {
        lines.push(format!(
            "stopped by signal after step {}; resume with --resume auto",
            summary.steps
        ));
    } else {
        lines.push(format!(
            "finished {} steps in {} ({} steps in {:.1} s, {:.0} tokens/s)",
            summary.steps,
            summary.run_dir.display(),
            summary.steps_run,
            summary.wall_s,
            summary.tokens_per_s
        ));
    }
    if let Some(eval) = &summary.final_eval {
        let losses: Vec<String> = eval
            .domains
            .iter()
            .filter(|d| d.tokens > 0)
            .map(|d| format!("{} {:.4}", d.domain, d.loss))
            .collect();
        lines.push(format!(
            "validation loss (nats/token): {}",
            losses.join(", ")
        ));
    }
    if !summary.interrupted {
        let run = summary.run_dir.display();
        lines.push(format!(
            "next: moelab trace {run} --out {run}/trace && moelab analyze {run} {run}/trace --out {run}/report"
        ));
    }
    lines.join("\n")
}
