//! Launcher for `kernels/router_topk.cu`: each token's top-k experts and the per-expert
//! histogram in one launch (one block per token).

use super::{cuda_dispatch, function, input, launch, storage_dtype, KernelElem, BLOCK};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

/// `(scores (tokens, n_experts), bias f32 (n_experts,))` -> one u32 storage: the ids
/// `(tokens * k)`, best first, then the counts `(n_experts)`.
pub(crate) fn router_topk(
    op: &str,
    k: usize,
    (ss, sl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(ss), op, T => router_topk_typed::<T>(op, k, (ss, sl), (bs, bl)))
}

fn router_topk_typed<T: KernelElem>(
    op: &str,
    k: usize,
    (ss, sl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = &ss.device;
    let scores = input::<T>(ss, sl, op, "scores")?;
    let bias = input::<f32>(bs, bl, op, "bias")?;
    let n_experts = bias.len();
    if n_experts == 0 || scores.len() % n_experts != 0 || k == 0 || k > n_experts {
        bail!(
            "{op}: scores {:?}, bias {:?} and k {k} do not match",
            sl.dims(),
            bl.dims()
        );
    }
    let tokens = scores.len() / n_experts;
    // The selection scores and taken flags of one token, in shared memory.
    let shared = n_experts * (std::mem::size_of::<f32>() + 1);
    if shared > 48 * 1024 {
        bail!("{op}: {n_experts} experts exceed the kernel's 48 KiB of shared memory");
    }
    let len = tokens * k + n_experts;
    // Zeroed, not poisoned: the counts are accumulated; every id is written.
    let mut out = dev.alloc_zeros::<u32>(len)?;
    if tokens > 0 {
        let Ok(grid) = u32::try_from(tokens) else {
            bail!("{op}: {tokens} tokens exceed the CUDA grid limit");
        };
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (BLOCK, 1, 1),
            // At most 48 KiB, checked above.
            shared_mem_bytes: shared as u32,
        };
        let (mut ids, mut counts) = out.split_at_mut(tokens * k);
        let func = function(dev, &format!("moelab_router_topk_{}", T::SUFFIX), op)?;
        launch!(
            dev,
            op,
            func,
            cfg,
            &scores,
            &bias,
            &mut ids,
            &mut counts,
            &n_experts,
            &k
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(len),
    ))
}
