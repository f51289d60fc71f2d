//! `[model]` and `[model.moe]`: the shape of the network, validated before any tensor exists.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The decoder-only transformer: sizes, attention and normalisation choices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Rows of the embedding and the LM head; must cover every token id the data can produce.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Query heads; `d_model` must be divisible by it (head_dim = d_model / n_heads).
    pub n_heads: usize,
    /// Key/value heads for grouped-query attention; defaults to `n_heads` (plain multi-head).
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// Longest sequence the rotary tables are built for.
    pub max_seq_len: usize,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Epsilon inside every RMSNorm.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// RMSNorm on the projected queries and keys (OLMoE style: over the whole projection width).
    #[serde(default)]
    pub qk_norm: bool,
    /// Share the input embedding with the LM head.
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Hidden width of the dense SwiGLU FFN used by dense blocks; required when any block is dense.
    #[serde(default)]
    pub ffn_hidden: Option<usize>,
    /// Standard deviation of the normal initialisation of every matrix.
    #[serde(default = "default_init_std")]
    pub init_std: f64,
    /// The mixture-of-experts feed-forward; `n_experts = 0` (the default) makes every block dense.
    #[serde(default)]
    pub moe: MoeConfig,
}

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterKind {
    /// Softmax over all experts, then top-k (Switch, OLMoE, Mixtral).
    Softmax,
    /// Independent sigmoid per expert, top-k, gates normalised over the chosen k (DeepSeek-V3).
    Sigmoid,
}

/// Over which tokens the load-balancing loss measures balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceScope {
    /// All tokens of the micro-batch together (Switch / GShard).
    MicroBatch,
    /// Each sequence separately, then averaged (DeepSeek-V3's sequence-wise loss).
    Sequence,
    /// The whole global batch: expert-selection fractions counted over every micro-batch of the
    /// step on every rank (Megatron-Core's global aux loss, arXiv 2501.11873). The trainer
    /// supplies the counts and forms the loss with [`crate::moe::global_balance_loss`]; the
    /// model's own aux loss is then only reported, without a gradient.
    Global,
}

/// The mixture-of-experts feed-forward and its routing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    /// Routed experts per MoE block; 0 means no MoE anywhere (a dense model).
    pub n_experts: usize,
    /// Experts each token is sent to.
    pub top_k: usize,
    /// Hidden width of each SwiGLU expert.
    pub expert_ff: usize,
    /// Always-active experts of width `expert_ff` added to every MoE block (DeepSeek / Qwen-MoE).
    pub n_shared_experts: usize,
    /// The first N blocks use the dense FFN instead of experts.
    pub dense_layers: usize,
    /// Score function of the router.
    pub router: RouterKind,
    /// Softmax router only: renormalise the chosen k probabilities to sum to one.
    pub renormalize: bool,
    /// Expert capacity as a multiple of the even share (tokens x k / experts); overflow tokens are
    /// dropped and pass through the residual. Absent means dropless.
    pub capacity_factor: Option<f64>,
    /// Weight of the load-balancing loss (E x sum f_i P_i), summed over MoE layers.
    pub aux_loss_coef: f64,
    /// Tokens over which balance is measured.
    pub aux_loss_scope: BalanceScope,
    /// Weight of the router z-loss (mean logsumexp^2), summed over MoE layers.
    pub z_loss_coef: f64,
    /// Steps over which routing blends from random to learned logits (0 disables the warm-up).
    pub routing_warmup_steps: u64,
    /// Keep a per-expert bias added to scores for selection only (auxiliary-loss-free balancing);
    /// the trainer updates it.
    pub expert_bias: bool,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            n_experts: 0,
            top_k: 2,
            expert_ff: 0,
            n_shared_experts: 0,
            dense_layers: 0,
            router: RouterKind::Softmax,
            renormalize: false,
            capacity_factor: None,
            aux_loss_coef: 0.01,
            aux_loss_scope: BalanceScope::MicroBatch,
            z_loss_coef: 0.001,
            routing_warmup_steps: 0,
            expert_bias: false,
        }
    }
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_init_std() -> f64 {
    0.02
}

fn positive(value: f64) -> bool {
    value > 0.0 && value.is_finite()
}

fn invalid(key: &str, reason: String) -> ModelError {
    ModelError::Config {
        key: key.to_string(),
        reason,
    }
}

