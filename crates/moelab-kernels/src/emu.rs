//! The CUDA kernels of `kernels/*.cu` run on the host (feature `cuda-emu`): the same sources,
//! compiled by build.rs with g++/clang against `kernels/emu/` (an emulation of the CUDA
//! execution model with barrier-deadlock, shared-memory race and bound, and global bound
//! checks), launched with the launch configurations of `crate::launch` that the cudarc launchers
//! use. Each function here is a thin host-slice adapter for one launcher of `src/cuda/*.rs`:
//! same shape checks, same grid / block / shared bytes, same kernel arguments in the same order,
//! and outputs poisoned with 0xFF bytes (NaN) before the kernel runs, as
//! `MOELAB_POISON_OUTPUTS=1` does on a device.
//!
//! Set `MOELAB_EMU_THREADS` to choose how many OS threads run a launch's blocks (default: the
//! available parallelism, at most 4).
#![allow(unsafe_code)]

use crate::adamw::AdamWUpdate;
use crate::launch::{self, LaunchDims};
use crate::moe_dispatch::Routing;
use candle_core::{bail, Result};
use std::ffi::{c_char, c_void, CString};

#[repr(C)]
struct Buffer {
    name: *const c_char,
    ptr: *const c_void,
    bytes: usize,
}

#[repr(C)]
struct Launch {
    kernel: *const c_char,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
    os_threads: u32,
    body: unsafe extern "C" fn(*mut c_void),
    ctx: *mut c_void,
    buffers: *const Buffer,
    n_buffers: usize,
}

extern "C" {
    fn moelab_emu_launch(cfg: *const Launch, err: *mut c_char, err_len: usize) -> i32;
    fn moelab_emu_f32_to_f16(f: f32) -> u16;
    fn moelab_emu_f32_to_bf16(f: f32) -> u16;
    fn moelab_emu_f16_to_f32(h: u16) -> f32;
}

/// The emulation's `__float2half_rn` (bits), for tests of its rounding.
pub fn f32_to_f16_bits(f: f32) -> u16 {
    // SAFETY: a pure function of its argument.
    unsafe { moelab_emu_f32_to_f16(f) }
}

/// The emulation's `__float2bfloat16_rn` (bits), for tests of its rounding.
pub fn f32_to_bf16_bits(f: f32) -> u16 {
    // SAFETY: a pure function of its argument.
    unsafe { moelab_emu_f32_to_bf16(f) }
}

/// The emulation's `__half2float`, for tests of its conversion.
pub fn f16_bits_to_f32(h: u16) -> f32 {
    // SAFETY: a pure function of its argument.
    unsafe { moelab_emu_f16_to_f32(h) }
}

/// Calls the closure behind `ctx` (one fiber's run of the kernel).
unsafe extern "C" fn trampoline<F: Fn()>(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `&F` that `run` passed, alive for the whole launch.
    unsafe { (*(ctx as *const F))() }
}

/// OS threads that run a launch's blocks.
fn os_threads() -> u32 {
    if let Some(n) = std::env::var("MOELAB_EMU_THREADS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        return n.max(1);
    }
    std::thread::available_parallelism()
        .map(|n| n.get().min(4) as u32)
        .unwrap_or(1)
}

/// A buffer a kernel may access, named for error messages.
pub struct Buf {
    name: &'static str,
    ptr: *const c_void,
    bytes: usize,
}

/// `slice` as a kernel buffer named `name`.
pub fn buf<T>(name: &'static str, slice: &[T]) -> Buf {
    Buf {
        name,
        ptr: slice.as_ptr().cast(),
        bytes: std::mem::size_of_val(slice),
    }
}

/// Launches any emulated kernel (the emulator's own tests use it): `grid` blocks of `block`
/// threads with `shared_bytes` of dynamic shared memory, each thread calling `body` (which
/// calls the kernel); `buffers` is all the memory the kernel may touch.
pub fn launch<F: Fn()>(
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    buffers: &[Buf],
    body: F,
) -> Result<()> {
    let dims = LaunchDims {
        grid,
        block,
        shared_bytes,
    };
    run(kernel, dims, buffers, body)
}

/// Runs `kernel` over `dims` on the emulation, every thread calling `body` (which calls the
/// kernel with its arguments); `buffers` are all the memory the kernel may touch.
pub(crate) fn run<F: Fn()>(kernel: &str, dims: LaunchDims, buffers: &[Buf], body: F) -> Result<()> {
    let name = CString::new(kernel).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let names: Vec<CString> = buffers
        .iter()
        .map(|b| CString::new(b.name).unwrap_or_default())
        .collect();
    let bufs: Vec<Buffer> = buffers
        .iter()
        .zip(&names)
        .map(|(b, n)| Buffer {
            name: n.as_ptr(),
            ptr: b.ptr,
            bytes: b.bytes,
        })
        .collect();
    let cfg = Launch {
        kernel: name.as_ptr(),
        grid: [dims.grid.0, dims.grid.1, dims.grid.2],
        block: [dims.block.0, dims.block.1, dims.block.2],
        shared_bytes: dims.shared_bytes,
        os_threads: os_threads(),
        body: trampoline::<F>,
        ctx: (&body as *const F).cast_mut().cast(),
        buffers: bufs.as_ptr(),
        n_buffers: bufs.len(),
    };
    let mut err = vec![0u8; 4096];
    // SAFETY: `cfg` and everything it points to outlive the call, which returns only once every
    // thread of the launch has finished; the kernel touches only `buffers` (checked).
    let rc = unsafe { moelab_emu_launch(&cfg, err.as_mut_ptr().cast(), err.len()) };
    if rc != 0 {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        bail!("cuda-emu: {}", String::from_utf8_lossy(&err[..end]));
    }
    Ok(())
}

