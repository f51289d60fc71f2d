//! Launchers for `kernels/moe_dispatch.cu`: the permute (a row gather), the un-permute with the
//! gate-weighted combine (one thread per output element summing its token's rows in order) and
//! the un-permute's backward (one block per row). The routing index comes from
//! `crate::moe_dispatch::Routing`, uploaded once per routing.

use super::{
    alloc_output, config, cuda_dispatch, function, grid_stride_config, input, launch, rows_config,
    storage_dtype, KernelElem,
};
use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::{bail, CudaStorage, Layout, Result, Shape};

/// The routing index on the device: views into the packed u32 tensor of
/// `Routing::device_index` (`token_of_row`, then `starts`, then `row_ids`).
pub(crate) struct DeviceRouting<'a> {
    token_of_row: CudaView<'a, u32>,
    starts: CudaView<'a, u32>,
    row_ids: CudaView<'a, u32>,
    rows: usize,
    n_tokens: usize,
}

impl<'a> DeviceRouting<'a> {
    /// Splits the packed index of `rows` rows over `n_tokens` tokens.
    pub(crate) fn new(
        op: &str,
        s: &'a CudaStorage,
        l: &Layout,
        rows: usize,
        n_tokens: usize,
    ) -> Result<Self> {
        let all = input::<u32>(s, l, op, "the routing index")?;
        if all.len() != 2 * rows + n_tokens + 1 {
            bail!(
                "{op}: routing index of {} entries for {rows} rows and {n_tokens} tokens",
                all.len()
            );
        }
        Ok(Self {
            token_of_row: all.slice(0..rows),
            starts: all.slice(rows..rows + n_tokens + 1),
            row_ids: all.slice(rows + n_tokens + 1..),
            rows,
            n_tokens,
        })
    }
}

/// The width of a `(n, d)` matrix whose row count must be `n`.
fn width(op: &str, what: &str, l: &Layout, n: usize) -> Result<usize> {
    match l.dims() {
        [rows, d] if *rows == n => Ok(*d),
        dims => bail!("{op}: {what} must be ({n}, d), got {dims:?}"),
    }
}

/// `x (tokens, d)` -> `(rows, d)`: row r is `x[token_of_row[r]]`.
pub(crate) fn permute_fwd(
    op: &str,
    (xs, xl): (&CudaStorage, &Layout),
    routing: &DeviceRouting<'_>,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(xs), op, T => permute_fwd_typed::<T>(op, (xs, xl), routing))
}

fn permute_fwd_typed<T: KernelElem>(
    op: &str,
    (xs, xl): (&CudaStorage, &Layout),
    routing: &DeviceRouting<'_>,
) -> Result<(CudaStorage, Shape)> {
    let dev = &xs.device;
    let x = input::<T>(xs, xl, op, "x")?;
    let d = width(op, "x", xl, routing.n_tokens)?;
    let rows = routing.rows;
    let len = rows * d;
    let mut y = alloc_output::<T>(dev, len, op)?;
    if len > 0 {
        let func = function(dev, &format!("moelab_moe_gather_{}", T::SUFFIX), op)?;
        launch!(
            dev,
            op,
            func,
            grid_stride_config(len),
            &x,
            &routing.token_of_row,
            &mut y,
            &rows,
            &d
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        Shape::from((rows, d)),
    ))
}

