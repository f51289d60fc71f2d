//! Parameter and training-FLOP accounting, per component, from the config alone.
//!
//! Convention (as the benchmark's MFU): training FLOPs per token = 6 x the parameters a token
//! multiplies by (routed experts: only its k; LM head included; the input embedding lookup is
//! free) + the attention-score term 6 x layers x seq x (n_heads x head_dim), which is the
//! 12 x layers x seq x width of the PaLM formula halved for the causal mask.

use serde::Serialize;

use crate::checked::Count;
use crate::ModelConfig;

/// One row of the accounting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Component {
    /// What the row counts (`embedding`, `attention`, `routed_experts`, ...).
    pub name: &'static str,
    /// Parameters stored.
    pub params: u64,
    /// Parameters a single token touches.
    pub active_params: u64,
    /// Forward + backward FLOPs per token spent in this component.
    pub train_flops_per_token: u64,
}

/// Totals and the per-component breakdown printed by `moelab model-info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// Sequence length the attention term assumes.
    pub seq_len: u64,
    /// Parameters stored (expert biases are state, not parameters, and are not counted).
    pub total_params: u64,
    /// Parameters a single token touches, embedding included.
    pub active_params: u64,
    /// Forward + backward FLOPs per token.
    pub train_flops_per_token: u64,
    /// The breakdown; rows sum to the totals.
    pub components: Vec<Component>,
}

impl ModelInfo {
    /// Counts for `cfg` at sequence length `seq_len`; an error when a count does not fit in
    /// 64 bits (sizes no machine holds), naming the component.
    pub fn new(cfg: &ModelConfig, seq_len: usize) -> crate::Result<Self> {
        let u = Count::of;
        let (d, vocab, layers) = (u(cfg.d_model), u(cfg.vocab_size), u(cfg.n_layers));
        let q_dim = u(cfg.n_heads) * u(cfg.head_dim());
        let kv_dim = u(cfg.kv_heads()) * u(cfg.head_dim());
        let moe_layers = u(cfg.n_moe_layers());
        let dense_layers = layers - moe_layers;
        let moe = &cfg.moe;
        let expert = 3 * d * u(moe.expert_ff);
        let six = |params: Count| 6 * params;

        let qk_norm = if cfg.qk_norm {
            q_dim + kv_dim
        } else {
            Count::ZERO
        };
        let attn_per_layer = d * q_dim + 2 * d * kv_dim + q_dim * d + qk_norm;
        let attention = layers * attn_per_layer;
        let norms = layers * 2 * d + d;
        let dense_ffn = dense_layers * 3 * d * u(cfg.ffn_hidden.unwrap_or(0));
        let router = moe_layers * d * u(moe.n_experts);
        let routed_total = moe_layers * u(moe.n_experts) * expert;
        let routed_active = moe_layers * u(moe.top_k) * expert;
        let shared = moe_layers * u(moe.n_shared_experts) * expert;
        let embedding = vocab * d;
        // A tied head stores nothing new but still costs its matmul.
        let head_params = if cfg.tie_embeddings {
            Count::ZERO
        } else {
            vocab * d
        };
        let attention_scores = 6 * layers * u(seq_len) * q_dim;

        let rows = [
            ("embedding", embedding, embedding, Count::ZERO),
            ("attention", attention, attention, six(attention)),
            (
                "attention_scores",
                Count::ZERO,
                Count::ZERO,
                attention_scores,
            ),
            ("norms", norms, norms, six(norms)),
            ("dense_ffn", dense_ffn, dense_ffn, six(dense_ffn)),
            ("router", router, router, six(router)),
            (
                "routed_experts",
                routed_total,
                routed_active,
                six(routed_active),
            ),
            ("shared_experts", shared, shared, six(shared)),
            ("lm_head", head_params, head_params, six(vocab * d)),
        ];
        let total = |pick: fn(&(&str, Count, Count, Count)) -> Count| rows.iter().map(pick).sum();
        let (total_params, active_params, flops): (Count, Count, Count) =
            (total(|r| r.1), total(|r| r.2), total(|r| r.3));
        let mut components = Vec::with_capacity(rows.len());
        for (name, params, active, flops) in rows {
            components.push(Component {
                name,
                params: params.value(&format!("the parameter count of {name}"))?,
                active_params: active.value(&format!("the active parameter count of {name}"))?,
                train_flops_per_token: flops
                    .value(&format!("the training FLOPs per token of {name}"))?,
            });
        }
        Ok(Self {
            seq_len: u(seq_len).value("seq_len")?,
            total_params: total_params.value("the total parameter count")?,
            active_params: active_params.value("the active parameter count")?,
            train_flops_per_token: flops.value("the training FLOPs per token")?,
            components,
        })
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<18} {:>14} {:>14} {:>18}\n",
            "component", "params", "active", "train FLOPs/token"
        );
        for c in &self.components {
            out += &format!(
                "{:<18} {:>14} {:>14} {:>18}\n",
                c.name, c.params, c.active_params, c.train_flops_per_token
            );
        }
        out += &format!(
            "{:<18} {:>14} {:>14} {:>18}\n(seq_len {} for the attention term)\n",
            "total",
            self.total_params,
            self.active_params,
            self.train_flops_per_token,
            self.seq_len
        );
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::MemoryEstimate;
    use crate::MoeTransformer;
    use candle_core::{DType, Device};

    fn config(text: &str) -> ModelConfig {
        toml::from_str(text).unwrap()
    }

    const MOE: &str = r#"
