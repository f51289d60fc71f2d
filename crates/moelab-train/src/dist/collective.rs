//! The collective interface every backend implements ([`Collective`]), the single-process
//! one ([`Single`]), and the helpers the backends share: argument checks of an all-to-all,
//! the host-memory row exchange, and [`agree`] (one rank's failure is everyone's).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Tensor};

use crate::TrainError;

/// Sums, scatters and gathers over the ranks of one job.
pub trait Collective {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Processes in the job.
    fn world_size(&self) -> usize;
    /// This process's rank among those on its node (the GPU it uses).
    fn local_rank(&self) -> usize;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_f32(&self, values: &mut [f32]);
    /// Element-wise sum over ranks, in place.
    fn all_reduce_f64(&self, values: &mut [f64]);
    /// Element-wise maximum over ranks, in place.
    fn all_reduce_max_u64(&self, values: &mut [u64]);
    /// Sums `values` (a multiple of the world size long) over ranks and returns this rank's
    /// block of the sum: elements `rank * n / world .. (rank + 1) * n / world`.
    fn reduce_scatter_f32(&self, values: &[f32]) -> Vec<f32>;
    /// Every rank's `block` (the same length on all ranks) in rank order.
    fn all_gather_f32(&self, block: &[f32]) -> Vec<f32>;
    /// Every rank's `values` (the same length on all ranks) in rank order.
    fn all_gather_u64(&self, values: &[u64]) -> Vec<u64>;
    /// Replaces `bytes` on every rank by those of rank `root`.
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize);
    /// Returns once every rank has called it.
    fn barrier(&self);
    /// Ends every process of the job with `code` (MPI_Abort); a single process just exits.
    fn abort(&self, code: i32) -> !;

    /// All-to-all of equal blocks: `values` holds `world_size` blocks of the same length on
    /// every rank; block j goes to rank j. Returns the block each rank sent here, in rank order.
    fn all_to_all_u64(&self, values: &[u64]) -> Result<Vec<u64>, TrainError>;
    /// All-to-all of variable blocks (MPI_Alltoallv): `send` is `send_counts[j]` elements for
    /// rank j after another, in rank order; returns `recv_counts[j]` elements from each rank j,
    /// in rank order. Every rank's `send_counts[j]` must equal rank j's `recv_counts[rank]`
    /// (exchange the counts first, with [`Collective::all_to_all_u64`]); counts may be zero.
    fn all_to_all_v_f32(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>, TrainError>;
    /// [`Collective::all_to_all_v_f32`] of f64 values (gradient checks in f64 go through it).
    fn all_to_all_v_f64(
        &self,
        send: &[f64],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f64>, TrainError>;
    /// A sub-communicator (MPI_Comm_split): the ranks that pass the same `color` form one,
    /// ordered by `key`. Every rank must call it, in the same order as every other collective.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Collective>, TrainError>;

    /// [`Collective::all_to_all_v_f32`] of rows on a CUDA device: `rows` (laid out by
    /// `layout`, any float dtype) in blocks of `send_counts[j]` elements per rank. The default
    /// goes through host memory; NCCL overrides it with grouped ncclSend/ncclRecv.
    #[cfg(feature = "cuda")]
    fn all_to_all_v_cuda(
        &self,
        rows: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<candle_core::CudaStorage, TrainError> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let host = rows.to_cpu_storage()?;
        let moved = exchange_cpu(self, &host, layout, send_counts, recv_counts)?;
        Ok(rows.device().storage_from_cpu_storage(&moved)?)
    }

    /// Element-wise sum over ranks of a tensor of the same shape on every rank. The default
    /// goes through host memory; NCCL overrides it to stay on the device.
    fn all_reduce_tensor(&self, tensor: &Tensor) -> Result<Tensor, TrainError> {
        if self.world_size() == 1 {
            return Ok(tensor.clone());
        }
        let mut host = tensor
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        self.all_reduce_f32(&mut host);
        Ok(Tensor::from_vec(host, tensor.shape(), tensor.device())?.to_dtype(tensor.dtype())?)
    }

    /// [`Collective::reduce_scatter_f32`] of a 1-D tensor.
    fn reduce_scatter_tensor(&self, tensor: &Tensor) -> Result<Tensor, TrainError> {
        if self.world_size() == 1 {
            return Ok(tensor.clone());
        }
        let host = tensor.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let block = self.reduce_scatter_f32(&host);
        let n = block.len();
        Ok(Tensor::from_vec(block, n, tensor.device())?.to_dtype(tensor.dtype())?)
    }

    /// [`Collective::all_gather_f32`] of a 1-D tensor.
    fn all_gather_tensor(&self, block: &Tensor) -> Result<Tensor, TrainError> {
        if self.world_size() == 1 {
            return Ok(block.clone());
        }
        let host = block.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let all = self.all_gather_f32(&host);
        let n = all.len();
        Ok(Tensor::from_vec(all, n, block.device())?.to_dtype(block.dtype())?)
    }
}

/// One process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn all_reduce_f32(&self, _values: &mut [f32]) {}
    fn all_reduce_f64(&self, _values: &mut [f64]) {}
    fn all_reduce_max_u64(&self, _values: &mut [u64]) {}
    fn reduce_scatter_f32(&self, values: &[f32]) -> Vec<f32> {
        values.to_vec()
    }
    fn all_gather_f32(&self, block: &[f32]) -> Vec<f32> {
        block.to_vec()
    }
    fn all_gather_u64(&self, values: &[u64]) -> Vec<u64> {
        values.to_vec()
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>, _root: usize) {}
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn all_to_all_u64(&self, values: &[u64]) -> Result<Vec<u64>, TrainError> {
        Ok(values.to_vec())
    }
    fn all_to_all_v_f32(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>, TrainError> {
        check_counts(1, send.len(), send_counts, recv_counts)?;
        Ok(send.to_vec())
    }
    fn all_to_all_v_f64(
        &self,
        send: &[f64],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f64>, TrainError> {
        check_counts(1, send.len(), send_counts, recv_counts)?;
        Ok(send.to_vec())
    }
    fn split(&self, _color: usize, _key: usize) -> Result<Box<dyn Collective>, TrainError> {
        Ok(Box::new(Single))
    }
}

/// Checks the arguments of an all-to-all-v over `world` ranks: one count per rank each way,
/// and the send counts summing to the `sent` elements given. Returns the received total.
pub(crate) fn check_counts(
    world: usize,
    sent: usize,
    send_counts: &[usize],
    recv_counts: &[usize],
) -> Result<usize, TrainError> {
    if send_counts.len() != world || recv_counts.len() != world {
        return Err(TrainError::Distributed(format!(
            "all-to-all: {} send counts and {} receive counts for {world} ranks; give one per rank",
            send_counts.len(),
            recv_counts.len()
        )));
    }
    let total = |counts: &[usize]| {
        counts
            .iter()
            .try_fold(0usize, |sum, &c| sum.checked_add(c))
            .ok_or_else(|| TrainError::Distributed("all-to-all: the counts overflow".into()))
    };
    let send_total = total(send_counts)?;
    if send_total != sent {
        return Err(TrainError::Distributed(format!(
            "all-to-all: the send counts add up to {send_total} elements but {sent} were given"
        )));
    }
    if world == 1 && recv_counts != send_counts {
        return Err(TrainError::Distributed(format!(
            "all-to-all on one rank: receive counts {recv_counts:?} differ from send counts {send_counts:?}"
        )));
    }
    total(recv_counts)
}

/// Makes one rank's failure everyone's: every rank passes its own result; when any failed,
/// every rank returns the same error (the lowest failing rank's, naming it), so a job never
/// goes on with some ranks set up and others not.
pub fn agree<T>(comm: &dyn Collective, result: Result<T, TrainError>) -> Result<T, TrainError> {
    if comm.world_size() == 1 {
        return result;
    }
    let failed = u64::from(result.is_err());
    let flags = comm.all_gather_u64(&[failed]);
    let Some(first) = flags.iter().position(|&f| f == 1) else {
        return result;
    };
    let mut message = match &result {
        Err(e) if comm.rank() == first => e.to_string().into_bytes(),
        _ => Vec::new(),
    };
    comm.broadcast_bytes(&mut message, first);
    Err(TrainError::Distributed(format!(
        "rank {first} of {}: {}",
        comm.world_size(),
        String::from_utf8_lossy(&message)
    )))
}

/// The host all-to-all-v of a CPU storage laid out by `layout` (contiguous), element counts
/// per peer. f32 and f64 travel as they are; bf16 and f16 travel as f32 (exact both ways).
pub fn exchange_cpu<C: Collective + ?Sized>(
    comm: &C,
    storage: &CpuStorage,
    layout: &Layout,
    send_counts: &[usize],
    recv_counts: &[usize],
) -> Result<CpuStorage, TrainError> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(TrainError::Distributed(
            "expert exchange: the rows are not contiguous".into(),
        ));
    };
    match storage {
        CpuStorage::F32(values) => Ok(CpuStorage::F32(comm.all_to_all_v_f32(
            &values[start..end],
            send_counts,
            recv_counts,
        )?)),
        CpuStorage::F64(values) => Ok(CpuStorage::F64(comm.all_to_all_v_f64(
            &values[start..end],
            send_counts,
            recv_counts,
        )?)),
        CpuStorage::BF16(_) | CpuStorage::F16(_) => {
            let dtype = storage.dtype();
            let wide = storage.to_dtype(layout, DType::F32)?;
            let moved = exchange_cpu(
                comm,
                &wide,
                &Layout::contiguous(layout.shape()),
                send_counts,
                recv_counts,
            )?;
            let received: usize = recv_counts.iter().sum();
            Ok(moved.to_dtype(&Layout::contiguous(received), dtype)?)
        }
        other => Err(TrainError::Distributed(format!(
            "expert exchange: {:?} rows; expected a float dtype",
            other.dtype()
        ))),
    }
}
