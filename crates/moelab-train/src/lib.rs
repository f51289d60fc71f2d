//! The training run: config, optimizer, schedules, checkpoints, metrics, evaluation and
//! router-activation logging. `trainer.rs` reads top to bottom.

pub mod ablate;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod hf;
pub mod optim;
pub mod router_log;
pub mod schedule;
pub mod trace;
pub mod trainer;

pub use ablate::{run_ablation, Ablation, AblationEvent, AblationOutcome};
pub use bench::{bench, BenchOptions, BenchReport};
pub use config::{Config, RunConfig};
pub use error::TrainError;
pub use eval::EvalReport;
pub use trace::{trace_checkpoint, TraceOptions};
pub use trainer::{evaluate_checkpoint, train, Event, Resume, RunOptions, StepMetrics, Summary};
