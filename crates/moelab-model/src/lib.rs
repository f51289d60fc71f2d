//! The mixture-of-experts transformer on candle: config, attention, routers, experts, losses,
//! parameter, FLOP and memory counts, and the exact mapping to Hugging Face OLMoE / Mixtral.
//!
//! Knows nothing of files, domains or training: it maps token ids to logits, losses and a
//! per-layer routing record. Every op on the gradient path has a backward (see moelab-kernels).

pub mod attention;
mod checked;
pub mod config;
pub mod error;
pub mod hf;
pub mod info;
pub mod init;
pub mod layers;
pub mod memory;
pub mod model;
pub mod moe;

pub use config::{BalanceScope, ModelConfig, MoeConfig, RouterKind};
pub use error::{ModelError, Result};
pub use info::ModelInfo;
pub use memory::{fmt_bytes, MemoryEstimate, MemoryTerm, Sizing};
pub use model::{Block, ForwardOptions, MoeTransformer, Output};
pub use moe::{ExpertBackend, ExpertWeights, LayerRouting};
