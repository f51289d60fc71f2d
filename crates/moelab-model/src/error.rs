//! The model crate's one error type.

/// Everything that can go wrong building or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config value that no model can be built from; `key` is the full dotted TOML path.
    #[error("invalid config key `{key}`: {reason}")]
    Config {
        /// Dotted TOML path of the offending key, e.g. `model.moe.top_k`.
        key: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// An input batch that does not fit the model (shape, dtype or token range).
    #[error("invalid model input: {0}")]
    Input(String),
    /// No exact Hugging Face mapping: an unsupported feature, a config.json moelab cannot
    /// represent, or a tensor map that does not fit the config; names the key or tensor.
    #[error("{0}")]
    Hf(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;
