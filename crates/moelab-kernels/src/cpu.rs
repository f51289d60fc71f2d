//! Shared CPU plumbing: dtype dispatch, contiguous slice access and row parallelism.

use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// Makes the C allocator keep the step's freed tensors for reuse instead of returning them to the
/// kernel. A training step allocates and frees the same few hundred buffers every step; glibc
/// serves buffers above its mmap threshold (128 KiB to 32 MiB) from fresh mappings, so every
/// step paid a page fault per 4 KiB touched and a TLB shootdown per free (12% of a tiny step).
/// Peak memory is unchanged: the buffers are reused, not added. Call once, at the start of the
/// process; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters, under the allocator's own locks.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Work size (elements) above which row loops go to rayon; below it the hand-off costs more.
pub(crate) const PAR_THRESHOLD: usize = 1 << 16;

/// Scalar type used for intermediate maths (f32 for f32/bf16/f16, f64 for f64).
pub(crate) trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn from_usize(v: usize) -> Self;
}

macro_rules! impl_acc {
    ($t:ty) => {
        impl Acc for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn from_usize(v: usize) -> Self {
                v as $t
            }
        }
    };
}
impl_acc!(f32);
impl_acc!(f64);

/// A float storage element with its accumulation type.
pub(crate) trait Elem: WithDType {
    type A: Acc;
    fn to_acc(self) -> Self::A;
    fn from_acc(a: Self::A) -> Self;
}

impl Elem for f32 {
    type A = f32;
    fn to_acc(self) -> f32 {
        self
    }
    fn from_acc(a: f32) -> Self {
        a
    }
}

impl Elem for f64 {
    type A = f64;
    fn to_acc(self) -> f64 {
        self
    }
    fn from_acc(a: f64) -> Self {
        a
    }
}

impl Elem for half::bf16 {
    type A = f32;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(a: f32) -> Self {
        half::bf16::from_f32(a)
    }
}

impl Elem for half::f16 {
    type A = f32;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(a: f32) -> Self {
        half::f16::from_f32(a)
    }
}

/// Runs `$body` with `$T` bound to the Rust type of a float `$dtype`; other dtypes are an error
/// naming the op.
macro_rules! float_dispatch {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            dt => candle_core::bail!(
                "{}: unsupported dtype {:?} (expected f32, f64, bf16 or f16)",
                $op,
                dt
            ),
        }
    };
}
pub(crate) use float_dispatch;

/// The elements of a contiguous storage view; wrappers call `.contiguous()`, so failure here
/// means a caller bypassed them.
pub(crate) fn contiguous<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: {what} must be contiguous");
    };
    match data.get(start..end) {
        Some(d) => Ok(d),
        None => bail!("{op}: {what} layout exceeds its storage"),
    }
}

/// Calls `f(row_index, out_row)` for every `row_len`-sized row of `dst`, in parallel when
/// `work` (elements touched) is large.
pub(crate) fn map_rows<U: Send>(
    dst: &mut [U],
    row_len: usize,
    work: usize,
    f: impl Fn(usize, &mut [U]) + Send + Sync,
) {
    if row_len == 0 {
        return;
    }
    if work > PAR_THRESHOLD {
        dst.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        dst.chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    }
}

/// Errors unless `t` is one of the float dtypes the kernels handle.
pub(crate) fn check_float(op: &str, what: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 => Ok(()),
        dt => bail!("{op}: {what} has unsupported dtype {dt:?} (expected f32, f64, bf16 or f16)"),
    }
}

/// Errors unless `t` has the same dtype as `reference`.
pub(crate) fn check_same_dtype(op: &str, what: &str, t: &Tensor, reference: &Tensor) -> Result<()> {
    if t.dtype() != reference.dtype() {
        bail!(
            "{op}: {what} has dtype {:?} but the input has {:?}",
            t.dtype(),
            reference.dtype()
        );
    }
    Ok(())
}

/// The dtype of a CPU storage (saves importing candle's backend trait everywhere).
pub(crate) fn storage_dtype(s: &CpuStorage) -> DType {
    candle_core::backend::BackendStorage::dtype(s)
}
