//! The train crate's one error type.

use std::path::PathBuf;

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
    /// The model rejected the config or failed.
    #[error(transparent)]
    Model(#[from] moelab_model::ModelError),
}