vocab_size = 100
d_model = 16
n_layers = 3
n_heads = 4
n_kv_heads = 2
max_seq_len = 8
qk_norm = true
ffn_hidden = 24
[moe]
n_experts = 4
top_k = 2
expert_ff = 8
n_shared_experts = 1
dense_layers = 1
"#;

    #[test]
    fn hand_count_of_a_small_moe() {
        let info = ModelInfo::new(&config(MOE), 8).unwrap();
        // head_dim 4, q_dim 16, kv_dim 8.
        // attention per layer: 16*16 + 2*16*8 + 16*16 + (16 + 8) = 256 + 256 + 256 + 24 = 792
        // x 3 layers = 2376; norms 3*2*16 + 16 = 112; dense ffn (1 layer) 3*16*24 = 1152;
        // router 2 layers * 16*4 = 128; one expert 3*16*8 = 384: routed 2*4*384 = 3072 total,
        // 2*2*384 = 1536 active; shared 2*384 = 768; embedding 1600; lm_head 1600.
        let total = 1600 + 2376 + 112 + 1152 + 128 + 3072 + 768 + 1600;
        let active = total - 3072 + 1536;
        assert_eq!(info.total_params, total);
        assert_eq!(info.active_params, active);
        // FLOPs: 6 x (active - embedding) + 6 * 3 layers * 8 seq * 16 q_dim.
        assert_eq!(
            info.train_flops_per_token,
            6 * (active - 1600) + 6 * 3 * 8 * 16
        );
    }

    /// Sizes whose counts do not fit in 64 bits are an error naming what overflowed, not a
    /// wrapped number (release builds) or a panic (debug builds).
    #[test]
    fn absurd_sizes_are_an_error_not_a_wrapped_count() {
        let cfg = config(
            &MOE.replace("vocab_size = 100", "vocab_size = 4_000_000_000_000")
                .replace("d_model = 16", "d_model = 8_000_000_000"),
        );
        let err = ModelInfo::new(&cfg, 8).unwrap_err().to_string();
        assert!(
            err.contains("overflows 64 bits") && err.contains("embedding"),
            "{err}"
        );
        let err = MemoryEstimate::new(&cfg, 2, 8, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("overflows 64 bits"), "{err}");
        let err = ModelInfo::new(&config(MOE), usize::MAX)
            .unwrap_err()
            .to_string();
        assert!(err.contains("attention_scores"), "{err}");
    }

    #[test]
    fn totals_match_the_built_model() {
        for text in [
            MOE.to_string(),
            MOE.replace("qk_norm = true", "qk_norm = false\ntie_embeddings = true"),
            MOE.replace("n_experts = 4", "n_experts = 0"),
        ] {
            let cfg = config(&text);
            let (_model, varmap) = MoeTransformer::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
            let stored: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
            assert_eq!(
                ModelInfo::new(&cfg, 8).unwrap().total_params,
                stored as u64,
                "{text}"
            );
        }
    }
}
