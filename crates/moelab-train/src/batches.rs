//! `moelab data batches`: the exact batches `moelab train` feeds at a range of steps, for
//! another framework or for debugging a mixture. The batches come from the trainer's own path:
//! the config's [`MixtureStream`] (a fresh run's stream, as [`crate::Trainer`] builds it) read
//! through the same [`Prefetcher`] the training loop reads, one rank's share of each step.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use moelab_data::{Batch, MixtureStream, Prefetcher};
use serde::Serialize;

use crate::{Config, TrainError};

/// The most tokens one export holds (inputs and targets each); far above any debugging need,
/// far below what would exhaust memory while the safetensors file is built.
pub const MAX_EXPORT_TOKENS: u64 = 1 << 27;

/// Which batches to export.
#[derive(Debug, Clone, Copy)]
pub struct BatchesOptions {
    /// First step, numbered from 1 as in metrics.jsonl.
    pub first_step: u64,
    /// Last step (inclusive).
    pub last_step: u64,
    /// The rank whose share is exported.
    pub rank: usize,
    /// Ranks of the data-parallel job (`mpirun -n N`).
    pub ranks: usize,
}

/// One step's batch on one rank, as the trainer consumes it.
#[derive(Debug, Clone)]
pub struct StepBatch {
    /// The step (from 1).
    pub step: u64,
    /// This rank's sequences of the step, in the order the trainer splits them into
    /// micro-batches of `train.micro_batch`.
    pub batch: Batch,
}

/// What `moelab data batches` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct BatchesSummary {
    /// The file written.
    pub file: PathBuf,
    /// `safetensors` or `jsonl`.
    pub format: String,
    /// First and last step (inclusive).
    pub steps: [u64; 2],
    /// The rank exported.
    pub rank: usize,
    /// Ranks of the job.
    pub ranks: usize,
    /// Sequences per step on this rank.
    pub sequences_per_step: usize,
    /// Sequences per micro-batch (`train.micro_batch`).
    pub micro_batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Domain names; a domain id indexes this list.
    pub domains: Vec<String>,
    /// Source names per domain; a source id indexes its domain's list.
    pub sources: Vec<Vec<String>>,
}

/// The batches of steps `first_step..=last_step` on `rank` of `ranks`, read as the trainer
/// reads them (the config's stream from its start, the dataset prepared on first use).
pub fn step_batches(
    cfg: &Config,
    options: BatchesOptions,
) -> Result<(Arc<MixtureStream>, Vec<StepBatch>), TrainError> {
    let BatchesOptions {
        first_step,
        last_step,
        rank,
        ranks,
    } = options;
    let argument = |m: String| Err(TrainError::Argument(m));
    if first_step == 0 || last_step < first_step {
        return argument(format!(
            "--steps {first_step}..{last_step}: steps are numbered from 1 (as in metrics.jsonl) and the range A..B needs 1 <= A <= B"
        ));
    }
    if last_step > cfg.train.steps {
        return argument(format!(
            "--steps {first_step}..{last_step}: the run trains {} steps (train.steps); export at most up to step {}, or raise train.steps with --set",
            cfg.train.steps, cfg.train.steps
        ));
    }
    if ranks == 0 || rank >= ranks {
        return argument(format!(
            "--rank {rank} is not one of the {ranks} ranks (--ranks); ranks are numbered from 0"
        ));
    }
    let sequences = cfg.global_sequences();
    if !sequences.is_multiple_of(ranks * cfg.train.micro_batch) {
        return argument(format!(
            "--ranks {ranks}: the {sequences} sequences per step (train.global_batch_tokens) do not split into whole micro-batches of {} over {ranks} ranks, so `moelab train` refuses this job too",
            cfg.train.micro_batch
        ));
    }
    let steps = last_step - first_step + 1;
    let tokens = steps
        .saturating_mul((sequences / ranks) as u64)
        .saturating_mul(cfg.data.seq_len as u64);
    if tokens > MAX_EXPORT_TOKENS {
        return argument(format!(
            "--steps {first_step}..{last_step} holds {tokens} tokens on rank {rank}, more than the {MAX_EXPORT_TOKENS} one export may hold; export a shorter range (several files)"
        ));
    }
    let dataset = Arc::new(moelab_data::ensure_prepared(&cfg.data)?);
    let stream = Arc::new(MixtureStream::new(dataset, &cfg.data, cfg.run.seed)?);
    // The training loop's reader: step s (from 1) is batch index s - 1.
    let reader = Prefetcher::new(stream.clone(), first_step - 1, sequences, rank, ranks, 2);
    let mut out = Vec::with_capacity(steps as usize);
    for (step, batch) in (first_step..=last_step).zip(reader) {
        out.push(StepBatch {
            step,
            batch: batch?,
        });
    }
    Ok((stream, out))
}

