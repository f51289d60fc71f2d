//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing or analysing router logs and traces.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("reading", "creating", ...).
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file could not be parsed or serialised.
    #[error("safetensors file {path}: {source}")]
    SafeTensors {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: safetensors::SafeTensorError,
    },
    /// A safetensors file lacks a tensor this format requires.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The file involved.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// A tensor has the wrong dtype or shape.
    #[error("{path}: tensor `{name}`: {reason}")]
    BadTensor {
        /// The file involved.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// A required `__metadata__` key is absent.
    #[error("{path}: missing metadata key `{key}`")]
    MissingMetadata {
        /// The file involved.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A `__metadata__` value (or an index.json field) cannot be understood.
    #[error("{path}: metadata key `{key}`: {reason}")]
    BadMetadata {
        /// The file involved.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// JSON could not be written or read.
    #[error("JSON {path}: {source}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// Two things that must describe the same model/domains/tokens do not.
    #[error("mismatch: {0}")]
    Mismatch(String),
    /// In-memory input is inconsistent (wrong lengths, ids out of range, ...).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A directory holds nothing this crate can read.
    #[error("{path}: {reason}")]
    NothingToRead {
        /// The path given.
        path: PathBuf,
        /// What was looked for.
        reason: String,
    },
    /// Drawing a plot failed.
    #[error("plot {path}: {reason}")]
    Plot {
        /// The image being drawn.
        path: PathBuf,
        /// The backend's message.
        reason: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = TraceError> = std::result::Result<T, E>;

impl TraceError {
    /// Wraps an I/O error with the action and path it happened on.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        TraceError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
