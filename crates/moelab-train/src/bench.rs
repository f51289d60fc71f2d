//! `moelab bench`: the training step of a config timed on random tokens, split into forward,
//! backward and optimizer, with throughput, MFU and peak device memory. The same shapes run in
//! the PyTorch peer (`scripts/peer_torch.py`), so the two lines of its table compare like for like.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use moelab_data::Batch;
use moelab_io::rng::SplitMix64;
use moelab_model::ModelInfo;
use serde::Serialize;

use crate::config::{DeviceKind, Precision};
use crate::router_logger::RouterLogger;
use crate::run::device::{check_memory, open_device, set_threads};
use crate::trainer::{Learner, Phase, GPU_PEAK_FLOPS};
use crate::{Config, TrainError};

/// How long to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Timed steps (the median is reported).
    pub steps: usize,
    /// Untimed steps first (CUDA kernel loading and allocator warm-up).
    pub warmup: usize,
    /// Start even when the estimated memory exceeds what the device has.
    pub ignore_memory_check: bool,
}

/// What `moelab bench` reports; every time is a median over the timed steps.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `run.name` of the config.
    pub config: String,
    /// "cpu" or "cuda".
    pub device: String,
    /// Compute precision.
    pub precision: Precision,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per step: the config's gradient accumulation, as `moelab train` runs it
    /// (and the peer with the same config).
    pub micro_batches: usize,
    /// How many of them ran at once (CPU: one per thread). Above 1 the forward and backward
    /// passes of different micro-batches overlap: only `forward_backward_ms` is given, and
    /// `forward_ms` / `backward_ms` are absent.
    pub concurrent_micro_batches: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Whole step: forward + backward + clip + AdamW.
    pub step_ms: f64,
    /// Forward and backward passes together (the step less the optimizer).
    pub forward_backward_ms: f64,
    /// Forward pass including the loss; absent when micro-batches overlap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_ms: Option<f64>,
    /// Backward pass; absent when micro-batches overlap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backward_ms: Option<f64>,
    /// Gradient norm, clipping and the AdamW update.
    pub optimizer_ms: f64,
    /// micro_batches * micro_batch * seq_len / step time.
    pub tokens_per_s: f64,
    /// 6 x active parameters (input embedding excluded) + attention, per token.
    pub flops_per_token: u64,
    /// Achieved model FLOP/s, in TFLOP/s.
    pub model_tflops: f64,
    /// Model FLOP/s over 989 TFLOP/s (dense bf16 peak of the H100/H200 class); CUDA only.
    pub mfu: Option<f64>,
    /// Measured matmul throughput on this device: bf16 8192^3 on CUDA, f32 1024^3 on CPU.
    pub matmul_tflops: f64,
    /// Model FLOP/s over the measured matmul throughput.
    pub mfu_vs_matmul: f64,
    /// Peak device memory allocated during the steps: the stream-ordered allocator's high-water
    /// mark (like torch's max_memory_allocated); CUDA only.
    pub peak_memory_gb: Option<f64>,
    /// Peak device memory the allocator held (like torch's max_memory_reserved), or if the
    /// allocator cannot tell, the driver's used memory sampled between phases; CUDA only.
    pub peak_reserved_gb: Option<f64>,
    /// All parameters.
    pub params_total: u64,
    /// Parameters one token passes through.
    pub params_active: u64,
    /// Loss of the last timed step (a sanity check: finite, near ln(vocab) at init).
    pub last_loss: f64,
}

