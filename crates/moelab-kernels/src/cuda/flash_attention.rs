//! Launchers for `kernels/flash_attention.cu`: the causal grouped-query attention forward (O
//! then L) and its backward (delta, then dQ and dK/dV), f32 only: `flash_attention` converts
//! bf16/f16 before the op.

use super::{alloc_output, config, function, grid_stride_config, input, launch, storage_dtype};
use crate::flash_attention::Dims;
use crate::launch::FA_MAX_D as MAX_D;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};

/// Errors unless the kernels handle this dtype and head dim.
fn check(op: &str, dtype: DType, dims: &Dims) -> Result<()> {
    if dtype != DType::F32 {
        bail!(
            "{op}: unsupported dtype {dtype:?} on CUDA (expected f32; flash_attention converts bf16/f16)"
        );
    }
    if dims.d > MAX_D {
        bail!(
            "{op}: head dim D = {} exceeds the CUDA kernel's maximum of {MAX_D}",
            dims.d
        );
    }
    Ok(())
}

/// Grid (heads, row blocks of T) of ROWS-thread blocks.
fn head_rows_config(op: &str, heads: usize, t: usize) -> Result<LaunchConfig> {
    Ok(config(crate::launch::flash_head_rows(op, heads, t)?))
}

/// The f32 elements of a contiguous input, which must number exactly `len`.
fn sized<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
    what: &str,
    len: usize,
) -> Result<CudaView<'a, f32>> {
    let x = input::<f32>(s, l, op, what)?;
    if x.len() != len {
        bail!(
            "{op}: {what} has {} elements, expected {len} (shape {:?})",
            x.len(),
            l.dims()
        );
    }
    Ok(x)
}

/// `(q, k, v)` -> O then L in one flat `(B*H*T*(D + 1),)` storage, as the CPU forward op.
pub(crate) fn flash_attention_fwd(
    op: &str,
    dims: &Dims,
    scale: f64,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    check(op, storage_dtype(qs), dims)?;
    let dev = &qs.device;
    let q = sized(qs, ql, op, "q", dims.q_len())?;
    let k = sized(ks, kl, op, "k", dims.kv_len())?;
    let v = sized(vs, vl, op, "v", dims.kv_len())?;
    let n = dims.q_len() + dims.lse_len();
    let mut out = alloc_output::<f32>(dev, n, op)?;
    if dims.lse_len() > 0 {
        let func = function(dev, "moelab_flash_attn_fwd_f32", op)?;
        let cfg = head_rows_config(op, dims.b * dims.h, dims.t)?;
        let scale = scale as f32;
        let (b, h, kv, t, d) = (dims.b, dims.h, dims.kv, dims.t, dims.d);
        launch!(dev, op, func, cfg, &q, &k, &v, &mut out, &b, &h, &kv, &t, &d, &scale);
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(n),
    ))
}

/// `(q, k ++ v, O ++ L ++ dO ++ dL)` -> dQ ++ dK ++ dV in one flat storage, as the CPU backward
/// op: delta = rowsum(dO * O) - dL first, then dQ per query row and dK/dV per key row.
pub(crate) fn flash_attention_bwd(
    op: &str,
    dims: &Dims,
    scale: f64,
    (qs, ql): (&CudaStorage, &Layout),
    (kvs, kvl): (&CudaStorage, &Layout),
    (ss, sl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    check(op, storage_dtype(qs), dims)?;
    let dev = &qs.device;
    let (nq, nk, nl) = (dims.q_len(), dims.kv_len(), dims.lse_len());
    let q = sized(qs, ql, op, "q", nq)?;
    let kv_in = sized(kvs, kvl, op, "k/v", 2 * nk)?;
    let saved = sized(ss, sl, op, "saved output/grad", 2 * (nq + nl))?;
    let n = nq + 2 * nk;
    let mut grads = alloc_output::<f32>(dev, n, op)?;
    if nl > 0 {
        let (b, h, kv, t, d) = (dims.b, dims.h, dims.kv, dims.t, dims.d);
        let scale = scale as f32;
        let mut delta = alloc_output::<f32>(dev, nl, op)?;
        let func = function(dev, "moelab_flash_attn_delta_f32", op)?;
        launch!(
            dev,
            op,
            func,
            grid_stride_config(nl),
            &saved,
            &mut delta,
            &nl,
            &d
        );
        // Both read delta and write disjoint parts of `grads`, in stream order after delta.
        for (name, heads) in [
            ("moelab_flash_attn_bwd_dq_f32", b * h),
            ("moelab_flash_attn_bwd_dkv_f32", b * kv),
        ] {
            let func = function(dev, name, op)?;
            let cfg = head_rows_config(op, heads, t)?;
            launch!(
                dev, op, func, cfg, &q, &kv_in, &saved, &delta, &mut grads, &b, &h, &kv, &t, &d,
                &scale
            );
        }
    }
    Ok((
        CudaStorage::wrap_cuda_slice(grads, dev.clone()),
        Shape::from(n),
    ))
}
