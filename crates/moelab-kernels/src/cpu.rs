//! Shared CPU plumbing: dtype dispatch, contiguous slice access and row parallelism.

use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// Process-wide CPU settings for training; call once at the start of `main`, before any other
/// thread exists (it sets an environment variable).
///
/// - The C allocator keeps the step's freed tensors for reuse instead of returning them to the
///   kernel. A step allocates and frees the same few hundred buffers every time; glibc serves
///   buffers above its mmap threshold (128 KiB to 32 MiB) from fresh mappings, so every step
///   paid a page fault per 4 KiB touched and a TLB shootdown per free (12% of a tiny step). With
///   one arena for all threads, peak memory stays below what it was: the buffers are reused, not
///   added. A no-op off glibc.
/// - candle's elementwise ops run on the calling thread (`CANDLE_NUM_THREADS=1` unless set).
///   candle 0.11 splits them over a barrier pool of its own threads beside rayon's: a second set
///   of threads on the same cores, which also spin after each op and serialise concurrent callers
///   behind one lock. With the step's micro-batches on separate pool threads that lock cost a
///   sixth of the step (tiny.toml, 2 cores: 171-182 -> 150-160 ms for two micro-batches); one
///   micro-batch alone runs no slower without it.
pub fn tune_cpu_runtime() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters, under the allocator's own locks.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        // One arena: the step's buffers are allocated on whichever pool thread runs an op, and
        // per-thread arenas would each keep their own freed copies (tiny run: 570 -> 272 MB).
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    const CANDLE_THREADS: &str = "CANDLE_NUM_THREADS";
    if std::env::var_os(CANDLE_THREADS).is_none() {
        std::env::set_var(CANDLE_THREADS, "1");
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

/// `e^x` in f32 without a libm call, so that loops over rows vectorise: `x = n ln2 + r` with
/// |r| <= ln2 / 2 (Cody-Waite split of ln2), `e^r` by its Taylor polynomial to degree 7 (relative
/// error < 2^-23 on that interval), `2^n` built in the exponent bits. Within a few ulp of the
/// correctly rounded result over the normal range; 0 below it (x < -87.3), infinity above 88.7,
/// NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer in two float ops.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.7);
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // n is in [-126, 128] and 2^128 is not a float: 2^n as 2^(n/2) 2^(n - n/2), each in range.
    // The integer n is read from the rounding sum's low mantissa bits (no float-to-int
    // conversion, which would not vectorise); a NaN gives garbage bits here and NaN from p.
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = p * pow2(n >> 1) * pow2(n - (n >> 1));
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// Runs `f` compiled for AVX2 where the CPU has it (x86-64), else as built. `f` and what it
/// calls must be `#[inline(always)]` to be compiled into the AVX2 copy. AVX2 only widens the
/// vectors: per-element arithmetic and the fixed 8-lane reduction order are the same either
/// way, so results are bit-identical with and without it (FMA is not enabled: it would change
/// rounding).
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

/// Lanes of the row reductions below: sums and maxima run over 8 independent accumulators,
/// then the lanes in order, so they vectorise and their order does not depend on threads.
const LANES: usize = 8;

/// The largest element of `row` (-inf when empty).
#[inline(always)]
pub(crate) fn row_max<T: Elem>(row: &[T]) -> T::A {
    let (chunks, rest) = row.as_chunks::<LANES>();
    let mut lanes = [<T::A as Acc>::NEG_INFINITY; LANES];
    for chunk in chunks {
        for i in 0..LANES {
            let v = chunk[i].to_acc();
            lanes[i] = if v > lanes[i] { v } else { lanes[i] };
        }
    }
    lanes
        .into_iter()
        .chain(rest.iter().map(|v| v.to_acc()))
        .fold(
            <T::A as Acc>::NEG_INFINITY,
            |m, v| if v > m { v } else { m },
        )
}

/// `sum(exp(x - shift))` over `row`, also writing each `exp(x - shift)` to `out` when given.
/// The exps go through a small buffer first (a plain map loop, which vectorises).
#[inline(always)]
pub(crate) fn exp_sum<T: Elem>(row: &[T], shift: T::A, mut out: Option<&mut [T]>) -> T::A {
    const BLOCK: usize = 256;
    let mut buf = [<T::A as Acc>::ZERO; BLOCK];
    let mut lanes = [<T::A as Acc>::ZERO; LANES];
    for (b, block) in row.chunks(BLOCK).enumerate() {
        let exps = &mut buf[..block.len()];
        for (e, v) in exps.iter_mut().zip(block) {
            *e = (v.to_acc() - shift).exp();
        }
        if let Some(out) = out.as_deref_mut() {
            for (o, e) in out[b * BLOCK..].iter_mut().zip(exps.iter()) {
                *o = T::from_acc(*e);
            }
        }
        let (chunks, rest) = exps.as_chunks::<LANES>();
        for chunk in chunks {
            for i in 0..LANES {
                lanes[i] += chunk[i];
            }
        }
        for (lane, e) in lanes.iter_mut().zip(rest) {
            *lane += *e;
        }
    }
    let mut sum = <T::A as Acc>::ZERO;
    for lane in lanes {
        sum += lane;
    }
    sum
}

macro_rules! impl_acc {
    ($t:ty, $exp:expr) => {
        impl Acc for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn from_usize(v: usize) -> Self {
                v as $t
            }
        }
    };
}
// f32 (the training dtype, and bf16/f16's accumulator) takes the vectorisable exp; f64, the
// gradient checks' dtype, keeps libm's.
impl_acc!(f32, exp_f32);
impl_acc!(f64, f64::exp);

