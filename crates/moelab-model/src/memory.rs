//! Memory a training run needs, from the config alone: so a model that cannot fit is refused
//! before the first tensor is allocated instead of thrashing.
//!
//! Counted as this model code runs under candle: every intermediate of the forward stays
//! referenced by the autograd graph until the backward is done, so "activations" are the
//! forward's intermediates, counted tensor by tensor below. Not counted: the data pipeline,
//! the tokenizer, scratch buffers inside kernels, the in-flight gradients of activations during
//! the backward, allocator slack and the binary itself (the process baseline).

use candle_core::DType;
use serde::ser::{Serialize, SerializeStruct, Serializer};

use crate::{ModelConfig, ModelInfo};

/// Bytes of an f32 value: master weights, gradients, optimizer moments, router and logits.
const F32: u64 = 4;

/// One named share of the activation memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemoryTerm {
    /// What the bytes hold (`attention_scores`, `expert_hidden`, ...).
    pub name: &'static str,
    /// Bytes per micro-batch, summed over the blocks.
    pub bytes: u64,
}

/// Bytes a training run holds at its peak (the backward of a micro-batch), by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Sequences per micro-batch the activations assume.
    pub micro_batch: u64,
    /// Tokens per sequence the activations assume.
    pub seq_len: u64,
    /// Dtype of activations and matmuls (`f32`, `bf16`, ...).
    pub compute_dtype: &'static str,
    /// f32 master weights: every stored parameter.
    pub weights_bytes: u64,
    /// f32 gradients: one per parameter, alive from the backward to the optimizer step.
    pub gradients_bytes: u64,
    /// AdamW state: the first and second moments, f32, one of each per parameter.
    pub optimizer_bytes: u64,
    /// The compute-dtype cast of every weight the forward uses (zero in f32: the cast is a
    /// no-op); the graph keeps it for the matmul backward.
    pub compute_weights_bytes: u64,
    /// The rotary cos/sin tables for `model.max_seq_len` positions: built in f64 on the host,
    /// then kept in the compute dtype. They scale with `max_seq_len`, not with the batch.
    pub tables_bytes: u64,
    /// Activations one micro-batch keeps for its backward; the sum of `activation_terms`.
    pub activations_bytes: u64,
    /// The activations, by what they hold.
    pub activation_terms: Vec<MemoryTerm>,
}

