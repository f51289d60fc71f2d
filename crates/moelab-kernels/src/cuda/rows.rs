//! Launchers for the row kernels in `kernels/*.cu`: softmax (+ backward), RMSNorm, RoPE and
//! cross-entropy (+ backward). Each checks shapes against its layouts, allocates the output and
//! launches one block per row (RoPE: a grid-stride loop over rotation pairs).

use super::{
    alloc_output, cuda_dispatch, function, grid_stride_config, input, launch, rows_config,
    storage_dtype, KernelElem,
};
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

/// Softmax over the last dim of `x`; `causal` masks keys past each query as in
/// `crate::softmax::causal_softmax`.
pub(crate) fn softmax_fwd(
    op: &str,
    causal: bool,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(s), op, T => softmax_fwd_typed::<T>(op, causal, s, l))
}

fn softmax_fwd_typed<T: KernelElem>(
    op: &str,
    causal: bool,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let x = input::<T>(s, l, op, "x")?;
    let (t_q, t_k) = crate::launch::softmax_shape(op, l.dims(), causal)?;
    let len = x.len();
    let mut y = alloc_output::<T>(dev, len, op)?;
    if len > 0 {
        let rows = len / t_k;
        let func = function(dev, &format!("moelab_softmax_fwd_{}", T::SUFFIX), op)?;
        let causal_flag = i32::from(causal);
        launch!(
            dev,
            op,
            func,
            rows_config(rows, op)?,
            &x,
            &mut y,
            &t_q,
            &t_k,
            &causal_flag
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        l.shape().clone(),
    ))
}

/// dx = y * (g - sum(g * y)) per last-dim row.
pub(crate) fn softmax_bwd(
    op: &str,
    ys: &CudaStorage,
    yl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(ys), op, T => softmax_bwd_typed::<T>(op, ys, yl, gs, gl))
}

fn softmax_bwd_typed<T: KernelElem>(
    op: &str,
    ys: &CudaStorage,
    yl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &ys.device;
    let y = input::<T>(ys, yl, op, "y")?;
    let g = input::<T>(gs, gl, op, "grad")?;
    if yl.dims() != gl.dims() {
        bail!(
            "{op}: grad shape {:?} differs from output shape {:?}",
            gl.dims(),
            yl.dims()
        );
    }
    let n = yl.dims().last().copied().unwrap_or(1);
    let len = y.len();
    let mut dx = alloc_output::<T>(dev, len, op)?;
    if len > 0 {
        let func = function(dev, &format!("moelab_softmax_bwd_{}", T::SUFFIX), op)?;
        launch!(
            dev,
            op,
            func,
            rows_config(len / n, op)?,
            &y,
            &g,
            &mut dx,
            &n
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(dx, dev.clone()),
        yl.shape().clone(),
    ))
}

/// RMSNorm over the last dim: y = x / sqrt(mean(x^2) + eps) * w.
pub(crate) fn rms_norm_fwd(
    op: &str,
    eps: f64,
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(xs), op, T => rms_norm_fwd_typed::<T>(op, eps, xs, xl, ws, wl))
}

fn rms_norm_fwd_typed<T: KernelElem>(
    op: &str,
    eps: f64,
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &xs.device;
    let x = input::<T>(xs, xl, op, "x")?;
    let w = input::<T>(ws, wl, op, "weight")?;
    let d = w.len();
    if xl.dims().last() != Some(&d) {
        bail!(
            "{op}: weight length {d} does not match x shape {:?}",
            xl.dims()
        );
    }
    let len = x.len();
    let mut y = alloc_output::<T>(dev, len, op)?;
    if len > 0 {
        let func = function(dev, &format!("moelab_rms_norm_fwd_{}", T::SUFFIX), op)?;
        let eps = eps as f32;
        launch!(
            dev,
            op,
            func,
            rows_config(len / d, op)?,
            &x,
            &w,
            &mut y,
            &d,
            &eps
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        xl.shape().clone(),
    ))
}

/// Rotary embedding of `x (B, H, T, D)` with `cos`/`sin (T, D/2)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_fwd(
    op: &str,
    xs: &CudaStorage,
    xl: &Layout,
    cs: &CudaStorage,
    cl: &Layout,
    ss: &CudaStorage,
    sl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(xs), op, T => rope_fwd_typed::<T>(op, xs, xl, cs, cl, ss, sl))
}

