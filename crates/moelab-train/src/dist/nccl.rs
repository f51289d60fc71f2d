//! The NCCL collective (feature `cuda`): tensors on this rank's GPU are summed, scattered and
//! gathered by NCCL on the device's stream, without a host copy. Everything small and on the
//! host (flags, fingerprints, loss scalars, router counts) goes over the host collective (MPI)
//! the communicator was set up with; rank 0's NCCL unique id reaches the others over it too.
//!
//! Used when `run.device = "cuda"` and the job has several ranks, or with `MOELAB_NCCL=1` on
//! one rank (to check the NCCL path against the plain one on a single GPU).

use std::rc::Rc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};

use super::Collective;
use crate::TrainError;

/// One NCCL call from a device input into a device output.
type DeviceOp<'a> =
    &'a dyn Fn(&Comm, &CudaView<'_, f32>, &mut CudaSlice<f32>) -> Result<(), TrainError>;

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

/// An NCCL communicator over the ranks of a host collective, on one GPU per rank.
pub struct Nccl {
    comm: Comm,
    device: CudaDevice,
    host: Rc<dyn Collective>,
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> TrainError {
    TrainError::Distributed(format!(
        "NCCL {what} failed ({e:?}); NCCL_DEBUG=INFO shows why (see docs/DISTRIBUTED.md)"
    ))
}

impl Nccl {
    /// Sets up the communicator of every rank of `host` on `device` (this rank's GPU): rank 0
    /// creates the unique id and broadcasts it. Every rank must call it.
    pub fn new(host: Rc<dyn Collective>, device: &Device) -> Result<Self, TrainError> {
        let Device::Cuda(cuda) = device else {
            return Err(TrainError::Distributed(
                "NCCL needs run.device = \"cuda\"".into(),
            ));
        };
        let mut bytes = Vec::new();
        let mut created = Ok(());
        if host.rank() == 0 {
            match Id::new() {
                Ok(id) => bytes = id.internal().iter().map(|&c| c as u8).collect(),
                Err(e) => created = Err(nccl_error("creating the unique id", e)),
            }
        }
        super::agree(host.as_ref(), created)?;
        host.broadcast_bytes(&mut bytes, 0);
        if bytes.len() != ID_BYTES {
            return Err(TrainError::Distributed(format!(
                "the NCCL unique id from rank 0 has {} bytes, expected {ID_BYTES}",
                bytes.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (slot, byte) in internal.iter_mut().zip(&bytes) {
            *slot = *byte as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            host.rank(),
            host.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| nccl_error("initialising the communicator", e));
        let comm = super::agree(host.as_ref(), comm)?;
        Ok(Self {
            comm,
            device: cuda.clone(),
            host,
        })
    }

    /// Runs `op` on `tensor`'s f32 elements (contiguous, on this GPU) into a fresh `out_len`
    /// element buffer, returned as a 1-D tensor of `tensor`'s dtype.
    fn on_device(
        &self,
        tensor: &Tensor,
        out_len: usize,
        what: &str,
        op: DeviceOp<'_>,
    ) -> Result<Tensor, TrainError> {
        let input = tensor.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
        let mut out = self.device.alloc_zeros::<f32>(out_len)?;
        {
            let (storage, layout) = input.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                return Err(TrainError::Distributed(format!(
                    "NCCL {what}: the tensor is not on the GPU"
                )));
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                return Err(TrainError::Distributed(format!(
                    "NCCL {what}: the tensor is not contiguous"
                )));
            };
            let slice = storage.as_cuda_slice::<f32>()?;
            let view = slice.try_slice(start..end).ok_or_else(|| {
                TrainError::Distributed(format!("NCCL {what}: layout exceeds its storage"))
            })?;
            op(&self.comm, &view, &mut out)?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
        let result = Tensor::from_storage(storage, out_len, BackpropOp::none(), false);
        Ok(result.to_dtype(tensor.dtype())?)
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    fn local_rank(&self) -> usize {
        self.host.local_rank()
    }
    fn all_reduce_f32(&self, values: &mut [f32]) {
        self.host.all_reduce_f32(values)
    }
    fn all_reduce_f64(&self, values: &mut [f64]) {
        self.host.all_reduce_f64(values)
    }
    fn all_reduce_max_u64(&self, values: &mut [u64]) {
        self.host.all_reduce_max_u64(values)
    }
    fn reduce_scatter_f32(&self, values: &[f32]) -> Vec<f32> {
        self.host.reduce_scatter_f32(values)
    }
    fn all_gather_f32(&self, block: &[f32]) -> Vec<f32> {
        self.host.all_gather_f32(block)
    }
    fn all_gather_u64(&self, values: &[u64]) -> Vec<u64> {
        self.host.all_gather_u64(values)
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) {
        self.host.broadcast_bytes(bytes, root)
    }
    fn barrier(&self) {
        self.host.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.host.abort(code)
    }

    fn all_reduce_tensor(&self, tensor: &Tensor) -> Result<Tensor, TrainError> {
        if !tensor.device().is_cuda() {
            return self.host.all_reduce_tensor(tensor);
        }
        let n = tensor.elem_count();
        let summed = self.on_device(tensor, n, "all-reduce", &|comm, input, out| {
            comm.all_reduce(input, out, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| nccl_error("all-reduce", e))
        })?;
        Ok(summed.reshape(tensor.shape())?)
    }

    fn reduce_scatter_tensor(&self, tensor: &Tensor) -> Result<Tensor, TrainError> {
        if !tensor.device().is_cuda() {
            return self.host.reduce_scatter_tensor(tensor);
        }
        let n = tensor.elem_count() / self.world_size();
        self.on_device(tensor, n, "reduce-scatter", &|comm, input, out| {
            comm.reduce_scatter(input, out, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| nccl_error("reduce-scatter", e))
        })
    }

    fn all_gather_tensor(&self, block: &Tensor) -> Result<Tensor, TrainError> {
        if !block.device().is_cuda() {
            return self.host.all_gather_tensor(block);
        }
        let n = block.elem_count() * self.world_size();
        self.on_device(block, n, "all-gather", &|comm, input, out| {
            comm.all_gather(input, out)
                .map(|_| ())
                .map_err(|e| nccl_error("all-gather", e))
        })
    }
}
