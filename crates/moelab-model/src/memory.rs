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

use crate::checked::Count;
use crate::{ModelConfig, ModelError, ModelInfo};

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

/// The activation bytes of one micro-batch of `b` sequences of `t` tokens, by what they hold
/// (`c`: bytes per compute-dtype element; `mixed`: a compute dtype other than f32).
fn activation_terms(
    cfg: &ModelConfig,
    b: Count,
    t: Count,
    c: Count,
    mixed: bool,
) -> [(&'static str, Count); 15] {
    let u = Count::of;
    let zero = Count::ZERO;
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
        zero
    };
    // Projections, their head-split copies, rotated q and k, the scaled q and, with grouped
    // query heads, k and v expanded to every query head (the reshape copies).
    let qkv_per_layer = 2 * n * (q_dim + 2 * kv_dim) * c
        + n * (q_dim + kv_dim) * c
        + n * q_dim * c
        + if cfg.n_heads != cfg.kv_heads() {
            2 * n * q_dim * c
        } else {
            zero
        };
    let shared_per_layer = if moe.n_shared_experts > 0 && moe.expert_ff > 0 {
        4 * n * shared_ff * c + 2 * stream
    } else {
        zero
    };
    [
        // The looked-up rows in the master dtype, and their compute-dtype cast.
        ("embedding", n * d * F32 + if mixed { stream } else { zero }),
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
                * ((if mixed { n * d * F32 } else { zero })
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
            n * vocab * F32 + if mixed { n * vocab * c } else { zero },
        ),
        // The fused cross-entropy's backward materialises softmax(logits) - onehot.
        ("cross_entropy", n * vocab * F32),
    ]
}

/// What `moelab model-info` shows: the parameter and FLOP counts, the memory a training run
/// needs at the run's batch shape and, for a job of several ranks, the per-rank plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Sizing {
    /// Parameters and FLOPs.
    #[serde(flatten)]
    pub info: ModelInfo,
    /// Memory of one process's training run.
    pub memory: MemoryEstimate,
    /// Per-rank memory and per-step communication of a job of several ranks, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelPlan>,
}

impl Sizing {
    /// A human-readable table: the counts, then the memory, then the plan.
    pub fn table(&self) -> String {
        let mut out = self.info.table();
        out += &self.memory.table();
        if let Some(plan) = &self.parallel {
            out += &plan.table();
        }
        out
    }
}

