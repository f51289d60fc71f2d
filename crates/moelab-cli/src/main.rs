//! `moelab`: the command-line front of the lab. Thin: parsing, printing, exit codes.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use moelab_model::ModelInfo;
use moelab_train::Config;

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
    /// Train (or resume) a run from a config.
    Train(train_cmd::TrainArgs),
    /// Evaluate a checkpoint on its run's per-domain validation streams.
    Eval(train_cmd::EvalArgs),
    /// Print total and active parameters and training FLOPs per token, per component.
    ///
    /// Example: moelab model-info configs/tiny.toml --json
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
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Train(args) => train_cmd::run_train(args)?,
        Command::Eval(args) => train_cmd::run_eval(args)?,
        Command::ModelInfo {
            config,
            overrides,
            seq_len,
            json,
        } => {
            let cfg = Config::load(&config, &overrides)?;
            let info = ModelInfo::new(&cfg.model, seq_len.unwrap_or(cfg.model.max_seq_len));
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).context("serialising model info")?
                );
            } else {
                println!("{} ({})", cfg.run.name, config.display());
                print!("{}", info.table());
            }
        }
    }
    Ok(())
}