#[allow(clippy::too_many_arguments)]
fn rope_fwd_typed<T: KernelElem>(
    op: &str,
    xs: &CudaStorage,
    xl: &Layout,
    cs: &CudaStorage,
    cl: &Layout,
    ss: &CudaStorage,
    sl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &xs.device;
    let x = input::<T>(xs, xl, op, "x")?;
    let cos = input::<T>(cs, cl, op, "cos")?;
    let sin = input::<T>(ss, sl, op, "sin")?;
    let (t, d) = crate::launch::rope_shape(op, xl.dims(), cl.dims(), sl.dims())?;
    let half = d / 2;
    let len = x.len();
    let mut y = alloc_output::<T>(dev, len, op)?;
    if len > 0 {
        let rows = len / d;
        let func = function(dev, &format!("moelab_rope_fwd_{}", T::SUFFIX), op)?;
        launch!(
            dev,
            op,
            func,
            grid_stride_config(rows * half),
            &x,
            &cos,
            &sin,
            &mut y,
            &rows,
            &t,
            &d
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        xl.shape().clone(),
    ))
}

/// `(N, V)` dims of a logits layout.
fn logits_dims(op: &str, l: &Layout) -> Result<(usize, usize)> {
    crate::launch::logits_dims(op, l.dims())
}

/// Per-row cross-entropy `logsumexp(row) - row[target]` -> `(N,)` in the logits' dtype.
pub(crate) fn cross_entropy_fwd(
    op: &str,
    ls: &CudaStorage,
    ll: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(ls), op, T => cross_entropy_fwd_typed::<T>(op, ls, ll, ts, tl))
}

fn cross_entropy_fwd_typed<T: KernelElem>(
    op: &str,
    ls: &CudaStorage,
    ll: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &ls.device;
    let logits = input::<T>(ls, ll, op, "logits")?;
    let targets = input::<u32>(ts, tl, op, "targets")?;
    let (n, v) = logits_dims(op, ll)?;
    if targets.len() != n {
        bail!("{op}: {} targets for {n} rows", targets.len());
    }
    let mut loss = alloc_output::<T>(dev, n, op)?;
    if n > 0 && v > 0 {
        let func = function(dev, &format!("moelab_cross_entropy_fwd_{}", T::SUFFIX), op)?;
        launch!(
            dev,
            op,
            func,
            rows_config(n, op)?,
            &logits,
            &targets,
            &mut loss,
            &v
        );
    } else if n > 0 {
        bail!("{op}: logits have zero classes");
    }
    Ok((
        CudaStorage::wrap_cuda_slice(loss, dev.clone()),
        Shape::from(n),
    ))
}

/// dlogits = (softmax(row) - onehot(target)) * g[row].
#[allow(clippy::too_many_arguments)]
pub(crate) fn cross_entropy_bwd(
    op: &str,
    ls: &CudaStorage,
    ll: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(ls), op, T => cross_entropy_bwd_typed::<T>(op, ls, ll, ts, tl, gs, gl))
}

#[allow(clippy::too_many_arguments)]
fn cross_entropy_bwd_typed<T: KernelElem>(
    op: &str,
    ls: &CudaStorage,
    ll: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &ls.device;
    let logits = input::<T>(ls, ll, op, "logits")?;
    let targets = input::<u32>(ts, tl, op, "targets")?;
    let g = input::<T>(gs, gl, op, "grad")?;
    let (n, v) = logits_dims(op, ll)?;
    if targets.len() != n || g.len() != n {
        bail!(
            "{op}: {} targets and {} grads for {n} rows",
            targets.len(),
            g.len()
        );
    }
    let len = logits.len();
    let mut dlogits = alloc_output::<T>(dev, len, op)?;
    if len > 0 {
        let func = function(dev, &format!("moelab_cross_entropy_bwd_{}", T::SUFFIX), op)?;
        launch!(
            dev,
            op,
            func,
            rows_config(n, op)?,
            &logits,
            &targets,
            &g,
            &mut dlogits,
            &v
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(dlogits, dev.clone()),
        ll.shape().clone(),
    ))
}
