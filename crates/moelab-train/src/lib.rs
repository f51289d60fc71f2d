//! The training run: config, optimizer, schedules, checkpoints, metrics, evaluation and
//! router-activation logging. `trainer/mod.rs` reads top to bottom;
//! `run/` (the run folder, checkpoints, loading) is the layer everything else sits on.

pub mod ablate;
pub mod ablate_launch;
pub mod balance;
pub mod batches;
pub mod bench;
pub mod config;
pub mod dist;
pub mod error;
pub mod eval;
pub mod hf_io;
pub mod interrupt;
pub mod loss;
pub mod mix;
pub mod optim;
pub mod router_logger;
pub mod run;
pub mod sample;
pub mod schedule;
pub mod tasks;
pub mod trace_checkpoint;
pub mod trainer;

pub use run::checkpoint;

pub use ablate::{run_ablation, Ablation, AblationEvent, AblationOutcome};
pub use bench::{bench, BenchOptions, BenchReport};
pub use config::{Config, ConfigOrigin, RunConfig};
pub use error::TrainError;
pub use eval::{evaluate_checkpoint, EvalReport};
pub use run::{RunDir, RunLock};
pub use trace_checkpoint::{trace_checkpoint, TraceOptions};
pub use trainer::{
    preflight, train, train_on, Event, RankLayout, Resume, RunOptions, StepMetrics, Summary,
    Trainer,
};
