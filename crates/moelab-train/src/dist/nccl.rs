//! The NCCL collective (feature `cuda`): tensors on this rank's GPU are summed, scattered and
//! gathered by NCCL on the device's stream, without a host copy. Everything small and on the
//! host (flags, fingerprints, loss scalars, router counts) goes over the host collective (MPI)
//! the communicator was set up with; rank 0's NCCL unique id reaches the others over it too.
//!
//! Used when `run.device = "cuda"` and the job has several ranks, or with `MOELAB_NCCL=1` on
//! one rank (to check the NCCL path against the plain one on a single GPU).

use std::rc::Rc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::result::{group_end, group_start};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Layout, Storage, Tensor};

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

impl Nccl {
    /// The all-to-all-v of `rows` (contiguous, element type T) as one NCCL group of
    /// ncclSend/ncclRecv pairs, one per peer with a non-zero count (the counts agree pairwise,
    /// so both sides skip the same pairs), into a fresh buffer of `received` elements.
    fn grouped_exchange<T>(
        &self,
        rows: &CudaStorage,
        layout: &Layout,
        send_counts: &[usize],
        recv_counts: &[usize],
        received: usize,
    ) -> Result<CudaStorage, TrainError>
    where
        T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
    {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            TrainError::Distributed("NCCL all-to-all: the rows are not contiguous".into())
        })?;
        let input = rows.as_cuda_slice::<T>()?;
        let input = input.try_slice(start..end).ok_or_else(|| {
            TrainError::Distributed("NCCL all-to-all: layout exceeds its storage".into())
        })?;
        let mut out = self.device.alloc_zeros::<T>(received)?;
        // Inside a group NCCL only enqueues at ncclGroupEnd. cudarc's event records for the
        // buffers are made at each call, before that; harmless here because candle runs
        // everything of a device on one stream, which orders the exchange after its inputs.
        group_start().map_err(|e| nccl_error("group start", e))?;
        let mut queued = Ok(());
        let (mut sent, mut got) = (0, 0);
        for (peer, (&s, &r)) in send_counts.iter().zip(recv_counts).enumerate() {
            let peer_id = peer as i32;
            let outside =
                || TrainError::Distributed("NCCL all-to-all: a block exceeds its buffer".into());
            if s > 0 && queued.is_ok() {
                queued = match input.try_slice(sent..sent + s) {
                    Some(block) => self
                        .comm
                        .send(&block, peer_id)
                        .map_err(|e| nccl_error("send", e)),
                    None => Err(outside()),
                };
            }
            if r > 0 && queued.is_ok() {
                queued = match out.try_slice_mut(got..got + r) {
                    Some(mut block) => self
                        .comm
                        .recv(&mut block, peer_id)
                        .map(|_| ())
                        .map_err(|e| nccl_error("receive", e)),
                    None => Err(outside()),
                };
            }
            sent += s;
            got += r;
        }
        // The group must be closed even when queueing failed.
        let ended = group_end()
            .map(|_| ())
            .map_err(|e| nccl_error("group end", e));
        queued?;
        ended?;
        Ok(CudaStorage::wrap_cuda_slice(out, self.device.clone()))
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
    fn all_to_all_u64(&self, values: &[u64]) -> Result<Vec<u64>, TrainError> {
        self.host.all_to_all_u64(values)
    }
    fn all_to_all_v_f32(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>, TrainError> {
        self.host.all_to_all_v_f32(send, send_counts, recv_counts)
    }
    fn all_to_all_v_f64(
        &self,
        send: &[f64],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f64>, TrainError> {
        self.host.all_to_all_v_f64(send, send_counts, recv_counts)
    }
    /// The host sub-communicator and an NCCL communicator over it (its own unique id).
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Collective>, TrainError> {
        let host: Rc<dyn Collective> = Rc::from(self.host.split(color, key)?);
        Ok(Box::new(Nccl::new(
            host,
            &Device::Cuda(self.device.clone()),
        )?))
    }

    fn all_to_all_v_cuda(
        &self,
        rows: &CudaStorage,
        layout: &Layout,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<CudaStorage, TrainError> {
        let n = layout.shape().elem_count();
        let received =
            super::collective::check_counts(self.world_size(), n, send_counts, recv_counts)?;
        match rows.dtype() {
            DType::F32 => {
                self.grouped_exchange::<f32>(rows, layout, send_counts, recv_counts, received)
            }
            DType::F64 => {
                self.grouped_exchange::<f64>(rows, layout, send_counts, recv_counts, received)
            }
            dtype => {
                // bf16 and f16 travel as f32 (exact): cudarc's NCCL half types need its f16
                // feature, which candle does not turn on.
                let wide = rows.to_dtype(layout, DType::F32)?;
                let contiguous = Layout::contiguous(layout.shape());
                let moved = self.grouped_exchange::<f32>(
                    &wide,
                    &contiguous,
                    send_counts,
                    recv_counts,
                    received,
                )?;
                Ok(moved.to_dtype(&Layout::contiguous(received), dtype)?)
            }
        }
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