impl MemoryEstimate {
    /// The estimate for training `cfg` on `micro_batch` sequences of `seq_len` tokens with
    /// activations in `compute_dtype` (f32 master weights and AdamW, as the trainer runs); an
    /// error when a byte count does not fit in 64 bits, naming it.
    pub fn new(
        cfg: &ModelConfig,
        micro_batch: usize,
        seq_len: usize,
        compute_dtype: DType,
    ) -> crate::Result<Self> {
        let u = Count::of;
        let zero = Count::ZERO;
        let params = Count::from(ModelInfo::new(cfg, seq_len)?.total_params);
        let c = u(compute_dtype.size_in_bytes());
        let mixed = compute_dtype.size_in_bytes() as u64 != F32;
        let (b, t) = (u(micro_batch), u(seq_len));
        let terms = activation_terms(cfg, b, t, c, mixed);
        let mut activation_terms = Vec::with_capacity(terms.len());
        for (name, bytes) in terms {
            activation_terms.push(MemoryTerm {
                name,
                bytes: bytes.value(&format!("the activation bytes of {name}"))?,
            });
        }
        let activations = terms.iter().map(|(_, bytes)| *bytes).sum::<Count>();
        let weights = params * F32;
        let optimizer = 2 * params * F32;
        let compute_weights = if mixed { params * c } else { zero };
        let tables = 2 * u(cfg.max_seq_len) * (u(cfg.head_dim()) / 2) * (8 + c);
        // The total is checked too, so that total_bytes() cannot overflow.
        (weights + weights + optimizer + compute_weights + tables + activations)
            .value("the total training memory in bytes")?;
        Ok(Self {
            micro_batch: b.value("micro_batch")?,
            seq_len: t.value("seq_len")?,
            compute_dtype: compute_dtype.as_str(),
            weights_bytes: weights.value("the weight bytes")?,
            gradients_bytes: weights.value("the gradient bytes")?,
            optimizer_bytes: optimizer.value("the optimizer bytes")?,
            compute_weights_bytes: compute_weights.value("the compute weight bytes")?,
            tables_bytes: tables.value("the rotary table bytes")?,
            activations_bytes: activations.value("the activation bytes")?,
            activation_terms,
        })
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

/// How a job of several ranks shares the model (`moelab model-info --ranks N
/// --expert-parallel G [--shard-optimizer]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Parallelism {
    /// Ranks in the job (N).
    pub ranks: u64,
    /// Ranks per expert-parallel group (G): each holds E/G experts of every MoE layer.
    pub expert_parallel: u64,
    /// ZeRO-1: AdamW moments sharded over the ranks that hold a parameter.
    pub shard_optimizer: bool,
    /// Micro-batches of one optimizer step over all ranks (`train.global_batch_tokens /
    /// (train.micro_batch x data.seq_len)`); each rank runs its share, and the all-to-alls
    /// run per micro-batch.
    pub micro_batches_per_step: u64,
}

/// Per-rank memory and per-step communication of a job of several ranks, from the config.
///
/// Replicated parameters (everything but the routed experts) live on every rank; the routed
/// experts are split E/G per rank. Gradients follow the weights. AdamW's two f32 moments
/// follow the weights too, or with ZeRO-1 are sharded over the ranks holding each parameter,
/// which makes them total x 8 / N bytes per rank. Activations are one micro-batch's, with the
/// experts' rows assuming balanced routing (a rank receives as many rows as it sends); the
/// all-to-all buffers are the rows the exchange adds to the graph.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParallelPlan {
    /// The layout planned for.
    pub parallelism: Parallelism,
    /// Routed experts each rank holds per MoE layer.
    pub experts_per_rank: u64,
    /// Parameters on every rank (attention, embeddings, norms, routers, dense and shared FFNs).
    pub replicated_params: u64,
    /// Routed-expert parameters on one rank.
    pub expert_params_per_rank: u64,
    /// f32 master weights on one rank.
    pub weights_bytes: u64,
    /// f32 gradients on one rank.
    pub gradients_bytes: u64,
    /// AdamW moments on one rank.
    pub optimizer_bytes: u64,
    /// The compute-dtype weight copy on one rank (zero in f32).
    pub compute_weights_bytes: u64,
    /// The rotary tables, whole on every rank.
    pub tables_bytes: u64,
    /// One micro-batch's activations (as without expert parallelism, balanced routing).
    pub activations_bytes: u64,
    /// The rows the exchange adds to the graph per micro-batch: arrived and returned rows and,
    /// with several local experts, their reordered copies, per MoE layer.
    pub all_to_all_buffer_bytes: u64,
    /// What the received expert rows may add at worst (dropless routing sending every row of
    /// the EP group to this rank's experts): G - 1 times the balanced expert activations.
    pub worst_case_extra_bytes: u64,
    /// Bytes one rank sends to other ranks in all-to-alls per optimizer step (uniform routing:
    /// (G - 1)/G of each exchange leaves the rank; four exchanges per MoE layer per micro-batch,
    /// f32 on the wire, plus the counts of the other ranks' experts).
    pub all_to_all_bytes_per_step: u64,
    /// Bytes one rank sends in the gradient exchange per step (ring all-reduce, or ZeRO-1's
    /// reduce-scatter + all-gather: 2 x 4 B x params x (P - 1)/P over each group of P ranks).
    pub gradient_exchange_bytes_per_step: u64,
}

/// Checked u64 arithmetic for the plan: a config too large for u64 bytes is an error, not a
/// wrapped number.
struct Checked;

impl Checked {
    fn mul(what: &str, values: &[u64]) -> crate::Result<u64> {
        values
            .iter()
            .try_fold(1u64, |acc, &v| acc.checked_mul(v))
            .ok_or_else(|| Self::overflow(what))
    }
    fn add(what: &str, values: &[u64]) -> crate::Result<u64> {
        values
            .iter()
            .try_fold(0u64, |acc, &v| acc.checked_add(v))
            .ok_or_else(|| Self::overflow(what))
    }
    fn overflow(what: &str) -> ModelError {
        ModelError::Config {
            key: "model".into(),
            reason: format!("the memory plan's {what} overflows 64-bit bytes; the model is far too large for any machine"),
        }
    }
}