impl ModelConfig {
    /// Key/value heads actually used.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Whether block `layer` uses experts (otherwise the dense FFN).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.n_experts > 0 && layer >= self.moe.dense_layers
    }

    /// Number of blocks that use experts.
    pub fn n_moe_layers(&self) -> usize {
        (0..self.n_layers).filter(|&l| self.is_moe_layer(l)).count()
    }

    /// Checks every shape constraint; the error names the offending key.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (key, value) in [
            ("model.vocab_size", self.vocab_size),
            ("model.d_model", self.d_model),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.max_seq_len", self.max_seq_len),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(invalid(
                "model.n_heads",
                format!(
                    "d_model = {} is not divisible by n_heads = {}",
                    self.d_model, self.n_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(invalid(
                "model.n_heads",
                format!(
                    "head_dim = d_model / n_heads = {} must be even for rotary embeddings",
                    self.head_dim()
                ),
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.n_heads.is_multiple_of(kv) {
            return Err(invalid(
                "model.n_kv_heads",
                format!(
                    "n_heads = {} is not divisible by n_kv_heads = {kv}",
                    self.n_heads
                ),
            ));
        }
        if !positive(self.rope_theta) {
            return Err(invalid(
                "model.rope_theta",
                "must be positive and finite".into(),
            ));
        }
        if !positive(self.norm_eps) {
            return Err(invalid(
                "model.norm_eps",
                "must be positive and finite".into(),
            ));
        }
        if !positive(self.init_std) {
            return Err(invalid(
                "model.init_std",
                "must be positive and finite".into(),
            ));
        }
        let any_dense = (0..self.n_layers).any(|l| !self.is_moe_layer(l));
        if any_dense && self.ffn_hidden.unwrap_or(0) == 0 {
            return Err(invalid(
                "model.ffn_hidden",
                "dense blocks need a hidden width (set model.ffn_hidden, or use experts in every block)"
                    .into(),
            ));
        }
        self.moe.validate(self.n_layers)
    }
}

impl MoeConfig {
    fn validate(&self, n_layers: usize) -> Result<(), ModelError> {
        if self.n_experts == 0 {
            return Ok(());
        }
        if self.top_k == 0 {
            return Err(invalid("model.moe.top_k", "must be at least 1".into()));
        }
        if self.top_k > self.n_experts {
            return Err(invalid(
                "model.moe.top_k",
                format!(
                    "top_k = {} exceeds n_experts = {}",
                    self.top_k, self.n_experts
                ),
            ));
        }
        if self.expert_ff == 0 {
            return Err(invalid("model.moe.expert_ff", "must be at least 1".into()));
        }
        if self.dense_layers > n_layers {
            return Err(invalid(
                "model.moe.dense_layers",
                format!(
                    "dense_layers = {} exceeds n_layers = {n_layers}",
                    self.dense_layers
                ),
            ));
        }
        if let Some(cf) = self.capacity_factor {
            if !positive(cf) {
                return Err(invalid(
                    "model.moe.capacity_factor",
                    format!("must be positive and finite, got {cf}"),
                ));
            }
        }
        for (key, value) in [
            ("model.moe.aux_loss_coef", self.aux_loss_coef),
            ("model.moe.z_loss_coef", self.z_loss_coef),
        ] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(invalid(
                    key,
                    format!("must be >= 0 and finite, got {value}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, String> {
        let cfg: ModelConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    const BASE: &str =
        "vocab_size = 64\nd_model = 32\nn_layers = 2\nn_heads = 4\nmax_seq_len = 16\n";

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&format!("{BASE}n_head = 4\n")).unwrap_err();
        assert!(err.contains("n_head"), "{err}");
        let err = parse(&format!("{BASE}[moe]\nn_expert = 4\n")).unwrap_err();
        assert!(err.contains("n_expert"), "{err}");
    }

    #[test]
    fn impossible_shapes_name_the_key() {
        let err = parse(&BASE.replace("n_heads = 4", "n_heads = 3")).unwrap_err();
        assert!(err.contains("model.n_heads"), "{err}");
        let err = parse(&format!(
            "{BASE}[moe]\nn_experts = 2\ntop_k = 3\nexpert_ff = 8\n"
        ))
        .unwrap_err();
        assert!(err.contains("model.moe.top_k"), "{err}");
        let err = parse(&format!("{BASE}n_kv_heads = 3\nffn_hidden = 8\n")).unwrap_err();
        assert!(err.contains("model.n_kv_heads"), "{err}");
        let err = parse(BASE).unwrap_err();
        assert!(err.contains("model.ffn_hidden"), "{err}");
    }

    #[test]
    fn valid_moe_config_parses() {
        let cfg = parse(&format!(
            "{BASE}[moe]\nn_experts = 4\ntop_k = 2\nexpert_ff = 16\nrouter = \"sigmoid\"\n"
        ))
        .unwrap();
        assert_eq!(cfg.moe.router, RouterKind::Sigmoid);
        assert_eq!(cfg.n_moe_layers(), 2);
        assert_eq!(cfg.kv_heads(), 4);
    }
}