/// `rows (rows, d)`, `gates (rows,)` -> `(tokens, d)`: token t gets the sum over its rows of
/// `gates[r] * rows[r]`, in row order (zeros for a token without rows).
pub(crate) fn unpermute_fwd(
    op: &str,
    (rs, rl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    routing: &DeviceRouting<'_>,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(rs), op, T => unpermute_fwd_typed::<T>(op, (rs, rl), (gs, gl), routing))
}

fn unpermute_fwd_typed<T: KernelElem>(
    op: &str,
    (rs, rl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    routing: &DeviceRouting<'_>,
) -> Result<(CudaStorage, Shape)> {
    let dev = &rs.device;
    let rows = input::<T>(rs, rl, op, "rows")?;
    let gates = input::<T>(gs, gl, op, "gates")?;
    let d = width(op, "rows", rl, routing.rows)?;
    if gates.len() != routing.rows {
        bail!(
            "{op}: gates {:?} do not match the routing's {} rows",
            gl.dims(),
            routing.rows
        );
    }
    let n_tokens = routing.n_tokens;
    let len = n_tokens * d;
    let mut out = alloc_output::<T>(dev, len, op)?;
    if len > 0 {
        let func = function(dev, &format!("moelab_moe_combine_{}", T::SUFFIX), op)?;
        launch!(
            dev,
            op,
            func,
            grid_stride_config(len),
            &rows,
            &gates,
            &routing.starts,
            &routing.row_ids,
            &mut out,
            &n_tokens,
            &d
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((n_tokens, d)),
    ))
}

/// `(rows, gates, grad)` -> d_rows `(rows, d)` then d_gates `(rows,)` in one flat storage, as
/// the CPU backward: `d_rows[r] = gates[r] grad[t]`, `d_gates[r] = <rows[r], grad[t]>`.
pub(crate) fn unpermute_bwd(
    op: &str,
    (rs, rl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    (ds, dl): (&CudaStorage, &Layout),
    routing: &DeviceRouting<'_>,
) -> Result<(CudaStorage, Shape)> {
    cuda_dispatch!(storage_dtype(rs), op, T => unpermute_bwd_typed::<T>(op, (rs, rl), (gs, gl), (ds, dl), routing))
}

fn unpermute_bwd_typed<T: KernelElem>(
    op: &str,
    (rs, rl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    (ds, dl): (&CudaStorage, &Layout),
    routing: &DeviceRouting<'_>,
) -> Result<(CudaStorage, Shape)> {
    let dev = &rs.device;
    let rows_in = input::<T>(rs, rl, op, "rows")?;
    let gates = input::<T>(gs, gl, op, "gates")?;
    let grad = input::<T>(ds, dl, op, "grad")?;
    let rows = routing.rows;
    let d = width(op, "rows", rl, rows)?;
    if gates.len() != rows || grad.len() != routing.n_tokens * d {
        bail!(
            "{op}: gates {:?} and grad {:?} do not match the routing ({rows} rows, {} tokens, d {d})",
            gl.dims(),
            dl.dims(),
            routing.n_tokens
        );
    }
    let len = rows * d + rows;
    let mut out = alloc_output::<T>(dev, len, op)?;
    if rows > 0 {
        let func = function(dev, &format!("moelab_moe_unpermute_bwd_{}", T::SUFFIX), op)?;
        launch!(
            dev,
            op,
            func,
            rows_config(rows, op)?,
            &rows_in,
            &gates,
            &grad,
            &routing.token_of_row,
            &mut out,
            &rows,
            &d
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(len),
    ))
}

/// The dispatch plan (`kernels/moe_plan.cu`) from `ids (tokens, k)` and the per-expert row
/// `offsets (n_experts + 1)`: one u32 storage holding the packed routing index (token_of_row,
/// starts, row_ids) then assignment_of_row; nothing is copied to the host.
pub(crate) fn plan(
    op: &str,
    k: usize,
    (is, il): (&CudaStorage, &Layout),
    (os, ol): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = &is.device;
    let ids = input::<u32>(is, il, op, "expert ids")?;
    let offsets = input::<u32>(os, ol, op, "offsets")?;
    let n_assign = ids.len();
    if k == 0 || !n_assign.is_multiple_of(k) || offsets.len() < 2 {
        bail!(
            "{op}: {n_assign} ids, k {k} and {} offsets do not match",
            offsets.len()
        );
    }
    let (tokens, n_experts) = (n_assign / k, offsets.len() - 1);
    let index_len = 2 * n_assign + tokens + 1;
    let mut out = alloc_output::<u32>(dev, index_len + n_assign, op)?;
    let mut scratch = alloc_output::<u32>(dev, n_assign.max(1), op)?;
    let (scatter, csr) = crate::launch::moe_plan(op, tokens, n_experts)?;
    {
        let (mut index, mut assignment_of_row) = out.split_at_mut(index_len);
        let func = function(dev, "moelab_moe_plan_scatter", op)?;
        launch!(
            dev,
            op,
            func,
            config(scatter),
            &ids,
            &offsets,
            &mut index,
            &mut assignment_of_row,
            &mut scratch,
            &n_assign,
            &k
        );
        let func = function(dev, "moelab_moe_plan_csr", op)?;
        launch!(
            dev,
            op,
            func,
            config(csr),
            &scratch,
            &mut index,
            &tokens,
            &k
        );
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(index_len + n_assign),
    ))
}
