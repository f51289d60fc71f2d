//! `moelab`: the command-line front of the lab. Thin: parsing, printing, exit codes.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use moelab_model::ModelInfo;
use moelab_train::Config;

/// `println!` that survives a closed stdout (see `out.rs`).
macro_rules! outln {
    () => { $crate::out::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` that survives a closed stdout (see `out.rs`).
macro_rules! out {
    ($($arg:tt)*) => { $crate::out::write_fmt(format_args!($($arg)*)) };
}

mod out;

mod analysis_cmd;
mod batches_cmd;
mod data_cmd;
#[cfg(test)]
mod doc_commands;
mod hf_cmd;
mod mix_cmd;
mod progress;
mod train_cmd;

/// A mixture-of-experts pretraining lab for data-mixture ablations.
#[derive(Debug, Parser)]
#[command(name = "moelab", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tokenize a domain-tagged corpus into shards with a manifest and validation split.
    Prepare(Box<data_cmd::PrepareArgs>),
    /// Inspect prepared data or preview a mixture.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train (or resume) a run from a config.
    Train(train_cmd::TrainArgs),
    /// Evaluate a checkpoint on its run's per-domain validation streams.
    Eval(train_cmd::EvalArgs),
    /// Per-token routing of a checkpoint over its dataset's fixed validation streams.
    Trace(analysis_cmd::TraceArgs),
    /// Routing report (tables, plots, report.md) of runs, traces or router-log chunks.
    Analyze(analysis_cmd::AnalyzeArgs),
    /// Training curves (loss, per-domain loss, aux/z loss, load imbalance, tasks) of runs.
    Plot(analysis_cmd::PlotArgs),
    /// Train every variant of an ablation file and compare per-domain losses and routing.
    Ablate(analysis_cmd::AblateArgs),
    /// Mixture search: draw a swarm of mixtures, fit how each measure responds, propose one.
    #[command(subcommand)]
    Mix(mix_cmd::MixCommand),
    /// Export a checkpoint as a Hugging Face model folder (OLMoE or Mixtral).
    #[command(name = "export-hf")]
    ExportHf(hf_cmd::ExportHfArgs),
    /// Import a Hugging Face OLMoE or Mixtral folder as a step-0 checkpoint.
    #[command(name = "import-hf")]
    ImportHf(hf_cmd::ImportHfArgs),
    /// Text a checkpoint's model writes after a prompt (greedy, or temperature / top-k).
    Sample(batches_cmd::SampleArgs),
    /// Print total and active parameters and training FLOPs per token, per component, and the
    /// memory a training run needs (weights, gradients, optimizer state, activations); with
    /// --ranks, the per-rank memory and per-step communication of a job of N ranks.
    ///
    /// Example: moelab model-info configs/tiny.toml --json
    ///          moelab model-info configs/gpu-c.toml --ranks 8 --expert-parallel 8 --shard-optimizer
    #[command(name = "model-info")]
    ModelInfo {
        /// Run config (TOML).
        config: PathBuf,
        /// Override a config key, e.g. --set model.moe.n_experts=16 (repeatable).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
        /// Sequence length for the attention term (default: model.max_seq_len).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Plan a job of N ranks: per-rank weights, gradients, optimizer state, activations,
        /// all-to-all buffers and the per-step all-to-all and gradient volume.
        #[arg(long, value_name = "N")]
        ranks: Option<u64>,
        /// Ranks per expert-parallel group in the plan (default: the config's dist.expert_parallel).
        #[arg(long = "expert-parallel", value_name = "G")]
        expert_parallel: Option<u64>,
        /// ZeRO-1 in the plan (default: the config's train.shard_optimizer).
        #[arg(long)]
        shard_optimizer: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Time the training step of a config on random tokens: median step time split into
    /// forward, backward and optimizer, tokens/s, MFU and peak GPU memory.
    ///
    /// Example: moelab bench configs/gpu-b.toml --steps 20 --json
    ///          moelab bench configs/tiny.toml --steps 5
    Bench {
        /// Run config (TOML); its run.device, train.precision, micro_batch, global_batch_tokens
        /// (the micro-batches of one step) and seq_len are used.
        config: PathBuf,
        /// Override a config key, e.g. --set train.micro_batch=16 (repeatable).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        overrides: Vec<String>,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Untimed warm-up steps before them.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Start even when the estimated memory exceeds what the device has.
        #[arg(long)]
        ignore_memory_check: bool,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Documents, tokens and validation tokens per domain and source.
    Inspect(data_cmd::InspectArgs),
    /// Target vs realised shares of a config's mixture over the first N sequences.
    Mix(data_cmd::MixArgs),
    /// The exact token ids, targets, domain and source ids `train` feeds at some steps.
    Batches(batches_cmd::BatchesArgs),
    /// Document classifiers: train one, score a prepared dataset with it.
    #[command(subcommand)]
    Classify(ClassifyCommand),
}

#[derive(Debug, Subcommand)]
enum ClassifyCommand {
    /// Train a classifier on positive and negative documents; report held-out quality.
    Train(data_cmd::ClassifyTrainArgs),
    /// Score every document of a prepared dataset into per-shard side files.
    Score(data_cmd::ClassifyScoreArgs),
}

fn main() -> anyhow::Result<()> {
    moelab_kernels::tune_cpu_runtime();
    match Cli::parse().command {
        Command::Prepare(args) => data_cmd::prepare(*args)?,
        Command::Data(DataCommand::Inspect(args)) => data_cmd::inspect(args)?,
        Command::Data(DataCommand::Mix(args)) => data_cmd::mix(args)?,
        Command::Data(DataCommand::Batches(args)) => batches_cmd::batches(args)?,
        Command::Data(DataCommand::Classify(ClassifyCommand::Train(args))) => {
            data_cmd::classify_train(args)?
        }
        Command::Data(DataCommand::Classify(ClassifyCommand::Score(args))) => {
            data_cmd::classify_score(args)?
        }
        Command::Train(args) => train_cmd::run_train(args)?,
        Command::Eval(args) => train_cmd::run_eval(args)?,
        Command::Trace(args) => analysis_cmd::trace(args)?,
        Command::Analyze(args) => analysis_cmd::analyze(args)?,
        Command::Plot(args) => analysis_cmd::plot(args)?,
        Command::Ablate(args) => analysis_cmd::ablate(args)?,
        Command::Mix(command) => mix_cmd::run(command)?,
        Command::ExportHf(args) => hf_cmd::export_hf(args)?,
        Command::ImportHf(args) => hf_cmd::import_hf(args)?,
        Command::Sample(args) => batches_cmd::run_sample(args)?,
        Command::ModelInfo {
            config,
            overrides,
            seq_len,
            ranks,
            expert_parallel,
            shard_optimizer,
            json,
        } => {
            let cfg = Config::load(&config, &overrides)?;
            // Memory at the run's own batch shape: what `train` would need for this config.
            let memory = moelab_model::MemoryEstimate::new(
                &cfg.model,
                cfg.train.micro_batch,
                cfg.data.seq_len,
                cfg.train.precision.compute_dtype(),
            )?;
            let info = ModelInfo::new(&cfg.model, seq_len.unwrap_or(cfg.model.max_seq_len))?;
            let mut parallel = None;
            if ranks.is_some() || expert_parallel.is_some() {
                let parallelism = moelab_model::memory::Parallelism {
                    ranks: ranks.unwrap_or(1),
                    expert_parallel: expert_parallel.unwrap_or(cfg.dist.expert_parallel as u64),
                    shard_optimizer: shard_optimizer || cfg.train.shard_optimizer,
                    micro_batches_per_step: cfg.accumulation_steps() as u64,
                };
                parallel = Some(moelab_model::memory::ParallelPlan::new(
                    &cfg.model,
                    &info,
                    &memory,
                    parallelism,
                )?);
            }
            let info = moelab_model::Sizing {
                info,
                memory,
                parallel,
            };
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&info).context("serialising model info")?
                );
            } else {
                outln!("{} ({})", cfg.run.name, config.display());
                out!("{}", info.table());
            }
        }
        Command::Bench {
            config,
            overrides,
            steps,
            warmup,
            ignore_memory_check,
            json,
        } => {
            let cfg = Config::load(&config, &overrides)?;
            let options = moelab_train::BenchOptions {
                steps,
                warmup,
                ignore_memory_check,
            };
            let report = moelab_train::bench(&cfg, options)?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string(&report).context("serialising the bench report")?
                );
            } else {
                outln!("{}", report.table());
            }
        }
    }
    Ok(())
}
