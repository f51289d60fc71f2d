//! The training run: config, optimizer, schedules, checkpoints, metrics, evaluation and
//! router-activation logging. `trainer/mod.rs` reads top to bottom.

pub mod ablate;
pub mod ablate_launch;
pub mod balance;
pub mod bench;
pub mod checkpoint_trace;
pub mod config;
pub mod dist;
pub mod error;
pub mod eval;
pub mod hf_io;
pub mod interrupt;
pub mod mix;
pub mod optim;
pub mod routing_counts;
pub mod schedule;
pub mod tasks;
pub mod trainer;

pub use trainer::checkpoint;

pub use ablate::{run_ablation, Ablation, AblationEvent, AblationOutcome};
pub use bench::{bench, BenchOptions, BenchReport};
pub use checkpoint_trace::{trace_checkpoint, TraceOptions};
pub use config::{Config, RunConfig};
pub use error::TrainError;
pub use eval::EvalReport;
pub use trainer::{
    evaluate_checkpoint, train, train_on, Event, Resume, RunDir, RunOptions, StepMetrics, Summary,
    Trainer,
};
