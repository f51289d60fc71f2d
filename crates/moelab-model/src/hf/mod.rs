//! Hugging Face `transformers` mapping: which architecture (`OlmoeForCausalLM` or
//! `MixtralForCausalLM`) computes exactly what a `[model]` computes, its typed `config.json`,
//! and the tensor names on both sides. Pure data: reading and writing folders is the train
//! crate's job.
//!
//! Only exact mappings are offered: a config that no supported architecture computes the same
//! function for is refused with every offending feature listed.
//!
//! Name mapping (moelab -> HF; `{i}` block, `{j}` expert):
//!
//! | moelab | OLMoE | Mixtral |
//! |---|---|---|
//! | `embed.weight` | `model.embed_tokens.weight` | same |
//! | `lm_head.weight` (absent when tied) | `lm_head.weight` | same |
//! | `final_norm.weight` | `model.norm.weight` | same |
//! | `blocks.{i}.attn_norm.weight` | `model.layers.{i}.input_layernorm.weight` | same |
//! | `blocks.{i}.ffn_norm.weight` | `model.layers.{i}.post_attention_layernorm.weight` | same |
//! | `blocks.{i}.attn.{q,k,v,o}_proj.weight` | `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` | same |
//! | `blocks.{i}.attn.{q,k}_norm.weight` | `model.layers.{i}.self_attn.{q,k}_norm.weight` | — |
//! | `blocks.{i}.moe.router.weight` | `model.layers.{i}.mlp.gate.weight` | `model.layers.{i}.block_sparse_moe.gate.weight` |
//! | `blocks.{i}.moe.experts.gate_proj[j]` | `model.layers.{i}.mlp.experts.{j}.gate_proj.weight` | `….block_sparse_moe.experts.{j}.w1.weight` |
//! | `blocks.{i}.moe.experts.up_proj[j]` | `model.layers.{i}.mlp.experts.{j}.up_proj.weight` | `….block_sparse_moe.experts.{j}.w3.weight` |
//! | `blocks.{i}.moe.experts.down_proj[j]` | `model.layers.{i}.mlp.experts.{j}.down_proj.weight` | `….block_sparse_moe.experts.{j}.w2.weight` |
//!
//! Exports use the classic per-expert layout, which every `transformers` version loads (newer
//! ones fuse it into `mlp.experts.gate_up_proj` on load). Imports also accept the fused layout
//! and Mixtral's `mlp.` spelling.

pub mod config;
pub mod names;

pub use config::{
    aux_loss_coef_from_hf, aux_loss_notes, hf_aux_loss_coef, HfConfig, RopeParameters, RopeScaling,
    SpecialTokens,
};
pub use names::{from_hf_tensors, to_hf_tensors};

use crate::{ModelConfig, ModelError, RouterKind};

/// The `transformers` architectures an export can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArch {
    /// `OlmoeForCausalLM`: QK-norm over the whole projection, optional top-k renormalisation.
    Olmoe,
    /// `MixtralForCausalLM`: no QK-norm, top-k probabilities always renormalised.
    Mixtral,
}

impl HfArch {
    /// The `architectures[0]` string of config.json.
    pub fn class_name(self) -> &'static str {
        match self {
            HfArch::Olmoe => "OlmoeForCausalLM",
            HfArch::Mixtral => "MixtralForCausalLM",
        }
    }

    /// The `model_type` of config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            HfArch::Olmoe => "olmoe",
            HfArch::Mixtral => "mixtral",
        }
    }

    /// The architecture named by a config.json `architectures[0]` or `model_type` string.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "OlmoeForCausalLM" | "olmoe" => Some(HfArch::Olmoe),
            "MixtralForCausalLM" | "mixtral" => Some(HfArch::Mixtral),
            _ => None,
        }
    }

    /// The prefix of a block's MoE module in classic checkpoints.
    fn moe_prefix(self) -> &'static str {
        match self {
            HfArch::Olmoe => "mlp",
            HfArch::Mixtral => "block_sparse_moe",
        }
    }

    /// Per-expert (gate, up, down) tensor names in classic checkpoints.
    fn expert_names(self) -> [&'static str; 3] {
        match self {
            HfArch::Olmoe => ["gate_proj", "up_proj", "down_proj"],
            HfArch::Mixtral => ["w1", "w3", "w2"],
        }
    }
}

