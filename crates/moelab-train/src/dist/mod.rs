//! One collective interface for data-parallel training, with three implementations: a single
//! process ([`Single`], every operation the identity), MPI on host buffers (`mpi.rs`, feature
//! `mpi`) and NCCL on CUDA tensors (`nccl.rs`, feature `cuda`: the NCCL unique id and all host
//! values travel over the host collective, MPI in a job of several ranks). [`launch`] finds out from the environment which one this process is in.
//!
//! Every rank calls every collective in the same order with the same lengths; the trainer keeps
//! that true by deciding everything that changes the order (stop requests, skipped steps) from
//! reduced values.

mod collective;
pub mod data_parallel;
pub mod ep_state;
pub mod expert_parallel;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod watchdog;

pub use collective::{agree, exchange_cpu, Collective, Single};

#[cfg(test)]
use candle_core::Tensor;

use crate::TrainError;

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
    use super::collective::check_counts;
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
