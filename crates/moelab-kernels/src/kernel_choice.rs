//! Which implementation the model uses on CUDA for the ops that have both a fused moelab kernel
//! and a composed path (`run.kernels` in the training config). Each op's default is what has
//! passed: the emulation (feature `cuda-emu`) for correctness, the device for speed.

use std::sync::atomic::{AtomicU8, Ordering};

/// The process-wide choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// Each op's default (see [`FusedOp::default_fused`]).
    PerOp,
    /// Every fused kernel.
    Fused,
    /// Every composed path (candle ops, cuBLAS, host-built MoE routing).
    Composed,
}

/// The ops with a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedOp {
    /// MoE routing on the device: `router_topk`, then the dispatch plan (`moe_plan`) from its
    /// ids and histogram, the histogram being the layer's one host copy; composed: the ids are
    /// copied to the host, which builds the plan.
    MoeDispatch,
    /// Flash attention's CUDA kernels; composed: the cuBLAS matmuls around the causal softmax.
    FlashAttention,
}

impl FusedOp {
    /// The default: fused once the kernels passed the emulation and (for speed) the device.
    /// MoE dispatch passed the emulation and replaces a device-to-host copy of every expert
    /// id; flash attention's kernel (one thread per query row, scalar f32) stays off until the
    /// device shows it beats the composed ops at the bench shapes.
    pub fn default_fused(self) -> bool {
        match self {
            FusedOp::MoeDispatch => true,
            FusedOp::FlashAttention => false,
        }
    }
}

static CHOICE: AtomicU8 = AtomicU8::new(0);

/// Sets the process-wide choice (the trainer does, from `run.kernels`).
pub fn set_kernel_choice(choice: KernelChoice) {
    let v = match choice {
        KernelChoice::PerOp => 0,
        KernelChoice::Fused => 1,
        KernelChoice::Composed => 2,
    };
    CHOICE.store(v, Ordering::Relaxed);
}

/// The process-wide choice.
pub fn kernel_choice() -> KernelChoice {
    match CHOICE.load(Ordering::Relaxed) {
        1 => KernelChoice::Fused,
        2 => KernelChoice::Composed,
        _ => KernelChoice::PerOp,
    }
}

/// Whether `op` runs its fused kernel under the current choice (on a device that has one).
pub fn use_fused(op: FusedOp) -> bool {
    match kernel_choice() {
        KernelChoice::PerOp => op.default_fused(),
        KernelChoice::Fused => true,
        KernelChoice::Composed => false,
    }
}
