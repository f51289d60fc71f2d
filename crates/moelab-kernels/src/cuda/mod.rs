//! CUDA plumbing shared by the ops (feature `cuda`): the embedded kernel fatbin and its
//! per-device module cache, dtype dispatch, contiguous input views, output allocation (poisoned
//! on request) and launch helpers. The launchers themselves live in `rows` (softmax, RMSNorm,
//! RoPE, cross-entropy), `gemm` (cuBLAS), and one file per fused op named as its `src/*.rs`.

pub(crate) mod adamw;
pub(crate) mod flash_attention;
pub(crate) mod gemm;
pub(crate) mod moe_dispatch;
pub(crate) mod router_topk;
pub(crate) mod rows;
pub(crate) mod swiglu;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    result as driver_result, CudaFunction, CudaModule, CudaSlice, CudaView, DevicePtrMut,
    DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, WithDType};
use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex, OnceLock};

/// Every `kernels/*.cu`, compiled by build.rs into one fatbin (sm_XX cubin + compute_XX PTX).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/moelab_kernels.fatbin"));

/// Env var that makes every output buffer start as 0xFF bytes (NaN for float types), so a kernel
/// that leaves elements unwritten shows up as NaN in tests.
pub const POISON_ENV: &str = "MOELAB_POISON_OUTPUTS";

/// Whether outputs are poisoned; read once, on the first allocation.
fn poison_outputs() -> bool {
    static POISON: OnceLock<bool> = OnceLock::new();
    *POISON.get_or_init(|| std::env::var(POISON_ENV).is_ok_and(|v| v == "1"))
}

/// A candle error naming the op and what failed.
pub(crate) fn cuda_error(op: &str, what: &str, e: impl Display) -> candle_core::Error {
    candle_core::Error::Cuda(format!("{op}: {what}: {e}").into())
}

/// The moelab kernel module on `dev`, loaded on first use and cached per device.
fn module(dev: &CudaDevice, op: &str) -> Result<Arc<CudaModule>> {
    static MODULES: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaModule>>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| cuda_error(op, "kernel module cache", "lock poisoned"))?;
    if let Some(m) = modules.get(&dev.id()) {
        return Ok(m.clone());
    }
    // cuModuleLoadData takes a fatbin image as well as PTX; the driver picks the sm_XX cubin or
    // JIT-compiles the embedded PTX for newer GPUs.
    let m = dev
        .cuda_stream()
        .context()
        .load_module(Ptx::from_binary(FATBIN.to_vec()))
        .map_err(|e| cuda_error(op, "loading the moelab kernel fatbin", e))?;
    modules.insert(dev.id(), m.clone());
    Ok(m)
}

/// The kernel `name` from the moelab module on `dev`.
pub(crate) fn function(dev: &CudaDevice, name: &str, op: &str) -> Result<CudaFunction> {
    module(dev, op)?
        .load_function(name)
        .map_err(|e| cuda_error(op, &format!("kernel {name}"), e))
}

/// Element types the row kernels are instantiated for, with their kernel-name suffix.
pub(crate) trait KernelElem: CudaDType + DeviceRepr + WithDType {
    /// Suffix of the `extern "C"` kernel names for this type (see `kernels/common.cuh`).
    const SUFFIX: &'static str;
}

impl KernelElem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl KernelElem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}
impl KernelElem for half::f16 {
    const SUFFIX: &'static str = "f16";
}

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` for the dtypes the CUDA kernels
/// support; any other dtype is an error naming the op.
macro_rules! cuda_dispatch {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
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
                "{}: unsupported dtype {:?} on CUDA (expected f32, bf16 or f16)",
                $op,
                dt
            ),
        }
    };
}
pub(crate) use cuda_dispatch;

/// Launches a kernel on the device's stream: `launch!(dev, op, func, cfg, args...)`, each arg an
/// expression whose reference is pushed in order (`&mut` for outputs).
macro_rules! launch {
    ($dev:expr, $op:expr, $func:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let stream = $dev.cuda_stream();
        let mut builder = stream.launch_builder(&$func);
        $(builder.arg($arg);)+
        // SAFETY: every call site passes the arguments in the order and types of the kernel's
        // C signature, with sizes checked against the buffers' layouts.
        unsafe { builder.launch($cfg) }
            .map_err(|e| $crate::cuda::cuda_error($op, "kernel launch", e))?;
    }};
}
pub(crate) use launch;

/// The dtype of a CUDA storage.
pub(crate) fn storage_dtype(s: &CudaStorage) -> DType {
    s.dtype()
}

/// The elements of a contiguous storage view; wrappers call `.contiguous()`, so failure here
/// means a caller bypassed them.
pub(crate) fn input<'a, T: CudaDType + DeviceRepr + WithDType>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, T>> {
    if s.dtype() != T::DTYPE {
        bail!(
            "{op}: {what} has dtype {:?}, expected {:?}",
            s.dtype(),
            T::DTYPE
        );
    }
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: {what} must be contiguous");
    };
    match s.as_cuda_slice::<T>()?.try_slice(start..end) {
        Some(v) => Ok(v),
        None => bail!("{op}: {what} layout exceeds its storage"),
    }
}

/// A fresh `len`-element output buffer on `dev`. Its contents are unspecified (every kernel
/// writes all of it), or all 0xFF bytes when MOELAB_POISON_OUTPUTS=1.
pub(crate) fn alloc_output<T: DeviceRepr>(
    dev: &CudaDevice,
    len: usize,
    op: &str,
) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is uninitialised; callers write every element before it is read.
    let mut out = unsafe { dev.alloc::<T>(len) }?;
    if poison_outputs() && len > 0 {
        let stream = dev.cuda_stream();
        let bytes = out.num_bytes();
        let (ptr, _record) = out.device_ptr_mut(&stream);
        // SAFETY: `ptr` is the start of `out`, which holds exactly `bytes` bytes, and the memset
        // is ordered on the same stream as every later use of `out`.
        unsafe { driver_result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }
            .map_err(|e| cuda_error(op, "poisoning the output", e))?;
    }
    Ok(out)
}

/// The cudarc form of a launch configuration from `crate::launch` (shared with the emulation).
pub(crate) fn config(d: crate::launch::LaunchDims) -> LaunchConfig {
    LaunchConfig {
        grid_dim: d.grid,
        block_dim: d.block,
        shared_mem_bytes: d.shared_bytes,
    }
}

/// One block of `crate::launch::BLOCK` threads per row.
pub(crate) fn rows_config(rows: usize, op: &str) -> Result<LaunchConfig> {
    Ok(config(crate::launch::rows(rows, op)?))
}

/// A grid-stride launch over `items` work items: at most 2^16 blocks of `launch::BLOCK`
/// threads, each thread looping over the rest.
pub(crate) fn grid_stride_config(items: usize) -> LaunchConfig {
    config(crate::launch::grid_stride(items))
}