/// Function pointers of one storage type's kernels (the `extern "C"` entry points of
/// `kernels/*.cu`, declared here with their C argument lists).
#[doc(hidden)]
pub struct Kernels<T> {
    softmax_fwd: unsafe extern "C" fn(*const T, *mut T, usize, usize, i32),
    softmax_bwd: unsafe extern "C" fn(*const T, *const T, *mut T, usize),
    rms_norm_fwd: unsafe extern "C" fn(*const T, *const T, *mut T, usize, f32),
    rope_fwd: unsafe extern "C" fn(*const T, *const T, *const T, *mut T, usize, usize, usize),
    cross_entropy_fwd: unsafe extern "C" fn(*const T, *const u32, *mut T, usize),
    cross_entropy_bwd: unsafe extern "C" fn(*const T, *const u32, *const T, *mut T, usize),
    swiglu_fwd: unsafe extern "C" fn(*const T, *const T, *mut T, usize),
    swiglu_bwd: unsafe extern "C" fn(*const T, *const T, *const T, *mut T, usize),
    moe_gather: unsafe extern "C" fn(*const T, *const u32, *mut T, usize, usize),
    moe_combine:
        unsafe extern "C" fn(*const T, *const T, *const u32, *const u32, *mut T, usize, usize),
    moe_unpermute_bwd:
        unsafe extern "C" fn(*const T, *const T, *const T, *const u32, *mut T, usize, usize),
    router_topk: unsafe extern "C" fn(*const T, *const f32, *mut u32, *mut u32, usize, usize, i32),
    sum_squares_partial: unsafe extern "C" fn(*const T, *mut f32, usize),
}

macro_rules! kernel_table {
    ($T:ty, $table:ident, $sfx:literal, [$sf:ident, $sb:ident, $rn:ident, $rope:ident, $cef:ident,
     $ceb:ident, $swf:ident, $swb:ident, $ga:ident, $co:ident, $ub:ident, $tk:ident,
     $ss:ident]) => {
        extern "C" {
            fn $sf(x: *const $T, y: *mut $T, t_q: usize, t_k: usize, causal: i32);
            fn $sb(y: *const $T, g: *const $T, dx: *mut $T, n: usize);
            fn $rn(x: *const $T, w: *const $T, y: *mut $T, d: usize, eps: f32);
            fn $rope(
                x: *const $T,
                cos: *const $T,
                sin: *const $T,
                y: *mut $T,
                rows: usize,
                t: usize,
                d: usize,
            );
            fn $cef(logits: *const $T, targets: *const u32, loss: *mut $T, v: usize);
            fn $ceb(logits: *const $T, targets: *const u32, g: *const $T, dl: *mut $T, v: usize);
            fn $swf(gate: *const $T, up: *const $T, y: *mut $T, n: usize);
            fn $swb(gate: *const $T, up: *const $T, grad: *const $T, out: *mut $T, n: usize);
            fn $ga(x: *const $T, token_of_row: *const u32, y: *mut $T, rows: usize, d: usize);
            fn $co(
                rows_in: *const $T,
                gates: *const $T,
                starts: *const u32,
                row_ids: *const u32,
                out: *mut $T,
                n_tokens: usize,
                d: usize,
            );
            fn $ub(
                rows_in: *const $T,
                gates: *const $T,
                grad: *const $T,
                token_of_row: *const u32,
                out: *mut $T,
                rows: usize,
                d: usize,
            );
            fn $tk(
                scores: *const $T,
                bias: *const f32,
                ids: *mut u32,
                counts: *mut u32,
                n_experts: usize,
                k: usize,
                has_bias: i32,
            );
            fn $ss(x: *const $T, partials: *mut f32, n: usize);
        }
        static $table: Kernels<$T> = Kernels {
            softmax_fwd: $sf,
            softmax_bwd: $sb,
            rms_norm_fwd: $rn,
            rope_fwd: $rope,
            cross_entropy_fwd: $cef,
            cross_entropy_bwd: $ceb,
            swiglu_fwd: $swf,
            swiglu_bwd: $swb,
            moe_gather: $ga,
            moe_combine: $co,
            moe_unpermute_bwd: $ub,
            router_topk: $tk,
            sum_squares_partial: $ss,
        };
        impl Elem for $T {
            const SUFFIX: &'static str = $sfx;
            fn kernels() -> &'static Kernels<Self> {
                &$table
            }
            fn poison() -> Self {
                <$T>::from_bits(!0)
            }
        }
    };
}

