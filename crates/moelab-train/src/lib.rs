//! The training run: config, optimizer, schedules, checkpoints, metrics, evaluation and
//! router-activation logging. `trainer.rs` reads top to bottom.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod optim;
pub mod router_log;
pub mod schedule;
pub mod trainer;

pub use config::{Config, RunConfig};
pub use error::TrainError;
pub use eval::EvalReport;
pub use trainer::{evaluate_checkpoint, train, Event, Resume, RunOptions, StepMetrics, Summary};
