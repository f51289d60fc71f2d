//! Launch configurations of the `kernels/*.cu` kernels as pure functions of the problem's shape:
//! grid, block and dynamic shared-memory bytes, plus the scalar arguments derived from the
//! shapes. Both the cudarc launchers (feature `cuda`, `src/cuda/*.rs`) and the host emulation
//! (feature `cuda-emu`, `src/emu.rs`) call these, so a wrong grid fails the emulated tests in CI
//! exactly as it would fail on a device.
#![cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]

use candle_core::{bail, Result};

/// Threads per block of the row and grid-stride kernels; must equal `MOELAB_BLOCK` in
/// `kernels/common.cuh`.
pub(crate) const BLOCK: u32 = 256;

/// Threads (rows) per block of the flash-attention kernels; must equal `MOELAB_FA_ROWS`.
pub(crate) const FA_ROWS: usize = 64;

/// Largest head dim the flash-attention kernels hold per thread; must equal `MOELAB_FA_MAX_D`.
pub(crate) const FA_MAX_D: usize = 128;

/// Most blocks of the sum of squares' first pass (each sums a grid-stride share); the second
/// pass reduces their partials in one block.
pub(crate) const SUM_BLOCKS: usize = 1024;

/// Most blocks of a grid-stride launch; each thread loops over the rest.
pub(crate) const GRID_STRIDE_MAX_BLOCKS: usize = 1 << 16;

/// Dynamic shared memory a launch may use without opting in to more.
pub(crate) const MAX_DYNAMIC_SHARED: usize = 48 * 1024;

/// One kernel launch's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LaunchDims {
    /// Blocks in x, y, z.
    pub(crate) grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub(crate) block: (u32, u32, u32),
    /// Bytes of dynamic (`extern __shared__`) shared memory per block.
    pub(crate) shared_bytes: u32,
}