/// Storage types the kernels are instantiated for (f32, bf16, f16).
pub trait Elem: Copy + 'static {
    /// The kernel-name suffix (`f32`, `bf16`, `f16`).
    const SUFFIX: &'static str;
    /// This type's kernels.
    #[doc(hidden)]
    fn kernels() -> &'static Kernels<Self>;
    /// All-ones bits (NaN): what outputs hold before a kernel writes them.
    fn poison() -> Self;
}

kernel_table!(
    f32,
    KERNELS_F32,
    "f32",
    [
        moelab_softmax_fwd_f32,
        moelab_softmax_bwd_f32,
        moelab_rms_norm_fwd_f32,
        moelab_rope_fwd_f32,
        moelab_cross_entropy_fwd_f32,
        moelab_cross_entropy_bwd_f32,
        moelab_swiglu_fwd_f32,
        moelab_swiglu_bwd_f32,
        moelab_moe_gather_f32,
        moelab_moe_combine_f32,
        moelab_moe_unpermute_bwd_f32,
        moelab_router_topk_f32,
        moelab_sum_squares_partial_f32
    ]
);
kernel_table!(
    half::bf16,
    KERNELS_BF16,
    "bf16",
    [
        moelab_softmax_fwd_bf16,
        moelab_softmax_bwd_bf16,
        moelab_rms_norm_fwd_bf16,
        moelab_rope_fwd_bf16,
        moelab_cross_entropy_fwd_bf16,
        moelab_cross_entropy_bwd_bf16,
        moelab_swiglu_fwd_bf16,
        moelab_swiglu_bwd_bf16,
        moelab_moe_gather_bf16,
        moelab_moe_combine_bf16,
        moelab_moe_unpermute_bwd_bf16,
        moelab_router_topk_bf16,
        moelab_sum_squares_partial_bf16
    ]
);
kernel_table!(
    half::f16,
    KERNELS_F16,
    "f16",
    [
        moelab_softmax_fwd_f16,
        moelab_softmax_bwd_f16,
        moelab_rms_norm_fwd_f16,
        moelab_rope_fwd_f16,
        moelab_cross_entropy_fwd_f16,
        moelab_cross_entropy_bwd_f16,
        moelab_swiglu_fwd_f16,
        moelab_swiglu_bwd_f16,
        moelab_moe_gather_f16,
        moelab_moe_combine_f16,
        moelab_moe_unpermute_bwd_f16,
        moelab_router_topk_f16,
        moelab_sum_squares_partial_f16
    ]
);

extern "C" {
    fn moelab_adamw_f32(
        p: *mut f32,
        m: *mut f32,
        v: *mut f32,
        grad: *const f32,
        n: usize,
        scale: f32,
        keep1: f32,
        take1: f32,
        keep2: f32,
        take2: f32,
        inv_c1: f32,
        inv_c2: f32,
        eps: f32,
        lr: f32,
        keep: f32,
    );
    fn moelab_sum_f32(partials: *const f32, out: *mut f32, n: usize);
    fn moelab_flash_attn_fwd_f32(
        q: *const f32,
        k: *const f32,
        v: *const f32,
        out: *mut f32,
        b: usize,
        h: usize,
        kv: usize,
        t: usize,
        d: usize,
        scale: f32,
    );
    fn moelab_flash_attn_delta_f32(saved: *const f32, delta: *mut f32, rows: usize, d: usize);
    fn moelab_flash_attn_bwd_dq_f32(
        q: *const f32,
        kv_in: *const f32,
        saved: *const f32,
        delta: *const f32,
        grads: *mut f32,
        b: usize,
        h: usize,
        kv: usize,
        t: usize,
        d: usize,
        scale: f32,
    );
    fn moelab_flash_attn_bwd_dkv_f32(
        q: *const f32,
        kv_in: *const f32,
        saved: *const f32,
        delta: *const f32,
        grads: *mut f32,
        b: usize,
        h: usize,
        kv: usize,
        t: usize,
        d: usize,
        scale: f32,
    );
}

/// A `len`-element output, poisoned.
fn output<T: Elem>(len: usize) -> Vec<T> {
    vec![T::poison(); len]
}

/// Raw pointers the kernel threads share (the emulation runs them on its own threads).
#[derive(Clone, Copy)]
struct P<T>(*const T);
#[derive(Clone, Copy)]
struct M<T>(*mut T);

