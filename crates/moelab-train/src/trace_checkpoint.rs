//! Tracing a checkpoint: per-token routing over the fixed validation streams of the run's
//! dataset (input, target, prediction, domain, source, position, and per MoE layer the chosen
//! experts and gate weights), the input of `moelab analyze`.
//!
//! The validation streams do not depend on the mixture, so traces of different ablation variants
//! cover exactly the same tokens; the same checkpoint always gives the same trace.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use moelab_data::{Batch, Dataset};
use moelab_model::{ForwardOptions, MoeTransformer};
use moelab_trace::{Trace, TraceBatch, TraceBuilder};

use crate::checkpoint;
use crate::run::device::set_threads;
use crate::run::load::{load_model, open_run_data};
use crate::TrainError;

/// What to trace.
#[derive(Debug, Clone, Default)]
pub struct TraceOptions {
    /// Domains to trace, by name, in this order (empty = every domain of the dataset).
    pub domains: Vec<String>,
    /// Tokens per domain at most (default: the run's `data.validation_tokens`).
    pub max_tokens: Option<u64>,
    /// Also record each token's full router distribution (L x N x E floats: large).
    pub router_probs: bool,
}

/// Traces `checkpoint` (a checkpoint folder, or a run folder's newest checkpoint) over its
/// dataset's validation streams; deterministic for a checkpoint and thread count.
pub fn trace_checkpoint(checkpoint: &Path, options: &TraceOptions) -> Result<Trace, TrainError> {
    let checkpoint = checkpoint::resolve(checkpoint)?;
    let device = Device::Cpu;
    let (cfg, model, ckpt) = load_model(&checkpoint, &device)?;
    // The trainer's thread setting, so a trace is reproducible.
    set_threads(cfg.run.threads);
    let dataset: Dataset = open_run_data(&cfg, &checkpoint)?;
    let selected = select_domains(&dataset, &options.domains)?;
    let layers: Vec<usize> = (0..cfg.model.n_layers)
        .filter(|&l| cfg.model.is_moe_layer(l))
        .collect();
    if layers.is_empty() {
        return Err(TrainError::Argument(format!(
            "{}: the model is dense (model.moe.n_experts = 0); there is no routing to trace",
            checkpoint.display()
        )));
    }
    let seq_len = cfg.data.seq_len;
    let max_tokens = options.max_tokens.unwrap_or(cfg.data.validation_tokens);
    if max_tokens < seq_len as u64 {
        return Err(TrainError::Argument(format!(
            "--tokens {max_tokens} is less than one sequence (data.seq_len = {seq_len})"
        )));
    }
    let mut builder = TraceBuilder::new(
        layers,
        dataset.domains().to_vec(),
        cfg.model.moe.n_experts,
        cfg.model.moe.top_k,
    )
    .checkpoint(checkpoint.display().to_string(), ckpt.state.step);
    // A domain whose validation split holds no whole sequence is left out (its tokens stay 0,
    // as in evaluation); only when nothing at all can be traced is that an error.
    let plan = dataset.validation_plan(seq_len, max_tokens);
    let mut short = Vec::new();
    for &domain in &selected {
        if let Some(why) = plan.get(domain).and_then(|p| p.shortfall.clone()) {
            short.push(why);
            continue;
        }
        let batches =
            dataset.validation_batches(domain, seq_len, max_tokens, cfg.train.micro_batch)?;
        for batch in &batches {
            trace_batch(&model, batch, options.router_probs, &mut builder, &device)?;
        }
    }
    if short.len() == selected.len() {
        return Err(TrainError::Argument(format!(
            "{}: nothing to trace: {}",
            checkpoint.display(),
            short.join("; ")
        )));
    }
    Ok(builder.finish())
}

/// Domain ids of the requested names (all domains when none), erroring on an unknown name with
/// the list of the dataset's domains.
fn select_domains(dataset: &Dataset, names: &[String]) -> Result<Vec<usize>, TrainError> {
    let all = dataset.domains();
    if names.is_empty() {
        return Ok((0..all.len()).collect());
    }
    let mut selected = Vec::new();
    for name in names {
        let id = all.iter().position(|d| d == name).ok_or_else(|| {
            TrainError::Argument(format!(
                "unknown domain `{name}` in --domains; the dataset {} has: {}",
                dataset.dir().display(),
                all.join(", ")
            ))
        })?;
        if !selected.contains(&id) {
            selected.push(id);
        }
    }
    Ok(selected)
}

/// Runs one validation batch through the model and appends its per-token records.
fn trace_batch(
    model: &MoeTransformer,
    batch: &Batch,
    router_probs: bool,
    builder: &mut TraceBuilder,
    device: &Device,
) -> Result<(), TrainError> {
    let (n, t) = (batch.n_sequences, batch.seq_len);
    let input = Tensor::from_slice(&batch.tokens, (n, t), device)?;
    let out = model.forward(&input, None, ForwardOptions::default())?;
    let predicted = out
        .logits()?
        .argmax(D::Minus1)?
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    let per_token = |per_sequence: &[u32]| -> Vec<u32> {
        per_sequence
            .iter()
            .flat_map(|&x| std::iter::repeat_n(x, t))
            .collect()
    };
    let domain_ids = per_token(&batch.domain_ids);
    let source_ids = per_token(&batch.source_ids);
    let positions: Vec<u32> = (0..n).flat_map(|_| 0..t as u32).collect();
    let mut routing: Vec<_> = out.routing.iter().collect();
    routing.sort_by_key(|r| r.layer);
    let mut expert_ids = Vec::with_capacity(routing.len());
    let mut gate_weights = Vec::with_capacity(routing.len());
    let mut probs = Vec::new();
    for r in routing {
        expert_ids.push(
            r.expert_ids
                .flatten_all()?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?,
        );
        gate_weights.push(
            r.gate_weights
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?,
        );
        if router_probs {
            probs.push(
                r.router_probs
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
    }
    builder.push(TraceBatch {
        token_ids: &batch.tokens,
        target_ids: &batch.targets,
        predicted_ids: &predicted,
        domain_ids: &domain_ids,
        source_ids: &source_ids,
        positions: &positions,
        expert_ids: &expert_ids,
        gate_weights: &gate_weights,
        router_probs: router_probs.then_some(probs.as_slice()),
    })?;
    Ok(())
}

/// Tokens of each domain in a trace, in the trace's domain order (domains not traced: 0).
pub fn tokens_per_domain(trace: &Trace) -> Vec<(String, u64)> {
    let mut counts = vec![0u64; trace.domains.len()];
    for &d in &trace.domain_ids {
        if let Some(c) = counts.get_mut(d as usize) {
            *c += 1;
        }
    }
    trace.domains.iter().cloned().zip(counts).collect()
}

/// The text of every token id of the tokenizer of the run that wrote `checkpoint` (the
/// checkpoint folder a trace names), for vocabulary tables.
pub fn token_texts(checkpoint: &Path) -> Result<Vec<String>, TrainError> {
    use crate::tasks::Codec;
    let checkpoint = checkpoint::resolve(checkpoint)?;
    let cfg = crate::Config::load(&checkpoint.join("config.toml"), &[])?;
    let dataset = open_run_data(&cfg, &checkpoint)?;
    let codec = crate::tasks::TokenizerCodec::open(&dataset.tokenizer_path())?;
    (0..dataset.vocab_size() as u32)
        .map(|id| codec.decode(&[id]))
        .collect()
}
