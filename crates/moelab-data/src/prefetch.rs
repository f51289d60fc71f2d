//! Background prefetch of a rank's batches from a mixture stream, in step order.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::batch::Batch;
use crate::stream::MixtureStream;
use crate::{DataError, Result};

/// Background prefetch of consecutive global batches starting at `start_step`.
pub struct Prefetcher {
    receiver: Option<Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts a thread that keeps up to `depth` of this rank's batches ready, in step order.
    pub fn new(
        stream: Arc<MixtureStream>,
        start_step: u64,
        global_sequences: usize,
        rank: usize,
        world: usize,
        depth: usize,
    ) -> Self {
        let (sender, receiver) = sync_channel(depth.max(1));
        let worker = std::thread::Builder::new()
            .name("moelab-prefetch".into())
            .spawn(move || {
                let mut step = start_step;
                loop {
                    let batch = stream.rank_batch(step, global_sequences, rank, world);
                    let failed = batch.is_err();
                    // A closed channel means the consumer is gone: stop quietly.
                    if sender.send(batch).is_err() || failed {
                        return;
                    }
                    step += 1;
                }
            });
        match worker {
            Ok(handle) => Prefetcher {
                receiver: Some(receiver),
                worker: Some(handle),
            },
            Err(e) => {
                // No thread: hand the error to the consumer as the first item.
                let (sender, receiver) = sync_channel(1);
                let _ = sender.send(Err(DataError::Argument(format!(
                    "cannot start the prefetch thread: {e}"
                ))));
                Prefetcher {
                    receiver: Some(receiver),
                    worker: None,
                }
            }
        }
    }
}

impl Iterator for Prefetcher {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.receiver.as_ref()?.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channel first unblocks the worker's send, so the join cannot hang.
        self.receiver.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