/// A float storage element with its accumulation type.
pub(crate) trait Elem: WithDType {
    type A: Acc;
    fn to_acc(self) -> Self::A;
    fn from_acc(a: Self::A) -> Self;
}

impl Elem for f32 {
    type A = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(a: f32) -> Self {
        a
    }
}

impl Elem for f64 {
    type A = f64;
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(a: f64) -> Self {
        a
    }
}

impl Elem for half::bf16 {
    type A = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(a: f32) -> Self {
        half::bf16::from_f32(a)
    }
}

impl Elem for half::f16 {
    type A = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
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

/// [`float_dispatch`] for the ops that compute in f32 or f64 only (their wrappers widen half
/// types before the op): `$T` bound to f32 or f64, other dtypes an error naming the op.
macro_rules! f32_f64_dispatch {
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
            dt => candle_core::bail!(
                "{}: unsupported dtype {:?} (expected f32 or f64; the op's wrapper converts bf16/f16)",
                $op,
                dt
            ),
        }
    };
}
pub(crate) use f32_f64_dispatch;

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

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_f32_is_within_a_few_ulp_of_the_exact_value() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let exact = f64::from(x).exp();
            let rel = ((f64::from(exp_f32(x)) - exact) / exact).abs();
            worst = worst.max(rel);
            x += 0.000_37;
        }
        // 4 ulp of f32 (2^-23 each).
        assert!(
            worst < 4.0 * f64::from(f32::EPSILON),
            "max relative error {worst}"
        );
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}

/// Scalar types gemm 0.19 implements.
pub(crate) trait GemmElem: WithDType {
    const ZERO: Self;
    const ONE: Self;
}
impl GemmElem for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}
impl GemmElem for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}
impl GemmElem for half::f16 {
    const ZERO: Self = half::f16::ZERO;
    const ONE: Self = half::f16::ONE;
}

/// A strided matrix view into a slice: (data, row stride, column stride).
pub(crate) type View<'a, T> = (&'a [T], usize, usize);

/// How [`gemm_into`] writes its result and whether it splits the product over rayon.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gemm {
    /// Add into `dst` instead of overwriting it.
    pub accumulate: bool,
    /// Split over the current rayon pool when the product is large enough to pay for it.
    pub threaded: bool,
}

impl Gemm {
    /// Overwrite; threaded when large (a product on its own).
    pub const SIZED: Gemm = Gemm {
        accumulate: false,
        threaded: true,
    };
    /// Overwrite, on this thread (a tile inside a task that is already parallel).
    pub const TILE: Gemm = Gemm {
        accumulate: false,
        threaded: false,
    };
    /// Add into dst, on this thread.
    pub const TILE_ADD: Gemm = Gemm {
        accumulate: true,
        threaded: false,
    };
}

/// Elements spanned by a `rows x cols` matrix view with the given strides.
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `dst (m x n, row-major) = lhs (m x k) @ rhs (k x n)` (or `+=` with `mode.accumulate`) through
/// the gemm crate; bounds are checked here so the unsafe gemm call cannot read or write out of
/// range.
pub(crate) fn gemm_into<T: GemmElem>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    lhs: View<'_, T>,
    rhs: View<'_, T>,
    mode: Gemm,
) -> Result<()> {
    let (lhs, lhs_rs, lhs_cs) = lhs;
    let (rhs, rhs_rs, rhs_cs) = rhs;
    if dst.len() < m * n
        || lhs.len() < span(m, k, lhs_rs, lhs_cs)
        || rhs.len() < span(k, n, rhs_rs, rhs_cs)
    {
        bail!("internal gemm view out of bounds ({m}x{k} @ {k}x{n})");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum: skip gemm rather than rely on how it treats k = 0.
        if !mode.accumulate {
            dst[..m * n].fill(T::ZERO);
        }
        return Ok(());
    }
    // Splitting small products over threads costs more than it saves.
    let parallelism = if mode.threaded && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // gemm computes dst = alpha * dst + beta * lhs @ rhs, reading dst only when asked.
    let (read_dst, alpha) = if mode.accumulate {
        (true, T::ONE)
    } else {
        (false, T::ZERO)
    };
    // SAFETY: every index gemm touches lies within the spans checked above, dst does not alias
    // lhs/rhs (it is a separate &mut), and T is one of gemm's supported scalar types.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            alpha,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}
