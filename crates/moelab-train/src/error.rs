//! The train crate's one error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong setting up or running a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or does not fit the schema; `key` is the dotted path.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A `--set key.path=value` override that cannot be applied.
    #[error("--set {spec}: {reason}")]
    Override {
        /// The override as given.
        spec: String,
        /// Why it cannot be applied.
        reason: String,
    },
    /// A checkpoint that cannot be written, read, or does not fit the run.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A Hugging Face export or import that cannot be done exactly; names the tensor, key or
    /// the unsupported features.
    #[error("hugging face: {0}")]
    Hf(String),
    /// The run folder cannot be used as asked.
    #[error("run folder {path}: {reason}")]
    RunDir {
        /// The run folder.
        path: PathBuf,
        /// Why, and what to do instead.
        reason: String,
    },
    /// The configured device cannot be opened.
    #[error("device: {0}")]
    Device(String),
    /// A command argument that does not fit the run or its data (e.g. an unknown domain).
    #[error("{0}")]
    Argument(String),
    /// An ablation file that cannot be used; `message` names the key or variant.
    #[error("{path}: {message}")]
    Ablation {
        /// The ablation file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The ranks of a distributed job cannot go on together (they disagree, or one failed);
    /// every rank reports the same message.
    #[error("distributed: {0}")]
    Distributed(String),
    /// SIGINT or SIGTERM asked the work to stop before it was done.
    #[error("interrupted by a signal")]
    Interrupted,
    /// Too many consecutive steps had a non-finite loss or gradient.
    #[error("{count} consecutive steps had a non-finite loss or gradient (last at step {step}); stopped. The newest checkpoint known to give a finite loss: {last_checkpoint}")]
    NonFinite {
        /// Consecutive bad steps.
        count: u32,
        /// The last bad step.
        step: u64,
        /// The newest checkpoint whose weights gave a finite loss, or a note that there is none.
        last_checkpoint: String,
    },
    /// The data layer failed.
    #[error(transparent)]
    Data(#[from] moelab_data::DataError),
    /// The router log or trace could not be written.
    #[error(transparent)]
    Trace(#[from] moelab_trace::TraceError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model rejected the config or failed.
    #[error(transparent)]
    Model(#[from] moelab_model::ModelError),
}

impl TrainError {
    /// The constructor for an I/O error on `path`: `.map_err(TrainError::io(&path))`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + use<> {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    }
}