/// Bytes a ring collective sends per rank for `bytes` of data over `ranks` ranks:
/// 2 x bytes x (ranks - 1) / ranks (reduce-scatter + all-gather, or an all-reduce).
fn ring_bytes(bytes: u64, ranks: u64) -> crate::Result<u64> {
    Ok(Checked::mul("gradient exchange", &[2, bytes, ranks - 1])? / ranks)
}

/// Refuses a layout whose G does not divide N and the expert count, or whose micro-batches do
/// not split evenly over the ranks.
fn check_layout(experts: u64, parallelism: Parallelism) -> crate::Result<()> {
    let Parallelism {
        ranks,
        expert_parallel: g,
        micro_batches_per_step,
        ..
    } = parallelism;
    let bad = |reason: String| ModelError::Config {
        key: "dist.expert_parallel".into(),
        reason,
    };
    if ranks == 0 || g == 0 {
        return Err(bad(format!(
            "--ranks {ranks} and --expert-parallel {g} must be at least 1"
        )));
    }
    if !ranks.is_multiple_of(g) || !experts.is_multiple_of(g) {
        return Err(bad(format!(
            "--expert-parallel {g} must divide --ranks {ranks} and model.moe.n_experts = {experts}"
        )));
    }
    if micro_batches_per_step == 0 || !micro_batches_per_step.is_multiple_of(ranks) {
        return Err(ModelError::Config {
            key: "train.global_batch_tokens".into(),
            reason: format!(
                "its {micro_batches_per_step} micro-batches per step do not split evenly over --ranks {ranks}; make it a multiple of {ranks} x train.micro_batch x data.seq_len"
            ),
        });
    }
    Ok(())
}

/// Under expert parallelism G > 1: the all-to-all buffers one rank holds, the worst case's
/// extra bytes (every token routed to one rank's experts) and the bytes exchanged per step.
fn all_to_all(
    cfg: &ModelConfig,
    memory: &MemoryEstimate,
    g: u64,
    micro_batches_per_rank: u64,
    c: u64,
) -> crate::Result<(u64, u64, u64)> {
    let experts = cfg.moe.n_experts as u64;
    let moe_layers = cfg.n_moe_layers() as u64;
    let rows = Checked::mul(
        "expert rows",
        &[memory.micro_batch, memory.seq_len, cfg.moe.top_k as u64],
    )?;
    let row_bytes = Checked::mul("expert rows", &[rows, cfg.d_model as u64, c])?;
    let copies = if experts / g > 1 { 4 } else { 2 };
    let buffers = Checked::mul("all-to-all buffers", &[moe_layers, copies, row_bytes])?;
    let expert_terms: u64 = memory
        .activation_terms
        .iter()
        .filter(|t| t.name.starts_with("expert_"))
        .map(|t| t.bytes)
        .sum();
    let worst = Checked::mul(
        "worst case",
        &[g - 1, Checked::add("worst case", &[expert_terms, buffers])?],
    )?;
    let wire = Checked::mul(
        "all-to-all volume",
        &[
            rows,
            cfg.d_model as u64,
            F32,
            4,
            moe_layers,
            micro_batches_per_rank,
            g - 1,
        ],
    )? / g;
    // Each rank tells each other rank of its EP group how many rows go to each of that
    // rank's E/G experts: (G - 1) x E/G integers of 8 bytes leave it (its own block does not).
    let counts = Checked::mul(
        "count exchange",
        &[moe_layers, micro_batches_per_rank, experts / g, g - 1, 8],
    )?;
    Ok((
        buffers,
        worst,
        Checked::add("all-to-all volume", &[wire, counts])?,
    ))
}

