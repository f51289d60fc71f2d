//! The device a run computes on: opening it, the CPU thread count, and the memory check that
//! refuses a run that cannot fit before anything is allocated.

use candle_core::Device;
use moelab_model::memory::{ParallelPlan, Parallelism};
use moelab_model::{fmt_bytes, MemoryEstimate, ModelInfo};

use crate::config::DeviceKind;
use crate::{Config, TrainError};

/// The device `run.device` names (on CUDA, GPU `ordinal`: the process's rank on its node);
/// CUDA needs a build with `--features cuda`.
pub fn open_device(kind: DeviceKind, ordinal: usize) -> Result<Device, TrainError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => Device::new_cuda(ordinal).map_err(|e| {
            TrainError::Device(format!(
                "run.device = \"cuda\" but CUDA device {ordinal} is not usable ({e}); this binary needs a build with --features cuda (see scripts/cuda-toolchain.sh), one GPU per process, or set run.device = \"cpu\""
            ))
        }),
    }
}

/// Fixes the CPU thread count (0 = all cores) for rayon and candle's GEMM.
pub fn set_threads(threads: usize) {
    // candle reads RAYON_NUM_THREADS at every GEMM and, when it is unset, counts the physical
    // cores by reading /proc/cpuinfo (tens of times per step); rayon reads it when its global
    // pool is first used, which is after this point. So 0 is resolved once, here.
    let threads = match threads {
        0 => candle_core::utils::get_num_threads(),
        n => n,
    };
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}

/// Refuses, before anything is allocated, a run whose estimated memory (weights, gradients,
/// AdamW state and one micro-batch's activations) exceeds what the device has free; a model that
/// cannot fit would otherwise swap or thrash for minutes before failing. In a job of `ranks`
/// ranks the figure is one rank's ([`ParallelPlan`]: its experts under
/// `dist.expert_parallel`, its share of the moments with `train.shard_optimizer`).
pub fn check_memory(cfg: &Config, device: &Device, ranks: usize) -> Result<(), TrainError> {
    let mut estimate = MemoryEstimate::new(
        &cfg.model,
        cfg.train.micro_batch,
        cfg.data.seq_len,
        cfg.train.precision.compute_dtype(),
    )?;
    let mut needed = estimate.total_bytes();
    if ranks > 1 {
        let info = ModelInfo::new(&cfg.model, cfg.data.seq_len)?;
        let parallelism = Parallelism {
            ranks: ranks as u64,
            expert_parallel: cfg.dist.expert_parallel as u64,
            shard_optimizer: cfg.train.shard_optimizer,
            micro_batches_per_step: cfg.accumulation_steps() as u64,
        };
        let plan = ParallelPlan::new(&cfg.model, &info, &estimate, parallelism)?;
        needed = plan.total_bytes();
        estimate.weights_bytes = plan.weights_bytes;
        estimate.compute_weights_bytes = plan.compute_weights_bytes;
        estimate.gradients_bytes = plan.gradients_bytes;
        estimate.optimizer_bytes = plan.optimizer_bytes;
    }
    let Some((available, what)) = available_memory(device) else {
        return Ok(());
    };
    if needed > available {
        return Err(TrainError::Device(format!(
            "the run needs about {} per rank ({} weights, {} gradients, {} optimizer state, {} activations per micro-batch of {}) but {what} has {} available; shrink the model or train.micro_batch, or pass --ignore-memory-check to try anyway (`moelab model-info CONFIG` shows the estimate)",
            fmt_bytes(needed),
            fmt_bytes(estimate.weights_bytes + estimate.compute_weights_bytes),
            fmt_bytes(estimate.gradients_bytes),
            fmt_bytes(estimate.optimizer_bytes),
            fmt_bytes(estimate.activations_bytes),
            cfg.train.micro_batch,
            fmt_bytes(available),
        )));
    }
    Ok(())
}

/// Free memory of `device` in bytes and what it is: the GPU's free memory, or on CPU the
/// kernel's MemAvailable; `None` where it cannot be read.
fn available_memory(device: &Device) -> Option<(u64, &'static str)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some((free as u64, "the GPU"));
    }
    let _ = device;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kib * 1024, "this machine"))
}
