//! The crate's one error type: every variant says what went wrong and where.

use std::path::PathBuf;

/// Everything that can go wrong between raw corpus files and batches.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read, written or listed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A bad `[data]` config value; `key` is the dotted path of the offending key.
    #[error("invalid config key `{key}`: {reason}")]
    Config {
        /// Dotted key, e.g. `data.mixture.cod`.
        key: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A bad input document under `--strict` (or an input that cannot be used at all).
    #[error("{path}:{line}: {reason}")]
    Input {
        /// The input file.
        path: PathBuf,
        /// 1-based line number (0 when the problem concerns the whole file).
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The arguments of `prepare` do not describe a usable corpus.
    #[error("prepare: {0}")]
    Prepare(String),
    /// The tokenizer could not be loaded, trained, saved or applied.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The tokenizer.json involved (or the output path when training).
        path: PathBuf,
        /// The tokenizers library's message.
        reason: String,
    },
    /// The manifest is missing, unreadable or inconsistent.
    #[error("manifest {path}: {reason}")]
    Manifest {
        /// The manifest.json file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A shard is truncated, corrupt or does not match the manifest.
    #[error(
        "corrupt shard {path}: {reason} (delete it and re-run `moelab prepare` to rebuild it)"
    )]
    CorruptShard {
        /// The shard file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// A mixture asks for data the dataset cannot provide.
    #[error("mixture: {0}")]
    Mixture(String),
    /// Training would repeat a domain more often than `data.max_repetition` allows.
    #[error("data.max_repetition = {max}: {details}")]
    Repetition {
        /// The configured limit.
        max: f64,
        /// Per-source epochs that exceed it, with token counts.
        details: String,
    },
    /// A resume state does not belong to this dataset, tokenizer, seq_len or seed.
    #[error("cannot resume the data stream: {0}")]
    Resume(String),
    /// An argument outside its range (rank >= world, zero-sized batch, ...).
    #[error("invalid argument: {0}")]
    Argument(String),
}

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// A config error for the dotted `key`.
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        DataError::Config {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