/// Softmax over the last dim of `x` (shape `dims`); `causal` masks keys past each query.
pub fn softmax_fwd<T: Elem>(x: &[T], dims: &[usize], causal: bool) -> Result<Vec<T>> {
    let op = "softmax";
    let (t_q, t_k) = launch::softmax_shape(op, dims, causal)?;
    check_len(op, "x", x.len(), dims.iter().product())?;
    let mut y = output::<T>(x.len());
    if !x.is_empty() {
        let dims = launch::rows(x.len() / t_k, op)?;
        let f = T::kernels().softmax_fwd;
        let (xp, yp) = (P(x.as_ptr()), M(y.as_mut_ptr()));
        let causal_flag = i32::from(causal);
        let bufs = [buf("x", x), buf("y", &y)];
        let name = format!("moelab_softmax_fwd_{}", T::SUFFIX);
        run(&name, dims, &bufs, move || unsafe {
            f(xp.0, yp.0, t_q, t_k, causal_flag)
        })?;
    }
    Ok(y)
}

/// dx = y * (g - sum(g * y)) per last-dim row of `y` (shape `dims`).
pub fn softmax_bwd<T: Elem>(y: &[T], g: &[T], dims: &[usize]) -> Result<Vec<T>> {
    let op = "softmax_bwd";
    let n = dims.last().copied().unwrap_or(1);
    check_len(op, "y", y.len(), dims.iter().product())?;
    check_len(op, "grad", g.len(), y.len())?;
    let mut dx = output::<T>(y.len());
    if !y.is_empty() {
        let dims = launch::rows(y.len() / n, op)?;
        let f = T::kernels().softmax_bwd;
        let (yp, gp, dp) = (P(y.as_ptr()), P(g.as_ptr()), M(dx.as_mut_ptr()));
        let bufs = [buf("y", y), buf("grad", g), buf("dx", &dx)];
        let name = format!("moelab_softmax_bwd_{}", T::SUFFIX);
        run(&name, dims, &bufs, move || unsafe {
            f(yp.0, gp.0, dp.0, n)
        })?;
    }
    Ok(dx)
}

/// RMSNorm over the last dim of `x` (shape `dims`) with weight `w`.
pub fn rms_norm_fwd<T: Elem>(x: &[T], dims: &[usize], w: &[T], eps: f64) -> Result<Vec<T>> {
    let op = "rms_norm";
    let d = w.len();
    if dims.last() != Some(&d) {
        bail!("{op}: weight length {d} does not match x shape {dims:?}");
    }
    check_len(op, "x", x.len(), dims.iter().product())?;
    let mut y = output::<T>(x.len());
    if !x.is_empty() {
        let dims = launch::rows(x.len() / d, op)?;
        let f = T::kernels().rms_norm_fwd;
        let (xp, wp, yp) = (P(x.as_ptr()), P(w.as_ptr()), M(y.as_mut_ptr()));
        let eps = eps as f32;
        let bufs = [buf("x", x), buf("weight", w), buf("y", &y)];
        let name = format!("moelab_rms_norm_fwd_{}", T::SUFFIX);
        run(&name, dims, &bufs, move || unsafe {
            f(xp.0, wp.0, yp.0, d, eps)
        })?;
    }
    Ok(y)
}

/// Rotary embedding of `x (B, H, T, D)` with `cos` / `sin (T, D/2)` (the backward is this with
/// `-sin`).
pub fn rope_fwd<T: Elem>(x: &[T], dims: &[usize], cos: &[T], sin: &[T]) -> Result<Vec<T>> {
    let op = "rope";
    check_len(op, "x", x.len(), dims.iter().product())?;
    let t = dims.get(2).copied().unwrap_or(0);
    let half_dims = [t, cos.len() / t.max(1)];
    let (t, d) = launch::rope_shape(op, dims, &half_dims, &[t, sin.len() / t.max(1)])?;
    check_len(op, "cos", cos.len(), t * d / 2)?;
    check_len(op, "sin", sin.len(), t * d / 2)?;
    let mut y = output::<T>(x.len());
    if !x.is_empty() {
        let rows = x.len() / d;
        let dims = launch::grid_stride(rows * (d / 2));
        let f = T::kernels().rope_fwd;
        let (xp, cp, sp, yp) = (
            P(x.as_ptr()),
            P(cos.as_ptr()),
            P(sin.as_ptr()),
            M(y.as_mut_ptr()),
        );
        let bufs = [buf("x", x), buf("cos", cos), buf("sin", sin), buf("y", &y)];
        let name = format!("moelab_rope_fwd_{}", T::SUFFIX);
        run(&name, dims, &bufs, move || unsafe {
            f(xp.0, cp.0, sp.0, yp.0, rows, t, d)
        })?;
    }
    Ok(y)
}