/// Builds the config's model on its device and precision and times `options.steps` training
/// steps on random tokens after `options.warmup` untimed ones. The step is the trainer's own
/// ([`Learner::step`]): forward and backward, norm, clip, AdamW, expert-bias update and the
/// router log's counting.
pub fn bench(cfg: &Config, options: BenchOptions) -> Result<BenchReport, TrainError> {
    if options.steps == 0 {
        return Err(TrainError::Argument("--steps must be at least 1".into()));
    }
    set_threads(cfg.run.threads);
    let device = open_device(cfg.run.device, 0)?;
    if !options.ignore_memory_check {
        check_memory(cfg, &device, 1)?;
    }
    let memory_at_start = device_memory_used(&device)?;
    // The high-water marks count from here: the model, its gradients and the optimizer state.
    let pool_marks = memory_high_water(&device, true);
    let mut learner = Learner::new(cfg, &device, &crate::dist::Single)?;
    // The config's whole step, as `moelab train` runs it and the peer with the same config.
    let (micro, seq_len) = (cfg.train.micro_batch, cfg.data.seq_len);
    let micro_batches = cfg.accumulation_steps().max(1);
    let sequences = micro * micro_batches;
    let concurrent = learner.concurrent_micro_batches(sequences);
    let moe_layers: Vec<usize> = (0..cfg.model.n_layers)
        .filter(|&l| cfg.model.is_moe_layer(l))
        .collect();
    let mut router_log = RouterLogger::new(
        moe_layers,
        vec!["random".into()],
        cfg.model.moe.n_experts,
        cfg.model.moe.top_k,
        &device,
    )?;
    let mut rng = SplitMix64::new(cfg.run.seed);
    let mut times: Vec<[f64; 3]> = Vec::with_capacity(options.steps);
    let mut peak_memory = memory_at_start;
    let mut last_loss = f64::NAN;
    for step in 0..options.warmup + options.steps {
        let batch = random_batch(&mut rng, sequences, seq_len, cfg.model.vocab_size);
        let (spent, loss) = timed_step(
            &mut learner,
            &device,
            &batch,
            step as u64,
            cfg.train.lr,
            &mut router_log,
            &mut peak_memory,
        )?;
        last_loss = loss;
        if step >= options.warmup {
            times.push(spent);
        }
    }

    let median_ms = |pick: &dyn Fn(&[f64; 3]) -> f64| median(times.iter().map(pick)) * 1e3;
    let step_ms = median_ms(&|t| t[0] + t[1] + t[2]);
    let info = ModelInfo::new(&cfg.model, seq_len)?;
    let tokens_per_s = (sequences * seq_len) as f64 / (step_ms / 1e3);
    let model_flops = tokens_per_s * info.train_flops_per_token as f64;
    let matmul_flops = matmul_peak(&device)?;
    let cuda = cfg.run.device == DeviceKind::Cuda;
    let sampled = (peak_memory - memory_at_start) as f64 / 1e9;
    let (peak_allocated, peak_reserved) = match (pool_marks, memory_high_water(&device, false)) {
        (Some(_), Some((used, reserved))) => (Some(used as f64 / 1e9), reserved as f64 / 1e9),
        _ => (None, sampled),
    };
    Ok(BenchReport {
        config: cfg.run.name.clone(),
        device: if cuda { "cuda" } else { "cpu" }.into(),
        precision: cfg.train.precision,
        micro_batch: micro,
        micro_batches,
        concurrent_micro_batches: concurrent,
        seq_len,
        steps: options.steps,
        step_ms,
        forward_backward_ms: median_ms(&|t| t[0] + t[1]),
        // Overlapping micro-batches: the phase marks of one interleave with another's, so
        // the split means nothing (the backward time read as ~0).
        forward_ms: (concurrent == 1).then(|| median_ms(&|t| t[0])),
        backward_ms: (concurrent == 1).then(|| median_ms(&|t| t[1])),
        optimizer_ms: median_ms(&|t| t[2]),
        tokens_per_s,
        flops_per_token: info.train_flops_per_token,
        model_tflops: model_flops / 1e12,
        mfu: cuda.then(|| model_flops / GPU_PEAK_FLOPS),
        matmul_tflops: matmul_flops / 1e12,
        mfu_vs_matmul: model_flops / matmul_flops,
        peak_memory_gb: peak_allocated,
        peak_reserved_gb: cuda.then_some(peak_reserved),
        params_total: info.total_params,
        params_active: info.active_params,
        last_loss,
    })
}

/// A batch of `sequences` x `seq_len` random token ids (and targets) below `vocab`, all of one
/// domain and source.
fn random_batch(rng: &mut SplitMix64, sequences: usize, seq_len: usize, vocab: usize) -> Batch {
    let mut ids = || -> Vec<u32> {
        (0..sequences * seq_len)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect()
    };
    Batch {
        tokens: ids(),
        targets: ids(),
        domain_ids: vec![0; sequences],
        source_ids: vec![0; sequences],
        n_sequences: sequences,
        seq_len,
    }
}

