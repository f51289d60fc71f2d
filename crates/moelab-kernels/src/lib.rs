//! candle CustomOps with CPU kernels and backward passes for the ops that candle's fast
//! kernels (`softmax_last_dim`, `rms_norm`, `rope`) ship without autograd support.
//!
//! With feature `cuda` every op also runs on CUDA devices (f32, bf16, f16; accumulation in f32):
//! the row kernels come from the repo-root `kernels/*.cu` (compiled by build.rs), the grouped
//! GEMMs from cuBLAS. Setting `MOELAB_POISON_OUTPUTS=1` fills every CUDA output with NaN before
//! its kernel runs, so tests catch elements a kernel forgot to write.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda-emu")]
pub mod emu;
mod launch;

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod flash_attention;
pub mod gradcheck;
pub mod grouped_matmul;
pub mod kernel_choice;
pub mod linear_cross_entropy;
pub mod moe_dispatch;
pub mod moe_plan;
pub mod rms_norm;
pub mod rope;
pub mod router_topk;
pub mod softmax;
pub mod swiglu;

pub use adamw::{adamw_update, fused_adamw_supported, sum_of_squares, AdamWUpdate, SquareSum};
pub use attention::causal_attention;
pub use cpu::tune_cpu_runtime;
pub use cross_entropy::cross_entropy;
pub use grouped_matmul::grouped_matmul;
pub use kernel_choice::{set_kernel_choice, use_fused, FusedOp, KernelChoice};
pub use linear_cross_entropy::linear_cross_entropy;
pub use rms_norm::rms_norm;
pub use rope::{rope, rope_tables};
pub use router_topk::{router_topk, TopK};
pub use softmax::{causal_softmax, softmax_last_dim};
pub use swiglu::swiglu;

#[cfg(test)]
pub(crate) mod test_util;

/// Whether the fused ops run their own kernels for `t` rather than composed candle ops: always on
/// the CPU; on CUDA (feature `cuda`) for f32, bf16 and f16.
pub(crate) fn has_kernel(t: &candle_core::Tensor) -> bool {
    use candle_core::DType;
    let device = t.device();
    device.is_cpu()
        || (cfg!(feature = "cuda")
            && device.is_cuda()
            && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16))
}