/// Per-row cross-entropy of `logits (n, v)` against `targets (n,)`.
pub fn cross_entropy_fwd<T: Elem>(
    logits: &[T],
    n: usize,
    v: usize,
    targets: &[u32],
) -> Result<Vec<T>> {
    let op = "cross_entropy";
    let (n, v) = launch::logits_dims(op, &[n, v])?;
    check_len(op, "logits", logits.len(), n * v)?;
    check_len(op, "targets", targets.len(), n)?;
    let mut loss = output::<T>(n);
    if n > 0 && v > 0 {
        let dims = launch::rows(n, op)?;
        let f = T::kernels().cross_entropy_fwd;
        let (lp, tp, op_) = (
            P(logits.as_ptr()),
            P(targets.as_ptr()),
            M(loss.as_mut_ptr()),
        );
        let bufs = [
            buf("logits", logits),
            buf("targets", targets),
            buf("loss", &loss),
        ];
        let name = format!("moelab_cross_entropy_fwd_{}", T::SUFFIX);
        run(&name, dims, &bufs, move || unsafe {
            f(lp.0, tp.0, op_.0, v)
        })?;
    } else if n > 0 {
        bail!("{op}: logits have zero classes");
    }
    Ok(loss)
}

/// dlogits = (softmax(row) - onehot(target)) * g[row].
pub fn cross_entropy_bwd<T: Elem>(
    logits: &[T],
    n: usize,
    v: usize,
    targets: &[u32],
    g: &[T],
) -> Result<Vec<T>> {
    let op = "cross_entropy_bwd";
    check_len(op, "logits", logits.len(), n * v)?;
    check_len(op, "targets", targets.len(), n)?;
    check_len(op, "grad", g.len(), n)?;
    let mut dl = output::<T>(logits.len());
    if !logits.is_empty() {
        let dims = launch::rows(n, op)?;
        let f = T::kernels().cross_entropy_bwd;
        let (lp, tp, gp, dp) = (
            P(logits.as_ptr()),
            P(targets.as_ptr()),
            P(g.as_ptr()),
            M(dl.as_mut_ptr()),
        );
        let bufs = [
            buf("logits", logits),
            buf("targets", targets),
            buf("grad", g),
            buf("dlogits", &dl),
        ];
        let name = format!("moelab_cross_entropy_bwd_{}", T::SUFFIX);
        run(&name, dims, &bufs, move || unsafe {
            f(lp.0, tp.0, gp.0, dp.0, v)
        })?;
    }
    Ok(dl)
}

/// `silu(gate) * up`.
pub fn swiglu_fwd<T: Elem>(gate: &[T], up: &[T]) -> Result<Vec<T>> {
    let op = "swiglu";
    check_len(op, "up", up.len(), gate.len())?;
    let n = gate.len();
    let mut y = output::<T>(n);
    if n > 0 {
        let f = T::kernels().swiglu_fwd;
        let (gp, up_, yp) = (P(gate.as_ptr()), P(up.as_ptr()), M(y.as_mut_ptr()));
        let bufs = [buf("gate", gate), buf("up", up), buf("y", &y)];
        let name = format!("moelab_swiglu_fwd_{}", T::SUFFIX);
        run(&name, launch::grid_stride(n), &bufs, move || unsafe {
            f(gp.0, up_.0, yp.0, n)
        })?;
    }
    Ok(y)
}

/// dgate then dup, `(2 n,)`.
pub fn swiglu_bwd<T: Elem>(gate: &[T], up: &[T], grad: &[T]) -> Result<Vec<T>> {
    let op = "swiglu_bwd";
    let n = gate.len();
    check_len(op, "up", up.len(), n)?;
    check_len(op, "grad", grad.len(), n)?;
    let mut out = output::<T>(2 * n);
    if n > 0 {
        let f = T::kernels().swiglu_bwd;
        let (gp, up_, dp, op_) = (
            P(gate.as_ptr()),
            P(up.as_ptr()),
            P(grad.as_ptr()),
            M(out.as_mut_ptr()),
        );
        let bufs = [
            buf("gate", gate),
            buf("up", up),
            buf("grad", grad),
            buf("out", &out),
        ];
        let name = format!("moelab_swiglu_bwd_{}", T::SUFFIX);
        run(&name, launch::grid_stride(n), &bufs, move || unsafe {
            f(gp.0, up_.0, dp.0, op_.0, n)
        })?;
    }
    Ok(out)
}

/// The routing's device index and its parts' offsets: (packed, rows, n_tokens).
fn routing_index(routing: &Routing) -> (Vec<u32>, usize, usize) {
    let (n_tokens, rows) = routing.sizes();
    (routing.packed_index(), rows, n_tokens)
}

/// The permute: `x (tokens, d)` -> `(rows, d)`, row r = `x[token_of_row[r]]`.
pub fn moe_permute<T: Elem>(x: &[T], d: usize, routing: &Routing) -> Result<Vec<T>> {
    let op = "moe_permute";
    let (index, rows, n_tokens) = routing_index(routing);
    check_len(op, "x", x.len(), n_tokens * d)?;
    let len = rows * d;
    let mut y = output::<T>(len);
    if len > 0 {
        let f = T::kernels().moe_gather;
        let token_of_row = &index[..rows];
        let (xp, ip, yp) = (P(x.as_ptr()), P(token_of_row.as_ptr()), M(y.as_mut_ptr()));
        let bufs = [buf("x", x), buf("token_of_row", token_of_row), buf("y", &y)];
        let name = format!("moelab_moe_gather_{}", T::SUFFIX);
        run(&name, launch::grid_stride(len), &bufs, move || unsafe {
            f(xp.0, ip.0, yp.0, rows, d)
        })?;
    }
    Ok(y)
}

