//! Launchers for `kernels/adamw.cu`: the fused AdamW step of one f32 parameter (one pass,
//! writing the parameter and both moments in place) and the two-pass sum of squares.

use super::{
    alloc_output, cuda_dispatch, function, grid_stride_config, input, launch, storage_dtype,
    KernelElem, BLOCK,
};
use crate::adamw::AdamWUpdate;
use candle_core::cuda_backend::cudarc::driver::{CudaViewMut, LaunchConfig};
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

/// Most blocks of the sum of squares' first pass (each sums a grid-stride share); the second
/// pass reduces their partials in one block.
const SUM_BLOCKS: usize = 1024;

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
    let scale = u.grad_scale as f32;
    let (keep1, take1) = (u.beta1 as f32, (1.0 - u.beta1) as f32);
    let (keep2, take2) = (u.beta2 as f32, (1.0 - u.beta2) as f32);
    let (inv_c1, inv_c2) = ((1.0 / u.correction1) as f32, (1.0 / u.correction2) as f32);
    let (eps, lr, keep) = (u.eps as f32, u.lr as f32, (1.0 - u.decay) as f32);
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
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, SUM_BLOCKS);
    let mut partials = alloc_output::<f32>(dev, blocks, op)?;
    let func = function(
        dev,
        &format!("moelab_sum_squares_partial_{}", T::SUFFIX),
        op,
    )?;
    let cfg = |blocks: usize| LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(dev, op, func, cfg(blocks), &x, &mut partials, &n);
    let mut out = alloc_output::<f32>(dev, 1, op)?;
    let func = function(dev, "moelab_sum_f32", op)?;
    launch!(dev, op, func, cfg(1), &partials, &mut out, &blocks);
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(()),
    ))
}
