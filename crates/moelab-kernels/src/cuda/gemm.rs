//! Grouped expert GEMM on cuBLAS: one gemm per non-empty group, all on the device's stream, at
//! pointer offsets into the shared x / w / output buffers. Group sizes live on the host, so
//! nothing is copied back or synchronised.
//!
//! cuBLAS is column-major, and a row-major `(R, C)` matrix is the column-major `(C, R)` matrix
//! (its transpose) with leading dimension C. So each row-major product `C = A @ B` is issued as
//! the column-major `C^T = B^T @ A^T` on the same memory.

use super::{alloc_output, cuda_dispatch, cuda_error, input, storage_dtype, KernelElem};
use crate::grouped_matmul::{matmul_dims, weight_grad_dims, MatmulDims};
use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut};
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

/// Element types with a cuBLAS gemm (f32: sgemm; bf16/f16: gemmEx with f32 compute).
pub(crate) trait GemmElem:
    KernelElem + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
where
    CudaBlas: Gemm<Self>,
{
}
impl GemmElem for f32 {}
impl GemmElem for half::bf16 {}
impl GemmElem for half::f16 {}

/// A cuBLAS dimension, which must fit in a C int.
fn dim(op: &str, what: &str, v: usize) -> Result<i32> {
    match i32::try_from(v) {
        Ok(v) => Ok(v),
        Err(_) => bail!("{op}: {what} = {v} exceeds cuBLAS's 32-bit limit"),
    }
}