impl MemoryEstimate {
    /// The estimate for training `cfg` on `micro_batch` sequences of `seq_len` tokens with
    /// activations in `compute_dtype` (f32 master weights and AdamW, as the trainer runs).
    pub fn new(
        cfg: &ModelConfig,
        micro_batch: usize,
        seq_len: usize,
        compute_dtype: DType,
    ) -> Self {
        let u = |x: usize| x as u64;
        let params = ModelInfo::new(cfg, seq_len).total_params;
        let c = u(compute_dtype.size_in_bytes());
        let mixed = c != F32;
        let (b, t) = (u(micro_batch), u(seq_len));
        let n = b * t;
        let (d, vocab) = (u(cfg.d_model), u(cfg.vocab_size));
        let (heads, kv_heads) = (u(cfg.n_heads), u(cfg.kv_heads()));
        let q_dim = heads * u(cfg.head_dim());
        let kv_dim = kv_heads * u(cfg.head_dim());
        let layers = u(cfg.n_layers);
        let moe_layers = u(cfg.n_moe_layers());
        let dense_layers = layers - moe_layers;
        let moe = &cfg.moe;
        let (experts, k, ff) = (u(moe.n_experts), u(moe.top_k), u(moe.expert_ff));
        // (token, expert) assignments: dropless is the upper bound a capacity factor only lowers.
        let assignments = n * k;
        let shared_ff = u(moe.n_shared_experts) * ff;
        let dense_ff = u(cfg.ffn_hidden.unwrap_or(0));
        let stream = n * d * c;

        let qk_norm_out = if cfg.qk_norm {
            n * (q_dim + kv_dim) * c
        } else {
            0
        };
        // Projections, their head-split copies, rotated q and k, the scaled q and, with grouped
        // query heads, k and v expanded to every query head (the reshape copies).
        let qkv_per_layer = 2 * n * (q_dim + 2 * kv_dim) * c
            + n * (q_dim + kv_dim) * c
            + n * q_dim * c
            + if heads != kv_heads {
                2 * n * q_dim * c
            } else {
                0
            };
        let shared_per_layer = if shared_ff > 0 {
            4 * n * shared_ff * c + 2 * stream
        } else {
            0
        };
        let terms = [
            // The looked-up rows in the master dtype, and their compute-dtype cast.
            ("embedding", n * d * F32 + if mixed { stream } else { 0 }),
            // attn_norm and ffn_norm outputs per block, plus the q/k norms' outputs.
            ("norms", layers * (2 * stream + qk_norm_out)),
            ("qkv", layers * qkv_per_layer),
            // Our attention materialises the T x T scores and probabilities of every head.
            ("attention_scores", layers * 2 * b * heads * t * t * c),
            // probs @ v, the heads merged back (a copy) and o_proj.
            ("attention_output", layers * (2 * n * q_dim * c + stream)),
            // The two residual sums per block.
            ("residual", layers * 2 * stream),
            // Router in f32: its input cast, logits, exp for the z-loss, probabilities, and
            // the chosen gates (gathered and renormalised).
            (
                "router",
                moe_layers
                    * ((if mixed { n * d * F32 } else { 0 })
                        + 3 * n * experts * F32
                        + 2 * n * k * F32),
            ),
            // The token rows permuted into expert order, one per assignment.
            ("expert_inputs", moe_layers * assignments * d * c),
            // gate, up, silu(gate) and the SwiGLU product for the k chosen experts.
            ("expert_hidden", moe_layers * 4 * assignments * ff * c),
            // Expert outputs, gated, then scattered back onto tokens (zeros + index_add).
            (
                "expert_outputs",
                moe_layers * (2 * assignments * d * c + 2 * stream),
            ),
            // Always-active experts: a SwiGLU of width n_shared x expert_ff, and its sum.
            ("shared_experts", moe_layers * shared_per_layer),
            // Dense blocks' SwiGLU: gate, up, silu, product, and the output.
            ("dense_ffn", dense_layers * (4 * n * dense_ff * c + stream)),
            ("final_norm", stream),
            // LM head output, and its f32 cast under mixed precision (losses run in f32).
            (
                "logits",
                n * vocab * F32 + if mixed { n * vocab * c } else { 0 },
            ),
            // The fused cross-entropy's backward materialises softmax(logits) - onehot.
            ("cross_entropy", n * vocab * F32),
        ];
        let activation_terms: Vec<MemoryTerm> = terms
            .into_iter()
            .map(|(name, bytes)| MemoryTerm { name, bytes })
            .collect();
        Self {
            micro_batch: b,
            seq_len: t,
            compute_dtype: compute_dtype.as_str(),
            weights_bytes: params * F32,
            gradients_bytes: params * F32,
            optimizer_bytes: 2 * params * F32,
            compute_weights_bytes: if mixed { params * c } else { 0 },
            tables_bytes: 2 * u(cfg.max_seq_len) * (u(cfg.head_dim()) / 2) * (8 + c),
            activations_bytes: activation_terms.iter().map(|term| term.bytes).sum(),
            activation_terms,
        }
    }