impl ParallelPlan {
    /// The plan for `cfg` (whose counts are `info` and one-rank memory `memory`) under
    /// `parallelism`; refuses a layout whose G does not divide N and the expert count.
    pub fn new(
        cfg: &ModelConfig,
        info: &ModelInfo,
        memory: &MemoryEstimate,
        parallelism: Parallelism,
    ) -> crate::Result<Self> {
        let Parallelism {
            ranks,
            expert_parallel: g,
            shard_optimizer,
            micro_batches_per_step,
        } = parallelism;
        check_layout(cfg.moe.n_experts as u64, parallelism)?;
        let experts = cfg.moe.n_experts as u64;
        let micro_batches_per_rank = micro_batches_per_step / ranks;
        let routed = info
            .components
            .iter()
            .find(|c| c.name == "routed_experts")
            .map_or(0, |c| c.params);
        let replicated = info.total_params - routed;
        let expert_params = routed / g;
        let params = Checked::add("parameters per rank", &[replicated, expert_params])?;
        let weights = Checked::mul("weights", &[params, F32])?;
        let optimizer = if shard_optimizer {
            // Replicated moments over all N ranks, each expert's over its N/G replicas.
            let per_rank = replicated.div_ceil(ranks) + expert_params.div_ceil(ranks / g);
            Checked::mul("optimizer state", &[2, F32, per_rank])?
        } else {
            Checked::mul("optimizer state", &[2, F32, params])?
        };
        let c = match memory.compute_dtype {
            "bf16" | "f16" => 2,
            "f64" => 8,
            _ => 4,
        };
        // The compute copy exists only under mixed precision, as in the one-rank estimate.
        let compute = if memory.compute_weights_bytes > 0 {
            Checked::mul("compute weights", &[params, c])?
        } else {
            0
        };
        let (buffers, worst, volume) = if g > 1 {
            all_to_all(cfg, memory, g, micro_batches_per_rank, c)?
        } else {
            (0, 0, 0)
        };
        let gradients = Checked::add(
            "gradient exchange",
            &[
                ring_bytes(
                    Checked::mul("gradient exchange", &[replicated, F32])?,
                    ranks,
                )?,
                ring_bytes(
                    Checked::mul("gradient exchange", &[expert_params, F32])?,
                    ranks / g,
                )?,
            ],
        )?;
        Ok(Self {
            parallelism,
            experts_per_rank: experts / g,
            replicated_params: replicated,
            expert_params_per_rank: expert_params,
            weights_bytes: weights,
            gradients_bytes: weights,
            optimizer_bytes: optimizer,
            compute_weights_bytes: compute,
            tables_bytes: memory.tables_bytes,
            activations_bytes: memory.activations_bytes,
            all_to_all_buffer_bytes: buffers,
            worst_case_extra_bytes: worst,
            all_to_all_bytes_per_step: volume,
            gradient_exchange_bytes_per_step: gradients,
        })
    }

    /// Bytes one rank needs at its peak under balanced routing.
    pub fn total_bytes(&self) -> u64 {
        [
            self.weights_bytes,
            self.gradients_bytes,
            self.optimizer_bytes,
            self.compute_weights_bytes,
            self.tables_bytes,
            self.activations_bytes,
            self.all_to_all_buffer_bytes,
        ]
        .iter()
        .fold(0u64, |acc, &b| acc.saturating_add(b))
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let p = &self.parallelism;
        let mut out = format!(
            "per rank ({} ranks, expert_parallel {}, {} experts per rank per MoE layer, optimizer {}, {} micro-batches per rank per step):\n",
            p.ranks,
            p.expert_parallel,
            self.experts_per_rank,
            if p.shard_optimizer { "sharded (ZeRO-1)" } else { "replicated" },
            p.micro_batches_per_step / p.ranks
        );
        out += &format!(
            "  {:<22} {:>12} ({} replicated + {} expert)\n",
            "parameters",
            self.replicated_params + self.expert_params_per_rank,
            self.replicated_params,
            self.expert_params_per_rank
        );
        for (name, bytes) in [
            ("weights (f32)", self.weights_bytes),
            ("gradients (f32)", self.gradients_bytes),
            ("optimizer (AdamW)", self.optimizer_bytes),
            ("compute weights", self.compute_weights_bytes),
            ("rotary tables", self.tables_bytes),
            ("activations", self.activations_bytes),
            ("all-to-all buffers", self.all_to_all_buffer_bytes),
            ("total", self.total_bytes()),
            ("worst-case routing +", self.worst_case_extra_bytes),
        ] {
            out += &format!("  {name:<22} {:>12}\n", fmt_bytes(bytes));
        }
        out += &format!(
            "per step, sent by one rank:\n  {:<22} {:>12}\n  {:<22} {:>12}\n",
            "all-to-all",
            fmt_bytes(self.all_to_all_bytes_per_step),
            "gradient exchange",
            fmt_bytes(self.gradient_exchange_bytes_per_step)
        );
        out
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
        let params = ModelInfo::new(&cfg, 128).unwrap().total_params;
        let m = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
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
        let small = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
        cfg.max_seq_len = 100_000_000;
        let huge = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
        assert_eq!(small.activations_bytes, huge.activations_bytes);
        let per_position = 2 * (cfg.head_dim() as u64 / 2) * 12;
        assert_eq!(huge.tables_bytes, 100_000_000 * per_position);
        assert!(huge.total_bytes() > 30 << 30, "{}", huge.table());
    }

