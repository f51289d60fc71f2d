//! Launchers for `kernels/swiglu.cu`: the fused `silu(gate) * up` and its backward, each one
//! grid-stride pass over the elements.

use super::{
    alloc_output, cuda_dispatch, function, grid_stride_config, input, launch, storage_dtype,
    KernelElem,
};
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

/// `y = silu(gate) * up` for two contiguous tensors of one shape.
pub(crate) fn swiglu_fwd(
    op: &str,
    (gs, gl): (&CudaStorage, &Layout),
    (us, ul): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(gs), op, T => swiglu_fwd_typed::<T>(op, (gs, gl), (us, ul)))
}

fn swiglu_fwd_typed<T: KernelElem>(
    op: &str,
    (gs, gl): (&CudaStorage, &Layout),
    (us, ul): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = &gs.device;
    let gate = input::<T>(gs, gl, op, "gate")?;
    let up = input::<T>(us, ul, op, "up")?;
    if gl.dims() != ul.dims() {
        bail!(
            "{op}: gate {:?} and up {:?} differ in shape",
            gl.dims(),
            ul.dims()
        );
    }
    let n = gate.len();
    let mut y = alloc_output::<T>(dev, n, op)?;
    if n > 0 {
        let func = function(dev, &format!("moelab_swiglu_fwd_{}", T::SUFFIX), op)?;
        launch!(dev, op, func, grid_stride_config(n), &gate, &up, &mut y, &n);
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        gl.shape().clone(),
    ))
}

/// `(gate, up, grad)` -> dgate then dup in one flat `(2 n,)` storage, as the CPU backward.
pub(crate) fn swiglu_bwd(
    op: &str,
    (gs, gl): (&CudaStorage, &Layout),
    (us, ul): (&CudaStorage, &Layout),
    (ds, dl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(gs), op, T => swiglu_bwd_typed::<T>(op, (gs, gl), (us, ul), (ds, dl)))
}

fn swiglu_bwd_typed<T: KernelElem>(
    op: &str,
    (gs, gl): (&CudaStorage, &Layout),
    (us, ul): (&CudaStorage, &Layout),
    (ds, dl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = &gs.device;
    let gate = input::<T>(gs, gl, op, "gate")?;
    let up = input::<T>(us, ul, op, "up")?;
    let grad = input::<T>(ds, dl, op, "grad")?;
    let n = gate.len();
    if up.len() != n || grad.len() != n {
        bail!(
            "{op}: gate {:?}, up {:?} and grad {:?} differ in shape",
            gl.dims(),
            ul.dims(),
            dl.dims()
        );
    }
    let mut out = alloc_output::<T>(dev, 2 * n, op)?;
    if n > 0 {
        let func = function(dev, &format!("moelab_swiglu_bwd_{}", T::SUFFIX), op)?;
        launch!(
            dev,
            op,
            func,
            grid_stride_config(n),
            &gate,
            &up,
            &grad,
            &mut out,
            &n
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(2 * n),
    ))
}