/// Exports steps `options` of `cfg` to `file`: safetensors, or JSON lines when `file` ends in
/// `.jsonl` (one object per step).
pub fn export_batches(
    cfg: &Config,
    options: BatchesOptions,
    file: &Path,
) -> Result<BatchesSummary, TrainError> {
    let (stream, batches) = step_batches(cfg, options)?;
    let dataset = stream.dataset();
    let domains = dataset.domains().to_vec();
    let sources: Vec<Vec<String>> = (0..domains.len()).map(|d| dataset.sources(d)).collect();
    let jsonl = file.extension().is_some_and(|e| e == "jsonl");
    let summary = BatchesSummary {
        file: file.to_path_buf(),
        format: if jsonl { "jsonl" } else { "safetensors" }.into(),
        steps: [options.first_step, options.last_step],
        rank: options.rank,
        ranks: options.ranks,
        sequences_per_step: cfg.global_sequences() / options.ranks,
        micro_batch: cfg.train.micro_batch,
        seq_len: cfg.data.seq_len,
        domains,
        sources,
    };
    let bytes = if jsonl {
        jsonl_bytes(&batches)?
    } else {
        safetensors_bytes(&batches, &summary)?
    };
    moelab_io::write_atomic(file, &bytes).map_err(TrainError::io(file))?;
    Ok(summary)
}

/// One JSON object per step: `step`, then per sequence `tokens`, `targets`, `domain_ids`,
/// `source_ids`.
fn jsonl_bytes(batches: &[StepBatch]) -> Result<Vec<u8>, TrainError> {
    let mut bytes = Vec::new();
    for StepBatch { step, batch } in batches {
        let rows = |ids: &[u32]| -> Vec<Vec<u32>> {
            ids.chunks(batch.seq_len.max(1))
                .map(<[u32]>::to_vec)
                .collect()
        };
        let line = serde_json::json!({
            "step": step,
            "tokens": rows(&batch.tokens),
            "targets": rows(&batch.targets),
            "domain_ids": batch.domain_ids,
            "source_ids": batch.source_ids,
        });
        serde_json::to_writer(&mut bytes, &line)
            .map_err(|e| TrainError::Argument(format!("serialising step {step}: {e}")))?;
        bytes
            .write_all(b"\n")
            .map_err(|e| TrainError::Argument(format!("serialising step {step}: {e}")))?;
    }
    Ok(bytes)
}

/// `tokens`, `targets` U32 (steps, sequences, seq_len), `domain_ids`, `source_ids` U32 (steps,
/// sequences), `steps` I64 (steps); the metadata names the domains and sources and the split.
fn safetensors_bytes(
    batches: &[StepBatch],
    summary: &BatchesSummary,
) -> Result<Vec<u8>, TrainError> {
    let (n, seq, steps) = (summary.sequences_per_step, summary.seq_len, batches.len());
    let gather = |pick: &dyn Fn(&Batch) -> &Vec<u32>| -> Vec<u32> {
        batches
            .iter()
            .flat_map(|b| pick(&b.batch).clone())
            .collect()
    };
    let cpu = &Device::Cpu;
    let step_ids: Vec<i64> = batches.iter().map(|b| b.step as i64).collect();
    let tensors: HashMap<String, Tensor> = HashMap::from([
        (
            "tokens".to_string(),
            Tensor::from_vec(gather(&|b| &b.tokens), (steps, n, seq), cpu)?,
        ),
        (
            "targets".to_string(),
            Tensor::from_vec(gather(&|b| &b.targets), (steps, n, seq), cpu)?,
        ),
        (
            "domain_ids".to_string(),
            Tensor::from_vec(gather(&|b| &b.domain_ids), (steps, n), cpu)?,
        ),
        (
            "source_ids".to_string(),
            Tensor::from_vec(gather(&|b| &b.source_ids), (steps, n), cpu)?,
        ),
        ("steps".to_string(), Tensor::from_vec(step_ids, steps, cpu)?),
    ]);
    let json = |v: serde_json::Value| v.to_string();
    let metadata = HashMap::from([
        ("format".to_string(), "moelab-batches-v1".to_string()),
        ("rank".to_string(), summary.rank.to_string()),
        ("ranks".to_string(), summary.ranks.to_string()),
        ("micro_batch".to_string(), summary.micro_batch.to_string()),
        ("seq_len".to_string(), summary.seq_len.to_string()),
        (
            "domains".to_string(),
            json(serde_json::json!(summary.domains)),
        ),
        (
            "sources".to_string(),
            json(serde_json::json!(summary.sources)),
        ),
    ]);
    safetensors::serialize(&tensors, Some(metadata))
        .map_err(|e| TrainError::Argument(format!("serialising the batches: {e}")))
}
