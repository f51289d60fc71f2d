//! `moelab data batches` (the exact batches `train` feeds at some steps) and `moelab sample`
//! (text a checkpoint's model writes after a prompt).

use std::path::PathBuf;

use anyhow::Context;
use moelab_train::batches::{export_batches, BatchesOptions};
use moelab_train::checkpoint;
use moelab_train::sample::{sample, SampleOptions};
use moelab_train::Config;

/// Arguments of `moelab data batches`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example: moelab data batches configs/tiny.toml --steps 1..10 --out batches.safetensors\n\
         Example (rank 1 of 2, as JSON lines): moelab data batches configs/tiny.toml --steps 5..5 --rank 1 --ranks 2 --out rank1.jsonl\n\n\
         The file holds `tokens` and `targets` U32 (steps, sequences, seq_len), `domain_ids` and\n\
         `source_ids` U32 (steps, sequences) and `steps` I64; its metadata names the domains, the\n\
         sources and train.micro_batch (the trainer splits each step's sequences into micro-batches\n\
         of that many, in order). A .jsonl file holds one object per step instead. The stream is\n\
         that of a fresh run of CONFIG (its [[data.stages]] included); a mixture changed on resume\n\
         with --allow-mixture-change lives in the run's checkpoints, not in CONFIG.\n\
         Python: safetensors.numpy.load_file(\"batches.safetensors\")"
)]
pub struct BatchesArgs {
    /// Run config (TOML); the stream of a fresh run of it is exported.
    config: PathBuf,
    /// Steps A..B, both included, numbered from 1 as in metrics.jsonl (one step: A..A).
    #[arg(long, value_name = "A..B", value_parser = parse_steps)]
    steps: (u64, u64),
    /// The rank whose share of each step is exported (0-based).
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// Ranks of the data-parallel job (`mpirun -n N`).
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// Override a config key, e.g. --set data.mixture.code=0 (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    overrides: Vec<String>,
    /// Output file: safetensors, or JSON lines when it ends in .jsonl.
    #[arg(long)]
    out: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// `A..B` (or `A..=B`, or a single step `A`).
fn parse_steps(text: &str) -> Result<(u64, u64), String> {
    let parse = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("`{text}` is not a step range A..B (e.g. 1..10)"))
    };
    match text.split_once("..") {
        Some((a, b)) => Ok((parse(a)?, parse(b.strip_prefix('=').unwrap_or(b))?)),
        None => parse(text).map(|a| (a, a)),
    }
}

/// Runs `moelab data batches`.
pub fn batches(args: BatchesArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config, &args.overrides)?;
    let options = BatchesOptions {
        first_step: args.steps.0,
        last_step: args.steps.1,
        rank: args.rank,
        ranks: args.ranks,
    };
    let summary = export_batches(&cfg, options, &args.out)?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&summary).context("serialising")?
        );
        return Ok(());
    }
    outln!(
        "wrote steps {}..{} (rank {} of {}: {} sequences of {} tokens per step, micro-batches of {}) to {}",
        summary.steps[0],
        summary.steps[1],
        summary.rank,
        summary.ranks,
        summary.sequences_per_step,
        summary.seq_len,
        summary.micro_batch,
        summary.file.display()
    );
    outln!("domains: {}", summary.domains.join(", "));
    Ok(())
}

/// Arguments of `moelab sample`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example: moelab sample runs/tiny --prompt \"def add(a, b):\" --max-tokens 40\n\
         Example: moelab sample runs/tiny/checkpoints/step-00000200 --prompt \"The\" --temperature 0.8 --top-k 50 --seed 1\n\n\
         Temperature 0 (the default) is greedy decoding, the evaluation's own; generation stops at\n\
         the end-of-document token. The same seed gives the same text."
)]
pub struct SampleArgs {
    /// Checkpoint folder, or a run folder (its newest complete checkpoint).
    checkpoint: PathBuf,
    /// The prompt, encoded with the run's tokenizer.
    #[arg(
        long,
        required_unless_present = "prompt_ids",
        conflicts_with = "prompt_ids"
    )]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids instead of text (e.g. from `data batches`).
    #[arg(long, value_delimiter = ',', value_name = "ID,ID,...")]
    prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_tokens: usize,
    /// 0 = greedy; above 0 the logits are divided by it before sampling.
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "T",
        allow_hyphen_values = true
    )]
    temperature: f64,
    /// Sample only among the K likeliest tokens (0 = all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Print the prompt and generated token ids and the text as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `moelab sample`.
pub fn run_sample(args: SampleArgs) -> anyhow::Result<()> {
    let checkpoint = checkpoint::resolve(&args.checkpoint)?;
    let options = SampleOptions {
        prompt: args.prompt.clone(),
        prompt_ids: args.prompt_ids,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    let generated = sample(&checkpoint, &options)?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&generated).context("serialising")?
        );
        return Ok(());
    }
    outln!("{}{}", args.prompt.unwrap_or_default(), generated.text);
    Ok(())
}