/// The un-permute: `rows (rows, d)`, `gates (rows,)` -> `(tokens, d)`, each token the gated sum
/// of its rows in row order.
pub fn moe_unpermute<T: Elem>(
    rows_in: &[T],
    gates: &[T],
    d: usize,
    routing: &Routing,
) -> Result<Vec<T>> {
    let op = "moe_unpermute";
    let (index, rows, n_tokens) = routing_index(routing);
    check_len(op, "rows", rows_in.len(), rows * d)?;
    check_len(op, "gates", gates.len(), rows)?;
    let len = n_tokens * d;
    let mut out = output::<T>(len);
    if len > 0 {
        let f = T::kernels().moe_combine;
        let starts = &index[rows..rows + n_tokens + 1];
        let row_ids = &index[rows + n_tokens + 1..];
        let (rp, gp, sp, ip, op_) = (
            P(rows_in.as_ptr()),
            P(gates.as_ptr()),
            P(starts.as_ptr()),
            P(row_ids.as_ptr()),
            M(out.as_mut_ptr()),
        );
        let bufs = [
            buf("rows", rows_in),
            buf("gates", gates),
            buf("starts", starts),
            buf("row_ids", row_ids),
            buf("out", &out),
        ];
        let name = format!("moelab_moe_combine_{}", T::SUFFIX);
        run(&name, launch::grid_stride(len), &bufs, move || unsafe {
            f(rp.0, gp.0, sp.0, ip.0, op_.0, n_tokens, d)
        })?;
    }
    Ok(out)
}

/// The un-permute's backward: d_rows `(rows, d)` then d_gates `(rows,)`.
pub fn moe_unpermute_bwd<T: Elem>(
    rows_in: &[T],
    gates: &[T],
    grad: &[T],
    d: usize,
    routing: &Routing,
) -> Result<Vec<T>> {
    let op = "moe_unpermute_bwd";
    let (index, rows, n_tokens) = routing_index(routing);
    check_len(op, "rows", rows_in.len(), rows * d)?;
    check_len(op, "gates", gates.len(), rows)?;
    check_len(op, "grad", grad.len(), n_tokens * d)?;
    let mut out = output::<T>(rows * d + rows);
    if rows > 0 {
        let f = T::kernels().moe_unpermute_bwd;
        let token_of_row = &index[..rows];
        let (rp, gp, dp, ip, op_) = (
            P(rows_in.as_ptr()),
            P(gates.as_ptr()),
            P(grad.as_ptr()),
            P(token_of_row.as_ptr()),
            M(out.as_mut_ptr()),
        );
        let bufs = [
            buf("rows", rows_in),
            buf("gates", gates),
            buf("grad", grad),
            buf("token_of_row", token_of_row),
            buf("out", &out),
        ];
        let name = format!("moelab_moe_unpermute_bwd_{}", T::SUFFIX);
        run(&name, launch::rows(rows, op)?, &bufs, move || unsafe {
            f(rp.0, gp.0, dp.0, ip.0, op_.0, rows, d)
        })?;
    }
    Ok(out)
}

/// Router top-k of `scores (tokens, n_experts)` plus `bias` (zeros when None, as the router
/// passes): the ids `(tokens * k)` and the per-expert counts.
pub fn router_topk<T: Elem>(
    scores: &[T],
    n_experts: usize,
    bias: Option<&[f32]>,
    k: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let op = "router_topk";
    let zeros = vec![0.0f32; n_experts];
    let bias = bias.unwrap_or(&zeros);
    if n_experts == 0
        || !scores.len().is_multiple_of(n_experts)
        || k == 0
        || k > n_experts
        || bias.len() != n_experts
    {
        bail!(
            "{op}: {} scores, {} biases, {n_experts} experts and k {k} do not match",
            scores.len(),
            bias.len()
        );
    }
    let tokens = scores.len() / n_experts;
    let dims = launch::router_topk(op, tokens.max(1), n_experts)?;
    // Zeroed, not poisoned: the counts are accumulated; every id is written.
    let mut out = vec![0u32; tokens * k + n_experts];
    if tokens > 0 {
        let f = T::kernels().router_topk;
        let has_bias = 1i32;
        let (ids, counts) = out.split_at_mut(tokens * k);
        let (sp, bp, ip, cp) = (
            P(scores.as_ptr()),
            P(bias.as_ptr()),
            M(ids.as_mut_ptr()),
            M(counts.as_mut_ptr()),
        );
        let bufs = [
            buf("scores", scores),
            buf("bias", bias),
            buf("ids", ids),
            buf("counts", counts),
        ];
        let name = format!("moelab_router_topk_{}", T::SUFFIX);
        run(&name, dims, &bufs, move || unsafe {
            f(sp.0, bp.0, ip.0, cp.0, n_experts, k, has_bias)
        })?;
    }
    let counts = out.split_off(tokens * k);
    Ok((out, counts))
}

