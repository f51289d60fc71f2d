//! The MPI collective (feature `mpi`): host buffers over MPI_COMM_WORLD or a sub-communicator
//! of it (the expert-parallel groups). Used for CPU training and, on GPU runs, for everything
//! small (flags, fingerprints, the NCCL unique id, the expert-parallel counts).

use std::rc::Rc;

use mpi::collective::SystemOperation;
use mpi::datatype::{Equivalence, Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::{Count, Threading};

use super::collective::check_counts;
use super::Collective;
use crate::TrainError;

/// MPI counts are C ints; longer buffers go in pieces of this many elements.
const MAX_COUNT: usize = 1 << 30;

/// MPI_COMM_WORLD of this process, or a sub-communicator of it. MPI is finalised when the last
/// of them is dropped.
pub(crate) struct Mpi {
    world: SimpleCommunicator,
    local_rank: usize,
    // Dropped after `world` (a sub-communicator is freed before MPI is finalised); shared by
    // the sub-communicators, so finalising waits for the last of them.
    _universe: Rc<Universe>,
}

impl Mpi {
    /// Initialises MPI (only the main thread calls it; data loading threads never do).
    pub(crate) fn init() -> Result<Self, TrainError> {
        let (universe, _threading) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| TrainError::Distributed("MPI was already initialised".into()))?;
        let world = universe.world();
        let node = world.split_shared(world.rank());
        let local_rank = node.rank() as usize;
        Ok(Self {
            world,
            local_rank,
            _universe: Rc::new(universe),
        })
    }

    /// MPI_Alltoallv of `send` (see [`Collective::all_to_all_v_f32`]).
    fn all_to_all_v<T: Equivalence + Copy + Default>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<T>, TrainError> {
        let _watch = super::watchdog::collective("all_to_all_v");
        let received = check_counts(self.world_size(), send.len(), send_counts, recv_counts)?;
        let (send_counts, send_displs) = mpi_counts(send_counts)?;
        let (recv_counts, recv_displs) = mpi_counts(recv_counts)?;
        let mut out = vec![T::default(); received];
        let send = Partition::new(send, &send_counts[..], &send_displs[..]);
        let mut recv = PartitionMut::new(&mut out[..], &recv_counts[..], &recv_displs[..]);
        self.world.all_to_all_varcount_into(&send, &mut recv);
        Ok(out)
    }
}

/// MPI's counts and displacements (C ints) of blocks of `counts` elements laid end to end.
fn mpi_counts(counts: &[usize]) -> Result<(Vec<Count>, Vec<Count>), TrainError> {
    let too_big = |total: usize| {
        TrainError::Distributed(format!(
            "an all-to-all of {total} elements exceeds MPI's {} per call (C int counts); use smaller micro-batches or more ranks",
            Count::MAX
        ))
    };
    let mut displs = Vec::with_capacity(counts.len());
    let mut offset: usize = 0;
    for &c in counts {
        displs.push(Count::try_from(offset).map_err(|_| too_big(offset))?);
        offset = offset.checked_add(c).ok_or_else(|| too_big(usize::MAX))?;
    }
    Count::try_from(offset).map_err(|_| too_big(offset))?;
    // Each count is at most the total, which fits.
    let counts = counts.iter().map(|&c| c as Count).collect();
    Ok((counts, displs))
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn all_reduce_f32(&self, values: &mut [f32]) {
        let _watch = super::watchdog::collective("all_reduce_f32");
        for chunk in values.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            self.world
                .all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }

    fn all_reduce_f64(&self, values: &mut [f64]) {
        let _watch = super::watchdog::collective("all_reduce_f64");
        for chunk in values.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            self.world
                .all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }

    fn all_reduce_max_u64(&self, values: &mut [u64]) {
        let _watch = super::watchdog::collective("all_reduce_max_u64");
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::max());
    }

    fn reduce_scatter_f32(&self, values: &[f32]) -> Vec<f32> {
        let _watch = super::watchdog::collective("reduce_scatter_f32");
        let mut block = vec![0f32; values.len() / self.world_size()];
        self.world
            .reduce_scatter_block_into(values, &mut block[..], SystemOperation::sum());
        block
    }

    fn all_gather_f32(&self, block: &[f32]) -> Vec<f32> {
        let _watch = super::watchdog::collective("all_gather_f32");
        let mut all = vec![0f32; block.len() * self.world_size()];
        self.world.all_gather_into(block, &mut all[..]);
        all
    }

    fn all_gather_u64(&self, values: &[u64]) -> Vec<u64> {
        let _watch = super::watchdog::collective("all_gather_u64");
        let mut all = vec![0u64; values.len() * self.world_size()];
        self.world.all_gather_into(values, &mut all[..]);
        all
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) {
        let _watch = super::watchdog::collective("broadcast_bytes");
        let root = self.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for chunk in bytes.chunks_mut(MAX_COUNT) {
            root.broadcast_into(chunk);
        }
    }

    fn barrier(&self) {
        let _watch = super::watchdog::collective("barrier");
        self.world.barrier();
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn all_to_all_u64(&self, values: &[u64]) -> Result<Vec<u64>, TrainError> {
        let _watch = super::watchdog::collective("all_to_all_u64");
        let world = self.world_size();
        if !values.len().is_multiple_of(world) {
            return Err(TrainError::Distributed(format!(
                "all-to-all: {} values do not split into {world} equal blocks",
                values.len()
            )));
        }
        let mut out = vec![0u64; values.len()];
        self.world.all_to_all_into(values, &mut out[..]);
        Ok(out)
    }

    fn all_to_all_v_f32(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>, TrainError> {
        self.all_to_all_v(send, send_counts, recv_counts)
    }

    fn all_to_all_v_f64(
        &self,
        send: &[f64],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f64>, TrainError> {
        self.all_to_all_v(send, send_counts, recv_counts)
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Collective>, TrainError> {
        let int = |what: &str, v: usize| {
            i32::try_from(v).map_err(|_| {
                TrainError::Distributed(format!("communicator split: {what} {v} exceeds a C int"))
            })
        };
        let (color, key) = (int("color", color)?, int("key", key)?);
        let comm = self
            .world
            .split_by_color_with_key(Color::with_value(color), key)
            .ok_or_else(|| {
                TrainError::Distributed(format!(
                    "MPI_Comm_split gave no communicator for color {color}"
                ))
            })?;
        Ok(Box::new(Mpi {
            world: comm,
            local_rank: self.local_rank,
            _universe: self._universe.clone(),
        }))
    }
}
