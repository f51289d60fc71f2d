//! Launcher for `kernels/router_topk.cu`: each token's top-k experts and the per-expert
//! histogram in one launch (one block per token).

use super::{config, cuda_dispatch, function, input, launch, storage_dtype, KernelElem};
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
    // The selection scores and taken flags of one token, in shared memory (checked here,
    // before anything is allocated).
    let dims = crate::launch::router_topk(op, tokens.max(1), n_experts)?;
    let len = tokens * k + n_experts;
    // Zeroed, not poisoned: the counts are accumulated; every id is written.
    let mut out = dev.alloc_zeros::<u32>(len)?;
    if tokens > 0 {
        // `dims` has one block per token (tokens > 0 here).
        let cfg = config(dims);
        // The router always passes a bias (zeros when it has none), so the kernel adds it.
        let has_bias: i32 = 1;
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
            &k,
            &has_bias
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(len),
    ))
}