/// `sum(x^2)` in f32 by the two-pass block reduction.
pub fn sum_of_squares<T: Elem>(x: &[T]) -> Result<f32> {
    let op = "sum_of_squares";
    let n = x.len();
    let (blocks, first, second) = launch::sum_squares(n);
    let mut partials = output::<f32>(blocks);
    let f = T::kernels().sum_squares_partial;
    let (xp, pp) = (P(x.as_ptr()), M(partials.as_mut_ptr()));
    let bufs = [buf("x", x), buf("partials", &partials)];
    let name = format!("moelab_sum_squares_partial_{}", T::SUFFIX);
    run(&name, first, &bufs, move || unsafe { f(xp.0, pp.0, n) })?;
    let mut out = output::<f32>(1);
    let (pp, outp) = (P(partials.as_ptr()), M(out.as_mut_ptr()));
    let bufs = [buf("partials", &partials), buf("out", &out)];
    run("moelab_sum_f32", second, &bufs, move || unsafe {
        moelab_sum_f32(pp.0, outp.0, blocks)
    })
    .map_err(|e| e.context(op))?;
    Ok(out[0])
}

/// One fused AdamW step of `p`, `m`, `v` in place.
pub fn adamw_step(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    u: &AdamWUpdate,
) -> Result<()> {
    let op = "adamw_update";
    let n = p.len();
    check_len(op, "m", m.len(), n)?;
    check_len(op, "v", v.len(), n)?;
    check_len(op, "grad", grad.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let [scale, keep1, take1, keep2, take2, inv_c1, inv_c2, eps, lr, keep] = u.kernel_scalars();
    let bufs = [buf("p", p), buf("m", m), buf("v", v), buf("grad", grad)];
    let (pp, mp, vp, gp) = (
        M(p.as_mut_ptr()),
        M(m.as_mut_ptr()),
        M(v.as_mut_ptr()),
        P(grad.as_ptr()),
    );
    run(
        "moelab_adamw_f32",
        launch::grid_stride(n),
        &bufs,
        move || unsafe {
            moelab_adamw_f32(
                pp.0, mp.0, vp.0, gp.0, n, scale, keep1, take1, keep2, take2, inv_c1, inv_c2, eps,
                lr, keep,
            )
        },
    )
}

/// Flash attention's shapes `(B, H, KV, T, D)`, checked as the CUDA launcher checks them.
fn fa_dims(
    op: &str,
    (b, h, kv, t, d): (usize, usize, usize, usize, usize),
) -> Result<crate::flash_attention::Dims> {
    if kv == 0 || h % kv != 0 || d == 0 || d > launch::FA_MAX_D {
        bail!(
            "{op}: H {h} must be a multiple of KV {kv}, and D {d} in 1..={}",
            launch::FA_MAX_D
        );
    }
    Ok(crate::flash_attention::Dims { b, h, kv, t, d })
}

/// Flash attention forward: O then L, `(B*H*T*(D + 1),)`.
pub fn flash_attention_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: (usize, usize, usize, usize, usize),
    scale: f64,
) -> Result<Vec<f32>> {
    let op = "flash_attention";
    let dims = fa_dims(op, shape)?;
    check_len(op, "q", q.len(), dims.q_len())?;
    check_len(op, "k", k.len(), dims.kv_len())?;
    check_len(op, "v", v.len(), dims.kv_len())?;
    let mut out = output::<f32>(dims.q_len() + dims.lse_len());
    if dims.lse_len() > 0 {
        let cfg = launch::flash_head_rows(op, dims.b * dims.h, dims.t)?;
        let scale = scale as f32;
        let (b, h, kv, t, d) = (dims.b, dims.h, dims.kv, dims.t, dims.d);
        let (qp, kp, vp, op_) = (
            P(q.as_ptr()),
            P(k.as_ptr()),
            P(v.as_ptr()),
            M(out.as_mut_ptr()),
        );
        let bufs = [buf("q", q), buf("k", k), buf("v", v), buf("out", &out)];
        run("moelab_flash_attn_fwd_f32", cfg, &bufs, move || unsafe {
            moelab_flash_attn_fwd_f32(qp.0, kp.0, vp.0, op_.0, b, h, kv, t, d, scale)
        })?;
    }
    Ok(out)
}

