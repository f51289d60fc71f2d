//! `moelab export-hf` and `moelab import-hf`: move checkpoints to and from Hugging Face
//! `transformers` model folders (OLMoE or Mixtral).

use std::path::PathBuf;

use clap::Args;

/// Arguments of `moelab export-hf`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab export-hf runs/tiny/checkpoints/step-00000200 --out exports/tiny-hf\n\nThe folder loads with transformers' AutoModelForCausalLM.from_pretrained; check it with\nscripts/hf_parity.py (see `moelab eval --dump-logits`)."
)]
pub struct ExportHfArgs {
    /// Checkpoint folder (checkpoints/step-NNNNNNNN).
    checkpoint: PathBuf,
    /// The new Hugging Face model folder (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Export the model without the run's tokenizer (by default a tokenizer that cannot be
    /// found is an error).
    #[arg(long)]
    no_tokenizer: bool,
}

/// Arguments of `moelab import-hf`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example: moelab import-hf exports/tiny-hf --out imported/step-00000000 --config configs/tiny.toml\n\nThen: moelab train imported/step-00000000/config.toml --resume imported/step-00000000 --run-dir runs/from-hf\nor: moelab eval imported/step-00000000"
)]
pub struct ImportHfArgs {
    /// Hugging Face model folder (config.json + model.safetensors, f32/bf16/f16).
    dir: PathBuf,
    /// The new checkpoint folder (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Run config whose sections other than [model] the checkpoint's config.toml takes.
    #[arg(long)]
    config: PathBuf,
}

/// Runs `moelab export-hf`.
pub fn export_hf(args: ExportHfArgs) -> anyhow::Result<()> {
    let summary = moelab_train::hf_io::export(&args.checkpoint, &args.out, !args.no_tokenizer)?;
    for note in &summary.notes {
        eprintln!("note: {note}");
    }
    outln!(
        "exported {} tensors as {} to {}",
        summary.tensors,
        summary.arch.class_name(),
        summary.dir.display()
    );
    Ok(())
}

/// Runs `moelab import-hf`.
pub fn import_hf(args: ImportHfArgs) -> anyhow::Result<()> {
    let summary = moelab_train::hf_io::import(&args.dir, &args.out, &args.config)?;
    for note in &summary.notes {
        eprintln!("note: {note}");
    }
    outln!(
        "imported {} ({} layers, {} experts, top-{}) as checkpoint {}",
        summary.arch.class_name(),
        summary.model.n_layers,
        summary.model.moe.n_experts,
        summary.model.moe.top_k,
        summary.dir.display()
    );
    Ok(())
}
