//! candle CustomOps with CPU kernels and backward passes for the ops that candle's fast
//! kernels (`softmax_last_dim`, `rms_norm`, `rope`) ship without autograd support.

mod cpu;

pub mod attention;
pub mod cross_entropy;
pub mod gradcheck;
pub mod grouped_matmul;
pub mod rms_norm;
pub mod rope;
pub mod softmax;

pub use attention::causal_attention;
pub use cross_entropy::cross_entropy;
pub use grouped_matmul::grouped_matmul;
pub use rms_norm::rms_norm;
pub use rope::{rope, rope_tables};
pub use softmax::{causal_softmax, softmax_last_dim};

#[cfg(test)]
pub(crate) mod test_util;