/// Flash attention backward from `(q, k ++ v, O ++ L ++ dO ++ dL)`: dQ ++ dK ++ dV.
pub fn flash_attention_bwd(
    q: &[f32],
    kv_in: &[f32],
    saved: &[f32],
    shape: (usize, usize, usize, usize, usize),
    scale: f64,
) -> Result<Vec<f32>> {
    let op = "flash_attention_bwd";
    let dims = fa_dims(op, shape)?;
    let (nq, nk, nl) = (dims.q_len(), dims.kv_len(), dims.lse_len());
    check_len(op, "q", q.len(), nq)?;
    check_len(op, "k/v", kv_in.len(), 2 * nk)?;
    check_len(op, "saved output/grad", saved.len(), 2 * (nq + nl))?;
    let mut grads = output::<f32>(nq + 2 * nk);
    if nl > 0 {
        let (b, h, kv, t, d) = (dims.b, dims.h, dims.kv, dims.t, dims.d);
        let scale = scale as f32;
        let mut delta = output::<f32>(nl);
        let (sp, dp) = (P(saved.as_ptr()), M(delta.as_mut_ptr()));
        let bufs = [buf("saved", saved), buf("delta", &delta)];
        run(
            "moelab_flash_attn_delta_f32",
            launch::grid_stride(nl),
            &bufs,
            move || unsafe { moelab_flash_attn_delta_f32(sp.0, dp.0, nl, d) },
        )?;
        type Bwd = unsafe extern "C" fn(
            *const f32,
            *const f32,
            *const f32,
            *const f32,
            *mut f32,
            usize,
            usize,
            usize,
            usize,
            usize,
            f32,
        );
        let passes: [(&str, Bwd, usize); 2] = [
            (
                "moelab_flash_attn_bwd_dq_f32",
                moelab_flash_attn_bwd_dq_f32,
                b * h,
            ),
            (
                "moelab_flash_attn_bwd_dkv_f32",
                moelab_flash_attn_bwd_dkv_f32,
                b * kv,
            ),
        ];
        for (name, f, heads) in passes {
            let cfg = launch::flash_head_rows(op, heads, t)?;
            let (qp, kp, sp, dp, gp) = (
                P(q.as_ptr()),
                P(kv_in.as_ptr()),
                P(saved.as_ptr()),
                P(delta.as_ptr()),
                M(grads.as_mut_ptr()),
            );
            let bufs = [
                buf("q", q),
                buf("kv", kv_in),
                buf("saved", saved),
                buf("delta", &delta),
                buf("grads", &grads),
            ];
            run(name, cfg, &bufs, move || unsafe {
                f(qp.0, kp.0, sp.0, dp.0, gp.0, b, h, kv, t, d, scale)
            })?;
        }
    }
    Ok(grads)
}

extern "C" {
    fn moelab_moe_plan_scatter(
        ids: *const u32,
        offsets: *const u32,
        index: *mut u32,
        assignment_of_row: *mut u32,
        row_of_assignment: *mut u32,
        n_assign: usize,
        k: usize,
    );
    fn moelab_moe_plan_csr(row_of_assignment: *const u32, index: *mut u32, tokens: usize, k: usize);
}

/// The dispatch plan of `ids (tokens * k)` with per-expert `counts`: the packed routing index
/// (token_of_row, starts, row_ids) and assignment_of_row, as `moe_plan::plan` builds on CUDA.
pub fn moe_plan(ids: &[u32], counts: &[usize], k: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let op = "moe_plan";
    let n_assign = ids.len();
    if k == 0
        || !n_assign.is_multiple_of(k)
        || counts.is_empty()
        || counts.iter().sum::<usize>() != n_assign
    {
        bail!("{op}: {n_assign} ids, k {k} and counts {counts:?} do not match");
    }
    let (tokens, n_experts) = (n_assign / k, counts.len());
    if tokens == 0 {
        return Ok((vec![0], Vec::new()));
    }
    let mut offsets = vec![0u32];
    for &c in counts {
        offsets.push(offsets[offsets.len() - 1] + c as u32);
    }
    let index_len = 2 * n_assign + tokens + 1;
    let mut index = vec![u32::MAX; index_len];
    let mut assignment_of_row = vec![u32::MAX; n_assign];
    let mut scratch = vec![u32::MAX; n_assign];
    let (scatter, csr) = launch::moe_plan(op, tokens, n_experts)?;
    let (ip, op_, ap, sp) = (
        P(ids.as_ptr()),
        P(offsets.as_ptr()),
        M(index.as_mut_ptr()),
        M(assignment_of_row.as_mut_ptr()),
    );
    let scr = M(scratch.as_mut_ptr());
    let bufs = [
        buf("ids", ids),
        buf("offsets", &offsets),
        buf("index", &index),
        buf("assignment_of_row", &assignment_of_row),
        buf("row_of_assignment", &scratch),
    ];
    run("moelab_moe_plan_scatter", scatter, &bufs, move || unsafe {
        moelab_moe_plan_scatter(ip.0, op_.0, ap.0, sp.0, scr.0, n_assign, k)
    })?;
    let bufs = [buf("row_of_assignment", &scratch), buf("index", &index)];
    let (scr, ap) = (P(scratch.as_ptr()), M(index.as_mut_ptr()));
    run("moelab_moe_plan_csr", csr, &bufs, move || unsafe {
        moelab_moe_plan_csr(scr.0, ap.0, tokens, k)
    })?;
    Ok((index, assignment_of_row))
}

/// Errors unless `what` has `want` elements.
fn check_len(op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        bail!("{op}: {what} has {got} elements, expected {want}");
    }
    Ok(())
}
