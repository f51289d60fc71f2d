//! The layer everything about a run sits on: the run folder (`run_dir.rs`: every path, the
//! lock, the config history), the checkpoint folder format (`checkpoint.rs`), loading a model
//! and its data from a run (`load.rs`), and the device (`device.rs`). `trainer/`, `eval`,
//! `bench`, `hf_io`, `trace_checkpoint` and `ablate` all build on it; it builds on none of them.

pub mod checkpoint;
pub mod device;
pub mod load;
mod run_dir;

pub use run_dir::{RunDir, RunLock};