    /// Bytes the run needs at its peak: weights, gradients, optimizer state, the compute copy,
    /// the rotary tables and one micro-batch's activations. What the trainer compares with the device's memory.
    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes
            + self.gradients_bytes
            + self.optimizer_bytes
            + self.compute_weights_bytes
            + self.tables_bytes
            + self.activations_bytes
    }

    /// A human-readable table, one line per kind.
    pub fn table(&self) -> String {
        let mut out = format!(
            "memory (micro_batch {}, seq_len {}, compute {}):\n",
            self.micro_batch, self.seq_len, self.compute_dtype
        );
        for (name, bytes) in [
            ("weights (f32)", self.weights_bytes),
            ("gradients (f32)", self.gradients_bytes),
            ("optimizer (AdamW)", self.optimizer_bytes),
            ("compute weights", self.compute_weights_bytes),
            ("rotary tables", self.tables_bytes),
            ("activations", self.activations_bytes),
            ("total", self.total_bytes()),
        ] {
            out += &format!("  {name:<18} {:>12}\n", fmt_bytes(bytes));
        }
        out
    }
}

/// JSON carries the total too, so scripts need not re-add the terms.
impl Serialize for MemoryEstimate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("MemoryEstimate", 11)?;
        s.serialize_field("micro_batch", &self.micro_batch)?;
        s.serialize_field("seq_len", &self.seq_len)?;
        s.serialize_field("compute_dtype", self.compute_dtype)?;
        s.serialize_field("weights_bytes", &self.weights_bytes)?;
        s.serialize_field("gradients_bytes", &self.gradients_bytes)?;
        s.serialize_field("optimizer_bytes", &self.optimizer_bytes)?;
        s.serialize_field("compute_weights_bytes", &self.compute_weights_bytes)?;
        s.serialize_field("tables_bytes", &self.tables_bytes)?;
        s.serialize_field("activations_bytes", &self.activations_bytes)?;
        s.serialize_field("activation_terms", &self.activation_terms)?;
        s.serialize_field("total_bytes", &self.total_bytes())?;
        s.end()
    }
}