/// One block of BLOCK threads per row.
pub(crate) fn rows(rows: usize, op: &str) -> Result<LaunchDims> {
    // The grid's x dimension is limited to 2^31 - 1 blocks.
    let grid = match i32::try_from(rows) {
        Ok(g) if g > 0 => g as u32,
        _ => bail!("{op}: {rows} rows: a row launch needs 1 to 2^31 - 1 rows (one block each)"),
    };
    Ok(LaunchDims {
        grid: (grid, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    })
}

/// A grid-stride launch over `items` work items: at most 2^16 blocks of BLOCK threads, each
/// thread looping over the rest.
pub(crate) fn grid_stride(items: usize) -> LaunchDims {
    let blocks = items
        .div_ceil(BLOCK as usize)
        .clamp(1, GRID_STRIDE_MAX_BLOCKS) as u32;
    LaunchDims {
        grid: (blocks, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

/// `router_topk`: one block per token, with the token's selection scores (f32) and taken flags
/// (one byte each) in dynamic shared memory.
pub(crate) fn router_topk(op: &str, tokens: usize, n_experts: usize) -> Result<LaunchDims> {
    let shared = n_experts * (std::mem::size_of::<f32>() + 1);
    if shared > MAX_DYNAMIC_SHARED {
        bail!("{op}: {n_experts} experts exceed the kernel's 48 KiB of shared memory");
    }
    let mut dims = rows(tokens, op)?;
    dims.shared_bytes = shared as u32;
    Ok(dims)
}

/// Flash attention: grid (heads, row blocks of T) of FA_ROWS-thread blocks.
pub(crate) fn flash_head_rows(op: &str, heads: usize, t: usize) -> Result<LaunchDims> {
    let blocks = t.div_ceil(FA_ROWS);
    // The grid's x dimension is limited to 2^31 - 1 blocks, y to 65535.
    match (i32::try_from(heads), u16::try_from(blocks)) {
        (Ok(x), Ok(y)) if x > 0 && y > 0 => Ok(LaunchDims {
            grid: (x as u32, u32::from(y), 1),
            block: (FA_ROWS as u32, 1, 1),
            shared_bytes: 0,
        }),
        _ => bail!(
            "{op}: {heads} heads x {blocks} row blocks of {FA_ROWS} exceed the CUDA grid limits"
        ),
    }
}

/// The MoE dispatch plan's two kernels over `tokens` tokens of `n_experts` experts: the scatter
/// (one block per expert) and the CSR pass (grid-stride over the tokens).
pub(crate) fn moe_plan(
    op: &str,
    tokens: usize,
    n_experts: usize,
) -> Result<(LaunchDims, LaunchDims)> {
    Ok((rows(n_experts, op)?, grid_stride(tokens)))
}

/// The sum of squares' two passes over `n` elements: the number of partials, the first pass
/// (that many blocks) and the second (one block over the partials).
pub(crate) fn sum_squares(n: usize) -> (usize, LaunchDims, LaunchDims) {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, SUM_BLOCKS);
    let cfg = |blocks: usize| LaunchDims {
        grid: (blocks as u32, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    };
    (blocks, cfg(blocks), cfg(1))
}

/// Softmax's `(t_q, t_k)` for `x` of shape `dims`: t_k the last dim; t_q (causal only) the one
/// before it, which must not exceed t_k (1 when not causal).
pub(crate) fn softmax_shape(op: &str, dims: &[usize], causal: bool) -> Result<(usize, usize)> {
    let t_k = dims.last().copied().unwrap_or(1);
    let t_q = if causal {
        match dims {
            [.., t_q, _] => *t_q,
            _ => bail!("{op}: x must be (..., T_q, T_k), got {dims:?}"),
        }
    } else {
        1
    };
    if causal && t_q > t_k {
        bail!("{op}: T_q ({t_q}) must be <= T_k ({t_k})");
    }
    Ok((t_q, t_k))
}

/// RoPE's `(t, d)` for `x (B, H, T, D)` with `cos` / `sin (T, D/2)`.
pub(crate) fn rope_shape(
    op: &str,
    x: &[usize],
    cos: &[usize],
    sin: &[usize],
) -> Result<(usize, usize)> {
    let (t, d) = match x {
        [_, _, t, d] => (*t, *d),
        dims => bail!("{op}: x must be (B, H, T, D), got {dims:?}"),
    };
    if d % 2 != 0 || cos != [t, d / 2] || sin != [t, d / 2] {
        bail!("{op}: cos {cos:?} / sin {sin:?} do not match x {x:?}");
    }
    Ok((t, d))
}

/// `(N, V)` of a logits shape.
pub(crate) fn logits_dims(op: &str, dims: &[usize]) -> Result<(usize, usize)> {
    match dims {
        [n, v] => Ok((*n, *v)),
        dims => bail!("{op}: logits must be (N, V), got {dims:?}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn grids_cover_the_work() {
        assert_eq!(rows(37, "t").unwrap().grid, (37, 1, 1));
        assert!(rows(0, "t").is_err());
        assert_eq!(grid_stride(1).grid, (1, 1, 1));
        assert_eq!(grid_stride(257).grid, (2, 1, 1));
        assert_eq!(grid_stride(usize::MAX / 2).grid.0, 1 << 16);
        assert_eq!(flash_head_rows("t", 8, 130).unwrap().grid, (8, 3, 1));
        assert_eq!(router_topk("t", 5, 300).unwrap().shared_bytes, 1500);
        assert!(router_topk("t", 5, 10_000).is_err());
        let (blocks, first, second) = sum_squares(300_001);
        assert_eq!((blocks, first.grid.0, second.grid.0), (1024, 1024, 1));
    }

    #[test]
    fn shapes_are_checked() {
        assert_eq!(softmax_shape("t", &[2, 3, 5, 7], true).unwrap(), (5, 7));
        assert_eq!(softmax_shape("t", &[2, 7], false).unwrap(), (1, 7));
        assert!(softmax_shape("t", &[2, 8, 7], true).is_err());
        assert_eq!(
            rope_shape("t", &[1, 2, 3, 4], &[3, 2], &[3, 2]).unwrap(),
            (3, 4)
        );
        assert!(rope_shape("t", &[1, 2, 3, 4], &[3, 3], &[3, 2]).is_err());
        assert!(logits_dims("t", &[3]).is_err());
    }
}
