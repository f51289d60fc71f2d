//! The MPI collective (feature `mpi`): host buffers over MPI_COMM_WORLD. Used for CPU training
//! and, on GPU runs, for everything small (flags, fingerprints, the NCCL unique id).

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use super::Collective;
use crate::TrainError;

/// MPI counts are C ints; longer buffers go in pieces of this many elements.
const MAX_COUNT: usize = 1 << 30;

/// MPI_COMM_WORLD of this process (MPI is finalised when it is dropped).
pub(crate) struct Mpi {
    world: SimpleCommunicator,
    local_rank: usize,
    // Dropped last: finalises MPI.
    _universe: Universe,
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
            _universe: universe,
        })
    }
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
        for chunk in values.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            self.world
                .all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }

    fn all_reduce_f64(&self, values: &mut [f64]) {
        for chunk in values.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            self.world
                .all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }

    fn all_reduce_max_u64(&self, values: &mut [u64]) {
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::max());
    }

    fn reduce_scatter_f32(&self, values: &[f32]) -> Vec<f32> {
        let mut block = vec![0f32; values.len() / self.world_size()];
        self.world
            .reduce_scatter_block_into(values, &mut block[..], SystemOperation::sum());
        block
    }

    fn all_gather_f32(&self, block: &[f32]) -> Vec<f32> {
        let mut all = vec![0f32; block.len() * self.world_size()];
        self.world.all_gather_into(block, &mut all[..]);
        all
    }

    fn all_gather_u64(&self, values: &[u64]) -> Vec<u64> {
        let mut all = vec![0u64; values.len() * self.world_size()];
        self.world.all_gather_into(values, &mut all[..]);
        all
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) {
        let root = self.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for chunk in bytes.chunks_mut(MAX_COUNT) {
            root.broadcast_into(chunk);
        }
    }

    fn barrier(&self) {
        self.world.barrier();
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