    #[test]
    fn doubling_the_micro_batch_doubles_activations_only() {
        let cfg = tiny();
        let one = MemoryEstimate::new(&cfg, 4, 128, DType::F32).unwrap();
        let two = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
        assert_eq!(two.activations_bytes, 2 * one.activations_bytes);
        assert_eq!(two.weights_bytes, one.weights_bytes);
        assert_eq!(two.optimizer_bytes, one.optimizer_bytes);
        assert_eq!(two.total_bytes() - one.total_bytes(), one.activations_bytes);
    }

    #[test]
    fn attention_scores_grow_with_the_square_of_the_sequence() {
        let cfg = tiny();
        let short = MemoryEstimate::new(&cfg, 8, 64, DType::F32).unwrap();
        let long = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
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
        let params = ModelInfo::new(&cfg, 128).unwrap().total_params;
        let f32 = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
        let bf16 = MemoryEstimate::new(&cfg, 8, 128, DType::BF16).unwrap();
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
        let base = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
        let more = MemoryEstimate::new(&wide, 8, 128, DType::F32).unwrap();
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
        let m = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
        assert!(m.total_bytes() > 100 * (1 << 30), "{}", m.table());
    }

    fn plan(ranks: u64, g: u64, shard: bool, micro_batches: u64) -> crate::Result<ParallelPlan> {
        let cfg = tiny();
        let info = ModelInfo::new(&cfg, 128).unwrap();
        let memory = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
        ParallelPlan::new(
            &cfg,
            &info,
            &memory,
            Parallelism {
                ranks,
                expert_parallel: g,
                shard_optimizer: shard,
                micro_batches_per_step: micro_batches * ranks,
            },
        )
    }

    #[test]
    fn one_rank_plan_is_the_one_rank_estimate() {
        let cfg = tiny();
        let one = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
        let p = plan(1, 1, false, 1).unwrap();
        assert_eq!(p.weights_bytes, one.weights_bytes);
        assert_eq!(p.optimizer_bytes, one.optimizer_bytes);
        assert_eq!(p.total_bytes(), one.total_bytes());
        assert_eq!(
            (
                p.all_to_all_bytes_per_step,
                p.gradient_exchange_bytes_per_step
            ),
            (0, 0)
        );
    }

    #[test]
    fn expert_parallel_halves_the_experts_state_per_rank() {
        let cfg = tiny();
        let info = ModelInfo::new(&cfg, 128).unwrap();
        // tiny: 4 MoE layers x 8 experts x 3 x 128 x 256.
        let routed = 4 * 8 * 3 * 128 * 256;
        let replicated = info.total_params - routed;
        let p = plan(2, 2, false, 1).unwrap();
        assert_eq!(p.expert_params_per_rank, routed / 2);
        assert_eq!(p.replicated_params, replicated);
        assert_eq!(p.weights_bytes, 4 * (replicated + routed / 2));
        assert_eq!(p.optimizer_bytes, 8 * (replicated + routed / 2));
        assert_eq!(p.experts_per_rank, 4);
        // ZeRO-1 on 2 ranks: replicated moments halve; each expert has one replica (N/G = 1).
        let z = plan(2, 2, true, 1).unwrap();
        assert_eq!(z.optimizer_bytes, 8 * (replicated / 2 + routed / 2));
        // 4 ranks, EP 2 x DP 2, ZeRO-1: every parameter's moments over 4 ranks overall.
        let z4 = plan(4, 2, true, 1).unwrap();
        assert_eq!(z4.optimizer_bytes, 8 * (replicated / 4 + routed / 4));
        // Buffers: 4 layers x 4 copies (2 local experts or more) x 8 x 128 x 2 rows x 128 x 4 B.
        assert_eq!(p.all_to_all_buffer_bytes, 4 * 4 * 8 * 128 * 2 * 128 * 4);
        assert!(p.worst_case_extra_bytes > 0);
    }

