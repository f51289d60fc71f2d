//! One collective interface for data-parallel training, with three implementations: a single
//! process ([`Single`], every operation the identity), MPI on host buffers (`mpi.rs`, feature
//! `mpi`) and NCCL on CUDA tensors (`nccl.rs`, feature `cuda`: the NCCL unique id and all host
//! values travel over the host collective, MPI in a job of several ranks). [`launch`] finds out from the environment which one this process is in.
//!
//! Every rank calls every collective in the same order with the same lengths; the trainer keeps
//! that true by deciding everything that changes the order (stop requests, skipped steps) from
//! reduced values.

pub mod data_parallel;
pub mod ep_state;
pub mod expert_parallel;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod watchdog;

use candle_core::{DType, Tensor};

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
        let moved = expert_parallel::exchange_cpu(self, &host, layout, send_counts, recv_counts)?;
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

/// Rank and world size as a launcher (mpirun, srun) put them in the environment, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Rank of this process.
    pub rank: usize,
    /// Processes in the job.
    pub world_size: usize,
}

/// The launcher's rank and world size: OpenMPI's `OMPI_COMM_WORLD_*`, PMI/PMIx (MPICH, Intel
/// MPI, srun --mpi=pmi2/pmix) or Slurm's own `SLURM_PROCID`/`SLURM_NTASKS`; None when no
/// launcher started this process.
pub fn launch_env() -> Option<LaunchEnv> {
    let var = |name: &str| std::env::var(name).ok()?.trim().parse::<usize>().ok();
    let pairs = [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMIX_RANK", "PMIX_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ];
    pairs.iter().find_map(|(rank, size)| {
        Some(LaunchEnv {
            rank: var(rank)?,
            world_size: var(size).unwrap_or(1),
        })
    })
}

/// The collective of this process: MPI when a launcher started it (build with `--features
/// mpi`), else [`Single`]. A launch of several processes in a build without MPI is refused,
/// since each process would silently train the whole run on its own.
pub fn launch() -> Result<Box<dyn Collective>, TrainError> {
    let env = launch_env();
    #[cfg(feature = "mpi")]
    if env.is_some() {
        return Ok(Box::new(mpi::Mpi::init()?));
    }
    match env {
        Some(env) if env.world_size > 1 => Err(TrainError::Distributed(format!(
            "this process is rank {} of {} launched by mpirun or srun, but this moelab was built without MPI; rebuild with `cargo build --release --features mpi` (needs OpenMPI: apt-get install openmpi-bin libopenmpi-dev libclang-dev)",
            env.rank, env.world_size
        ))),
        _ => Ok(Box::new(Single)),
    }
}

/// The collective a run on `device` trains with: NCCL over `host` on a CUDA device when the job
/// has several ranks (or `MOELAB_NCCL=1`, to check the NCCL path on one GPU), else `host`.
pub fn for_device(
    host: std::rc::Rc<dyn Collective>,
    device: &candle_core::Device,
) -> Result<std::rc::Rc<dyn Collective>, TrainError> {
    #[cfg(feature = "cuda")]
    if device.is_cuda()
        && (host.world_size() > 1 || std::env::var("MOELAB_NCCL").is_ok_and(|v| v == "1"))
    {
        return Ok(std::rc::Rc::new(nccl::Nccl::new(host, device)?));
    }
    let _ = device;
    Ok(host)
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

/// A fingerprint (shown in hex) or a count (shown in decimal), as [`check_same`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// 16 hex digits.
    Fingerprint,
    /// Decimal.
    Count,
}

/// Checks that every rank holds the same `value` of `what`; otherwise every rank gets the same
/// error listing each rank's value.
pub fn check_same(
    comm: &dyn Collective,
    what: &str,
    value: u64,
    shown: Shown,
) -> Result<(), TrainError> {
    let all = comm.all_gather_u64(&[value]);
    if all.iter().all(|&v| v == all[0]) {
        return Ok(());
    }
    let listed: Vec<String> = all
        .iter()
        .enumerate()
        .map(|(rank, v)| match shown {
            Shown::Fingerprint => format!("rank {rank}: {v:016x}"),
            Shown::Count => format!("rank {rank}: {v}"),
        })
        .collect();
    Err(TrainError::Distributed(format!(
        "the ranks disagree on the {what} ({}); start every rank with the same config, data and checkpoint folder (a folder every node sees)",
        listed.join(", ")
    )))
}

/// True on every rank when any rank's `flag` is set (a stop request reaching ranks at
/// different moments becomes one decision).
pub fn any(comm: &dyn Collective, flag: bool) -> bool {
    let mut value = [u64::from(flag)];
    comm.all_reduce_max_u64(&mut value);
    value[0] == 1
}

/// FNV-1a, a stable 64-bit fingerprint of bytes (the same on every platform and build).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn single_is_the_identity() {
        let comm = Single;
        let mut v = vec![1.0f32, 2.0];
        comm.all_reduce_f32(&mut v);
        assert_eq!(v, [1.0, 2.0]);
        assert_eq!(comm.reduce_scatter_f32(&v), v);
        assert_eq!(comm.all_gather_u64(&[7]), [7]);
        assert!(any(&comm, true) && !any(&comm, false));
        check_same(&comm, "config", 3, Shown::Count).unwrap();
        let t = Tensor::new(&[1.0f32, 2.0, 3.0], &candle_core::Device::Cpu).unwrap();
        let r = comm.all_reduce_tensor(&t).unwrap();
        assert_eq!(r.to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
        assert_eq!(comm.all_to_all_u64(&[4, 5]).unwrap(), [4, 5]);
        assert_eq!(
            comm.all_to_all_v_f64(&[1.0, 2.0], &[2], &[2]).unwrap(),
            [1.0, 2.0]
        );
        assert_eq!(comm.split(3, 0).unwrap().world_size(), 1);
    }

    #[test]
    fn all_to_all_counts_are_checked() {
        let err = Single
            .all_to_all_v_f32(&[1.0, 2.0], &[1], &[1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("add up to 1 elements but 2"), "{err}");
        let err = Single
            .all_to_all_v_f32(&[1.0], &[1], &[2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("differ"), "{err}");
        let err = check_counts(2, 0, &[0], &[0, 0]).unwrap_err().to_string();
        assert!(
            err.contains("1 send counts and 2 receive counts for 2 ranks"),
            "{err}"
        );
        assert_eq!(check_counts(2, 3, &[1, 2], &[4, 0]).unwrap(), 4);
    }

    #[test]
    fn agree_passes_a_single_process_error_through() {
        let err = agree::<()>(&Single, Err(TrainError::Argument("bad".into()))).unwrap_err();
        assert_eq!(err.to_string(), "bad");
    }

    #[test]
    fn fingerprints_differ_and_are_stable() {
        assert_eq!(fingerprint(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fingerprint(b"a = 1"), fingerprint(b"a = 2"));
    }
}
