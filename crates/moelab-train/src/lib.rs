//! The training run: config, optimizer, schedules, checkpoints, collectives, metrics and
//! router-activation logging.
//!
//! So far it holds the run config (`[run]`, `[model]`) with `--set` overrides; the trainer issue
//! adds the run itself.

pub mod config;
pub mod error;

pub use config::{Config, RunConfig};
pub use error::TrainError;