/// One training step of the learner, timed per phase (forward, backward, optimizer; summed
/// over its micro-batches, the device synchronised at each mark); raises `peak_memory` to the
/// most the device used at a mark. Returns the phase times and the step's loss.
fn timed_step(
    learner: &mut Learner,
    device: &Device,
    batch: &Batch,
    step: u64,
    lr: f64,
    router_log: &mut RouterLogger,
    peak_memory: &mut usize,
) -> Result<([f64; 3], f64), TrainError> {
    device.synchronize()?;
    let start = Instant::now();
    let mut spent = [0f64; 3];
    let mut last_mark = 0f64;
    let mut failure = None;
    let mut on_phase = |phase: Phase| {
        if let Err(e) = device.synchronize() {
            failure = Some(e);
        }
        let slot = match phase {
            Phase::Forward => 0,
            Phase::Backward => 1,
            Phase::Optimizer => 2,
        };
        let now = start.elapsed().as_secs_f64();
        spent[slot] += now - last_mark;
        last_mark = now;
        match device_memory_used(device) {
            Ok(used) => *peak_memory = (*peak_memory).max(used),
            Err(TrainError::Candle(e)) => failure = Some(e),
            Err(e) => failure = Some(candle_core::Error::Msg(e.to_string())),
        }
    };
    let outcome = learner.step(
        batch,
        step,
        lr,
        &crate::dist::Single,
        router_log,
        &mut on_phase,
    )?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    Ok((spent, outcome.loss))
}

impl BenchReport {
    /// A readable block for the terminal.
    pub fn table(&self) -> String {
        let mut lines = vec![
            format!(
                "moelab bench {} on {} ({}), {} x {} x {} tokens per step, median of {} steps",
                self.config,
                self.device,
                self.precision.name(),
                self.micro_batches,
                self.micro_batch,
                self.seq_len,
                self.steps
            ),
            match (self.forward_ms, self.backward_ms) {
                (Some(forward), Some(backward)) => format!(
                    "  step        {:>10.2} ms  (forward {forward:.2}, backward {backward:.2}, optimizer {:.2})",
                    self.step_ms, self.optimizer_ms
                ),
                _ => format!(
                    "  step        {:>10.2} ms  (forward + backward {:.2}, {} micro-batches at once; optimizer {:.2})",
                    self.step_ms,
                    self.forward_backward_ms,
                    self.concurrent_micro_batches,
                    self.optimizer_ms
                ),
            },
            format!("  tokens/s    {:>10.0}", self.tokens_per_s),
            format!(
                "  model       {:>10.3} TFLOP/s ({} FLOPs/token; {:.1}% of measured matmul {:.3} TFLOP/s)",
                self.model_tflops,
                self.flops_per_token,
                self.mfu_vs_matmul * 100.0,
                self.matmul_tflops
            ),
        ];
        if let Some(mfu) = self.mfu {
            lines.push(format!(
                "  MFU         {:>10.1}% of 989 TFLOP/s",
                mfu * 100.0
            ));
        }
        if let Some(gb) = self.peak_reserved_gb {
            let allocated = self
                .peak_memory_gb
                .map_or(String::new(), |a| format!("{a:.1} GB allocated, "));
            lines.push(format!("  peak memory {allocated}{gb:.1} GB reserved"));
        }
        lines.push(format!(
            "  params      {} total, {} active; last loss {:.4}",
            self.params_total, self.params_active, self.last_loss
        ));
        lines.join("\n")
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// FLOP/s of a large square matmul in the compute dtype this device trains in: the practical
/// ceiling MFU is also shown against.
fn matmul_peak(device: &Device) -> Result<f64, TrainError> {
    let (n, dtype, reps) = if device.is_cuda() {
        (8192, DType::BF16, 10)
    } else {
        (1024, DType::F32, 3)
    };
    let a = Tensor::ones((n, n), dtype, device)?;
    let b = Tensor::ones((n, n), dtype, device)?;
    a.matmul(&b)?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let start = Instant::now();
        a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best)
}

/// The default memory pool's high-water marks (allocated, reserved) in bytes, reset to the
/// current use when `reset`; `None` on CPU or when the device does not allocate from a pool.
fn memory_high_water(device: &Device, reset: bool) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::{result::device, result::mem_pool, sys};
        use sys::CUmemPool_attribute::{
            CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH as RESERVED, CU_MEMPOOL_ATTR_USED_MEM_HIGH as USED,
        };
        let context = cuda.cuda_stream().context().clone();
        if !context.has_async_alloc() || context.bind_to_thread().is_err() {
            return None;
        }
        // SAFETY: the pool comes from the context's own device, and each attribute value is the
        // cuuint64_t the driver documents for these attributes.
        unsafe {
            let pool = device::get_default_mem_pool(context.cu_device()).ok()?;
            let mut values = [0u64; 2];
            for (attr, value) in [USED, RESERVED].into_iter().zip(values.iter_mut()) {
                if reset {
                    let mut zero = 0u64;
                    mem_pool::set_attribute(pool, attr, (&mut zero as *mut u64).cast()).ok()?;
                }
                mem_pool::get_attribute(pool, attr, (value as *mut u64).cast()).ok()?;
            }
            return Some((values[0], values[1]));
        }
    }
    let _ = (device, reset);
    None
}