/// Column-major `c (m x n, ldc) = op_a(a) @ op_b(b)` with inner dimension k (> 0), beta = 0.
#[allow(clippy::too_many_arguments)]
fn gemm<T: GemmElem>(
    blas: &CudaBlas,
    op: &str,
    (m, n, k): (usize, usize, usize),
    (a, transa, lda): (&CudaView<'_, T>, bool, usize),
    (b, transb, ldb): (&CudaView<'_, T>, bool, usize),
    (c, ldc): (&mut CudaViewMut<'_, T>, usize),
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let trans = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    if m == 0 || n == 0 || k == 0 {
        bail!("{op}: internal gemm with an empty dimension (m {m}, n {n}, k {k})");
    }
    // Stored shapes (column-major rows x cols) of a, b and c, checked against the view lengths
    // so cuBLAS cannot read or write past them.
    let (a_rows, a_cols) = if transa { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if transb { (n, k) } else { (k, n) };
    let span = |rows: usize, cols: usize, ld: usize| (cols - 1) * ld + rows;
    if lda < a_rows.max(1)
        || ldb < b_rows.max(1)
        || ldc < m.max(1)
        || a.len() < span(a_rows, a_cols, lda)
        || b.len() < span(b_rows, b_cols, ldb)
        || c.len() < span(m, n, ldc)
    {
        bail!("{op}: internal gemm view out of bounds (m {m}, n {n}, k {k})");
    }
    let cfg = GemmConfig {
        transa: trans(transa),
        transb: trans(transb),
        m: dim(op, "m", m)?,
        n: dim(op, "n", n)?,
        k: dim(op, "k", k)?,
        alpha: T::from_f64(1.0),
        lda: dim(op, "lda", lda)?,
        ldb: dim(op, "ldb", ldb)?,
        beta: T::from_f64(0.0),
        ldc: dim(op, "ldc", ldc)?,
    };
    // SAFETY: the dimensions and leading dimensions were checked against the view lengths above,
    // and all three views live on the blas handle's stream (the device's stream).
    unsafe { blas.gemm(cfg, a, b, c) }.map_err(|e| cuda_error(op, "cuBLAS gemm", e))
}

/// Per-group `x_e @ w[e]^T` (transpose: x (N, K), w (E, M, K) -> (N, M)) or `x_e @ w[e]`
/// (no transpose: x (N, M) -> (N, K)).
#[allow(clippy::too_many_arguments)]
pub(crate) fn grouped_matmul(
    op: &str,
    group_sizes: &[usize],
    transpose: bool,
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(xs), op, T =>
        grouped_matmul_typed::<T>(op, group_sizes, transpose, xs, xl, ws, wl))
}

#[allow(clippy::too_many_arguments)]
fn grouped_matmul_typed<T: GemmElem>(
    op: &str,
    group_sizes: &[usize],
    transpose: bool,
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
) -> Result<(CudaStorage, Shape)>
where
    CudaBlas: Gemm<T>,
{
    let dev = &xs.device;
    let x = input::<T>(xs, xl, op, "x")?;
    let w = input::<T>(ws, wl, op, "w")?;
    let MatmulDims {
        n,
        m,
        k,
        inner,
        out_w,
    } = matmul_dims(op, group_sizes, transpose, xl, wl)?;
    let a = inner;
    let mut y = alloc_output::<T>(dev, n * out_w, op)?;
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let mut row0 = 0;
    for (g, &rows) in group_sizes.iter().enumerate() {
        let (r0, r1) = (row0, row0 + rows);
        row0 = r1;
        if rows == 0 || out_w == 0 {
            continue;
        }
        let Some(mut ye) = y.try_slice_mut(r0 * out_w..r1 * out_w) else {
            bail!("{op}: output too small for group {g}");
        };
        if inner == 0 {
            // An empty sum: zero the rows rather than rely on how cuBLAS treats k = 0.
            stream
                .memset_zeros(&mut ye)
                .map_err(|e| cuda_error(op, "zeroing output", e))?;
            continue;
        }
        let (Some(xe), Some(we)) = (
            x.try_slice(r0 * a..r1 * a),
            w.try_slice(g * m * k..(g + 1) * m * k),
        ) else {
            bail!("{op}: inputs too small for group {g}");
        };
        // Row-major y_e (rows, out_w) = x_e (rows, inner) @ op(w_e), issued column-major as
        // y_e^T (out_w x rows) = op(w_e)^T (out_w x inner) @ x_e^T (inner x rows). w_e's memory
        // is the column-major (K x M) matrix w_e^T, so op(w_e)^T needs a transpose exactly when
        // op(w_e) = w_e^T; x_e's memory already is x_e^T (inner x rows, ld = inner).
        gemm(
            &blas,
            op,
            (out_w, rows, inner),
            (&we, transpose, k),
            (&xe, false, inner),
            (&mut ye, out_w),
        )?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        Shape::from((n, out_w)),
    ))
}

/// Per-group `a_e^T @ b_e` for `a (N, P)`, `b (N, Q)` -> `(E, P, Q)`, zeros for empty groups.
pub(crate) fn grouped_weight_grad(
    op: &str,
    group_sizes: &[usize],
    a_s: &CudaStorage,
    a_l: &Layout,
    b_s: &CudaStorage,
    b_l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(a_s), op, T =>
        grouped_weight_grad_typed::<T>(op, group_sizes, a_s, a_l, b_s, b_l))
}

fn grouped_weight_grad_typed<T: GemmElem>(
    op: &str,
    group_sizes: &[usize],
    a_s: &CudaStorage,
    a_l: &Layout,
    b_s: &CudaStorage,
    b_l: &Layout,
) -> Result<(CudaStorage, Shape)>
where
    CudaBlas: Gemm<T>,
{
    let dev = &a_s.device;
    let a = input::<T>(a_s, a_l, op, "a")?;
    let b = input::<T>(b_s, b_l, op, "b")?;
    let (p, q) = weight_grad_dims(op, group_sizes, a_l, b_l)?;
    let e = group_sizes.len();
    let mut dw = alloc_output::<T>(dev, e * p * q, op)?;
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let mut row0 = 0;
    for (g, &rows) in group_sizes.iter().enumerate() {
        let (r0, r1) = (row0, row0 + rows);
        row0 = r1;
        if p == 0 || q == 0 {
            continue;
        }
        let Some(mut dwe) = dw.try_slice_mut(g * p * q..(g + 1) * p * q) else {
            bail!("{op}: output too small for group {g}");
        };
        if rows == 0 {
            // No tokens reached this expert: its gradient is exactly zero.
            stream
                .memset_zeros(&mut dwe)
                .map_err(|e| cuda_error(op, "zeroing an empty group's gradient", e))?;
            continue;
        }
        let (Some(ae), Some(be)) = (a.try_slice(r0 * p..r1 * p), b.try_slice(r0 * q..r1 * q))
        else {
            bail!("{op}: inputs too small for group {g}");
        };
        // Row-major dw_e (P, Q) = a_e^T (P x rows) @ b_e (rows x Q), issued column-major as
        // dw_e^T (Q x P) = b_e^T (Q x rows) @ a_e (rows x P). b_e's memory is the column-major
        // b_e^T (ld Q); a_e's memory is a_e^T (P x rows, ld P), so it is transposed.
        gemm(
            &blas,
            op,
            (q, p, rows),
            (&be, false, q),
            (&ae, true, p),
            (&mut dwe, q),
        )?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(dw, dev.clone()),
        Shape::from((e, p, q)),
    ))
}