/// `bytes` in binary units with three significant digits, e.g. `1.50 GiB`, `512 B`.
pub fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if value >= 100.0 => format!("{value:.0} {}", UNITS[unit]),
        _ if value >= 10.0 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.2} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn tiny() -> ModelConfig {
        // configs/tiny.toml's [model].
        toml::from_str(
            r#"
vocab_size = 4096
d_model = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
max_seq_len = 128
qk_norm = true
[moe]
n_experts = 8
top_k = 2
expert_ff = 256
"#,
        )
        .unwrap()
    }

    fn term(estimate: &MemoryEstimate, name: &str) -> u64 {
        estimate
            .activation_terms
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.bytes)
            .unwrap()
    }

    #[test]
    fn state_is_sixteen_bytes_per_parameter_in_f32() {
        let cfg = tiny();
        let params = ModelInfo::new(&cfg, 128).total_params;
        let m = MemoryEstimate::new(&cfg, 8, 128, DType::F32);
        assert_eq!(m.weights_bytes, 4 * params);
        assert_eq!(m.gradients_bytes, 4 * params);
        assert_eq!(m.optimizer_bytes, 8 * params);
        assert_eq!(m.compute_weights_bytes, 0);
        assert_eq!(
            m.total_bytes(),
            16 * params + m.tables_bytes + m.activations_bytes,
            "{}",
            m.table()
        );
    }

    /// The rotary tables grow with max_seq_len alone: an absurd max_seq_len is refused by the
    /// estimate before the tables are built.
    #[test]
    fn rotary_tables_scale_with_max_seq_len() {
        let mut cfg = tiny();
        let small = MemoryEstimate::new(&cfg, 8, 128, DType::F32);
        cfg.max_seq_len = 100_000_000;
        let huge = MemoryEstimate::new(&cfg, 8, 128, DType::F32);
        assert_eq!(small.activations_bytes, huge.activations_bytes);
        let per_position = 2 * (cfg.head_dim() as u64 / 2) * 12;
        assert_eq!(huge.tables_bytes, 100_000_000 * per_position);
        assert!(huge.total_bytes() > 30 << 30, "{}", huge.table());
    }

    #[test]
    fn doubling_the_micro_batch_doubles_activations_only() {
        let cfg = tiny();
        let one = MemoryEstimate::new(&cfg, 4, 128, DType::F32);
        let two = MemoryEstimate::new(&cfg, 8, 128, DType::F32);
        assert_eq!(two.activations_bytes, 2 * one.activations_bytes);
        assert_eq!(two.weights_bytes, one.weights_bytes);
        assert_eq!(two.optimizer_bytes, one.optimizer_bytes);
        assert_eq!(two.total_bytes() - one.total_bytes(), one.activations_bytes);
    }

    #[test]
    fn attention_scores_grow_with_the_square_of_the_sequence() {
        let cfg = tiny();
        let short = MemoryEstimate::new(&cfg, 8, 64, DType::F32);
        let long = MemoryEstimate::new(&cfg, 8, 128, DType::F32);
        assert_eq!(
            term(&long, "attention_scores"),
            4 * term(&short, "attention_scores")
        );
        // 4 layers x (scores + probabilities) x 8 sequences x 4 heads x 128^2 x 4 bytes.
        assert_eq!(
            term(&long, "attention_scores"),
            4 * 2 * 8 * 4 * 128 * 128 * 4
        );
        assert_eq!(
            term(&long, "expert_hidden"),
            2 * term(&short, "expert_hidden")
        );
    }

    #[test]
    fn bf16_adds_the_weight_copy_and_halves_most_activations() {
        let cfg = tiny();
        let params = ModelInfo::new(&cfg, 128).total_params;
        let f32 = MemoryEstimate::new(&cfg, 8, 128, DType::F32);
        let bf16 = MemoryEstimate::new(&cfg, 8, 128, DType::BF16);
        assert_eq!(bf16.compute_weights_bytes, 2 * params);
        assert_eq!(bf16.weights_bytes, f32.weights_bytes);
        assert_eq!(
            2 * term(&bf16, "expert_hidden"),
            term(&f32, "expert_hidden")
        );
        // Losses stay in f32: the cross-entropy does not shrink.
        assert_eq!(term(&bf16, "cross_entropy"), term(&f32, "cross_entropy"));
        assert!(bf16.activations_bytes < f32.activations_bytes);
    }

    #[test]
    fn more_experts_add_weights_but_not_activations() {
        let cfg = tiny();
        let mut wide = cfg.clone();
        wide.moe.n_experts = 64;
        let base = MemoryEstimate::new(&cfg, 8, 128, DType::F32);
        let more = MemoryEstimate::new(&wide, 8, 128, DType::F32);
        assert!(more.weights_bytes > 4 * base.weights_bytes);
        // Only the router's (tokens x experts) terms grow; the experts see k rows per token.
        assert_eq!(term(&more, "expert_hidden"), term(&base, "expert_hidden"));
        assert!(term(&more, "router") > term(&base, "router"));
    }

    #[test]
    fn the_issue_s_wide_model_is_tens_of_gigabytes() {
        // `train --set model.d_model=65536` on tiny: 4 x 65536^2 x ... must not look small.
        let mut cfg = tiny();
        cfg.d_model = 65536;
        let m = MemoryEstimate::new(&cfg, 8, 128, DType::F32);
        assert!(m.total_bytes() > 100 * (1 << 30), "{}", m.table());
    }

    #[test]
    fn bytes_print_in_binary_units() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.50 KiB");
        assert_eq!(fmt_bytes(20 * 1024 * 1024), "20.0 MiB");
        assert_eq!(fmt_bytes(300 << 30), "300 GiB");
    }

    #[test]
    fn json_carries_the_total() {
        let m = MemoryEstimate::new(&tiny(), 8, 128, DType::BF16);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["total_bytes"], m.total_bytes());
        assert_eq!(json["compute_dtype"], "bf16");
        assert!(json["activation_terms"].as_array().unwrap().len() > 10);
    }
}