/// Bytes in use on the device as the driver sees them (0 on CPU).
fn device_memory_used(device: &Device) -> Result<usize, TrainError> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, total) = cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .map_err(|e| TrainError::Device(format!("cuMemGetInfo: {e:?}")))?;
        return Ok(total - free);
    }
    let _ = device;
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A model that cannot fit is refused before anything is allocated, as train refuses it.
    #[test]
    fn bench_refuses_a_model_that_cannot_fit() {
        let mut cfg: Config = toml::from_str(crate::config::tests::TEXT).unwrap();
        cfg.model.d_model = 1 << 20;
        cfg.model.n_heads = 1;
        cfg.model.n_kv_heads = Some(1);
        let options = BenchOptions {
            steps: 1,
            warmup: 0,
            ignore_memory_check: false,
        };
        let err = bench(&cfg, options).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("the run needs about"), "{err}");
    }

    #[test]
    fn bench_times_a_step_and_reports_consistent_figures() {
        let mut cfg: Config = toml::from_str(crate::config::tests::TEXT).unwrap();
        // One thread: micro-batches one after the other, so forward and backward are split.
        cfg.run.threads = 1;
        let report = bench(
            &cfg,
            BenchOptions {
                steps: 3,
                warmup: 1,
                ignore_memory_check: false,
            },
        )
        .unwrap();
        assert_eq!(report.steps, 3);
        assert!(report.step_ms > 0.0);
        let parts = report.forward_backward_ms + report.optimizer_ms;
        let split = report.forward_ms.unwrap() + report.backward_ms.unwrap();
        assert!(
            split > 0.3 * report.forward_backward_ms && split < 3.0 * report.forward_backward_ms
        );
        // Medians of parts need not add up exactly, but they bound the step.
        assert!(parts > 0.3 * report.step_ms && parts < 3.0 * report.step_ms);
        // The config's whole step: all its micro-batches.
        assert_eq!(report.micro_batches, cfg.accumulation_steps());
        let tokens = (cfg.global_sequences() * cfg.data.seq_len) as f64;
        assert!(
            (report.tokens_per_s - tokens / (report.step_ms / 1e3)).abs()
                < 1e-6 * report.tokens_per_s
        );
        // Random targets: the loss starts near ln(vocab).
        let uniform = (cfg.model.vocab_size as f64).ln();
        assert!(
            (report.last_loss - uniform).abs() < 1.0,
            "{}",
            report.last_loss
        );
        assert!(report.mfu.is_none() && report.peak_memory_gb.is_none());
        assert!(report.peak_reserved_gb.is_none());
        assert!(report.matmul_tflops > 0.0);
        assert!(report.table().contains("tokens/s"));
    }
}