    #[test]
    fn all_to_all_volume_is_counted_by_hand() {
        // Rows 8 x 128 x 2 = 2048 of d = 128, f32 on the wire, 4 exchanges, 4 MoE layers,
        // 3 micro-batches, half leaving the rank (G = 2), plus the 4 counts of the other
        // rank's experts x 8 B per layer and micro-batch.
        let p = plan(2, 2, false, 3).unwrap();
        let wire = 2048 * 128 * 4 * 4 * 4 * 3 / 2;
        assert_eq!(p.all_to_all_bytes_per_step, wire + 4 * 3 * 4 * 8);
        // Gradients: replicated params over 2 ranks, experts over 1 (nothing to send).
        let info = ModelInfo::new(&tiny(), 128).unwrap();
        let replicated = info.total_params - 4 * 8 * 3 * 128 * 256;
        assert_eq!(p.gradient_exchange_bytes_per_step, 2 * replicated * 4 / 2);
        assert!(p.table().contains("all-to-all"), "{}", p.table());
    }

    #[test]
    fn a_layout_that_does_not_divide_is_refused_naming_the_numbers() {
        let err = plan(4, 3, false, 1).unwrap_err().to_string();
        assert!(
            err.contains("--expert-parallel 3") && err.contains("--ranks 4"),
            "{err}"
        );
        let err = plan(6, 3, false, 1).unwrap_err().to_string();
        assert!(err.contains("n_experts = 8"), "{err}");
        assert!(plan(0, 1, false, 1).is_err());
        let cfg = tiny();
        let info = ModelInfo::new(&cfg, 128).unwrap();
        let memory = MemoryEstimate::new(&cfg, 8, 128, DType::F32).unwrap();
        let uneven = Parallelism {
            ranks: 4,
            expert_parallel: 2,
            shard_optimizer: false,
            micro_batches_per_step: 6,
        };
        let err = ParallelPlan::new(&cfg, &info, &memory, uneven)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("6 micro-batches") && err.contains("--ranks 4"),
            "{err}"
        );
    }

    #[test]
    fn plan_arithmetic_is_checked() {
        assert!(Checked::mul("x", &[u64::MAX, 2]).is_err());
        assert!(Checked::add("x", &[u64::MAX, 1]).is_err());
        assert_eq!(Checked::mul("x", &[3, 4]).unwrap(), 12);
        assert_eq!(ring_bytes(100, 4).unwrap(), 150);
        assert_eq!(ring_bytes(100, 1).unwrap(), 0);
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
        let m = MemoryEstimate::new(&tiny(), 8, 128, DType::BF16).unwrap();
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["total_bytes"], m.total_bytes());
        assert_eq!(json["compute_dtype"], "bf16");
        assert!(json["activation_terms"].as_array().unwrap().len() > 10);
    }

    #[test]
    fn sizing_adds_memory_as_an_object_and_a_table_section() {
        let cfg = tiny();
        let info = ModelInfo::new(&cfg, 8).unwrap();
        let memory = MemoryEstimate::new(&cfg, 2, 8, DType::F32).unwrap();
        let total = memory.total_bytes();
        let sizing = Sizing {
            info: info.clone(),
            memory,
            parallel: None,
        };
        let json = serde_json::to_value(&sizing).unwrap();
        assert_eq!(json["memory"]["total_bytes"], total);
        assert_eq!(json["total_params"], info.total_params);
        assert!(json.get("parallel").is_none());
        assert!(sizing.table().starts_with(&info.table()));
        assert!(sizing.table().contains("activations"), "{}", sizing.table());
    }
}
