//! Launchers for `kernels/adamw.cu`: the fused AdamW step of one f32 parameter (one pass,
//! writing the parameter and both moments in place) and the two-pass sum of squares.

use super::{
    alloc_output, config, cuda_dispatch, function, grid_stride_config, input, launch,
    storage_dtype, KernelElem,
};
use crate::adamw::AdamWUpdate;
use candle_core::cuda_backend::cudarc::driver::CudaViewMut;
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

/// The contiguous f32 elements of a storage the op writes in place.
fn inout<'a>(s: &'a mut CudaStorage, l: &Layout, what: &str) -> Result<CudaViewMut<'a, f32>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("adamw_update: {what} must be contiguous");
    };
    match s.as_cuda_slice_mut::<f32>()?.try_slice_mut(start..end) {
        Some(v) => Ok(v),
        None => bail!("adamw_update: {what} layout exceeds its storage"),
    }
}

/// One AdamW step in place (see `crate::adamw::adamw_update` for the arithmetic), with the
/// constants rounded to f32 as the CPU version rounds them.
pub(crate) fn adamw_step(
    (ps, pl): (&mut CudaStorage, &Layout),
    (ms, ml): (&mut CudaStorage, &Layout),
    (vs, vl): (&mut CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    u: &AdamWUpdate,
) -> Result<()> {
    let op = "adamw_update";
    let dev = ps.device.clone();
    let grad = input::<f32>(gs, gl, op, "the gradient")?;
    let mut p = inout(ps, pl, "the parameter")?;
    let mut m = inout(ms, ml, "m")?;
    let mut v = inout(vs, vl, "v")?;
    let n = p.len();
    if m.len() != n || v.len() != n || grad.len() != n {
        bail!(
            "{op}: param {:?}, m {:?}, v {:?} and grad {:?} differ in size",
            pl.dims(),
            ml.dims(),
            vl.dims(),
            gl.dims()
        );
    }
    if n == 0 {
        return Ok(());
    }
    let [scale, keep1, take1, keep2, take2, inv_c1, inv_c2, eps, lr, keep] = u.kernel_scalars();
    let func = function(&dev, "moelab_adamw_f32", op)?;
    launch!(
        dev,
        op,
        func,
        grid_stride_config(n),
        &mut p,
        &mut m,
        &mut v,
        &grad,
        &n,
        &scale,
        &keep1,
        &take1,
        &keep2,
        &take2,
        &inv_c1,
        &inv_c2,
        &eps,
        &lr,
        &keep
    );
    Ok(())
}

/// `sum(x^2)` in f32 as a scalar `()` f32 storage: per-block partials over a grid fixed by the
/// length alone, then one block over the partials. Nothing is read back.
pub(crate) fn sum_of_squares(
    op: &str,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(s), op, T => sum_of_squares_typed::<T>(op, s, l))
}

fn sum_of_squares_typed<T: KernelElem>(
    op: &str,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let x = input::<T>(s, l, op, "the tensor")?;
    let n = x.len();
    let (blocks, first, second) = crate::launch::sum_squares(n);
    let mut partials = alloc_output::<f32>(dev, blocks, op)?;
    let func = function(
        dev,
        &format!("moelab_sum_squares_partial_{}", T::SUFFIX),
        op,
    )?;
    launch!(dev, op, func, config(first), &x, &mut partials, &n);
    let mut out = alloc_output::<f32>(dev, 1, op)?;
    let func = function(dev, "moelab_sum_f32", op)?;
    launch!(dev, op, func, config(second), &partials, &mut out, &blocks);
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(()),
    ))
}