fn hf_err(message: String) -> ModelError {
    ModelError::Hf(message)
}

/// Picks the architecture that computes exactly what `cfg` computes, or lists every feature
/// that no supported architecture can express.
pub fn choose_arch(cfg: &ModelConfig) -> Result<HfArch, ModelError> {
    let moe = &cfg.moe;
    let mut problems = Vec::new();
    if moe.n_experts == 0 {
        problems.push(
            "model.moe.n_experts = 0 (a dense model; OLMoE and Mixtral are MoE-only)".to_string(),
        );
    }
    if moe.dense_layers > 0 {
        problems.push(format!(
            "model.moe.dense_layers = {} (OLMoE and Mixtral use experts in every block)",
            moe.dense_layers
        ));
    }
    if moe.router != RouterKind::Softmax {
        problems.push(
            "model.moe.router = \"sigmoid\" (OLMoE and Mixtral route by softmax)".to_string(),
        );
    }
    if let Some(cf) = moe.capacity_factor {
        problems.push(format!(
            "model.moe.capacity_factor = {cf} (OLMoE and Mixtral are dropless)"
        ));
    }
    if moe.expert_bias {
        problems.push(
            "model.moe.expert_bias = true (no selection-only router bias in OLMoE or Mixtral)"
                .to_string(),
        );
    }
    if moe.n_shared_experts > 0 {
        problems.push(format!(
            "model.moe.n_shared_experts = {} (OLMoE and Mixtral have no shared experts; Qwen2-MoE gates its shared expert with a sigmoid, which is not the same function)",
            moe.n_shared_experts
        ));
    }
    if !cfg.qk_norm && !moe.renormalize {
        problems.push(
            "model.qk_norm = false with model.moe.renormalize = false (OLMoE always has QK-norm; Mixtral always renormalises the top-k probabilities)"
                .to_string(),
        );
    }
    if !problems.is_empty() {
        return Err(hf_err(format!(
            "no supported Hugging Face architecture (OlmoeForCausalLM, MixtralForCausalLM) computes this model exactly; unsupported: {}",
            problems.join("; ")
        )));
    }
    Ok(if cfg.qk_norm {
        HfArch::Olmoe
    } else {
        HfArch::Mixtral
    })
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::MoeConfig;

    /// A small config of either architecture.
    pub(crate) fn model(qk_norm: bool, renormalize: bool) -> ModelConfig {
        ModelConfig {
            vocab_size: 64,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: Some(2),
            max_seq_len: 16,
            rope_theta: 500_000.0,
            norm_eps: 1e-6,
            qk_norm,
            tie_embeddings: false,
            ffn_hidden: None,
            init_std: 0.02,
            moe: MoeConfig {
                n_experts: 4,
                top_k: 2,
                expert_ff: 8,
                renormalize,
                ..MoeConfig::default()
            },
        }
    }

    #[test]
    fn the_architecture_follows_qk_norm() {
        assert_eq!(choose_arch(&model(true, false)).unwrap(), HfArch::Olmoe);
        assert_eq!(choose_arch(&model(true, true)).unwrap(), HfArch::Olmoe);
        assert_eq!(choose_arch(&model(false, true)).unwrap(), HfArch::Mixtral);
    }

    #[test]
    fn every_unsupported_feature_is_listed() {
        let mut cfg = model(false, false);
        cfg.moe.router = RouterKind::Sigmoid;
        cfg.moe.capacity_factor = Some(1.0);
        let err = choose_arch(&cfg).unwrap_err().to_string();
        for feature in ["sigmoid", "capacity_factor", "renormalize = false"] {
            assert!(err.contains(feature), "{feature}: {err}");
        }
    }
}
