//! The decoder-only MoE transformer, top to bottom.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{Embedding, Init, VarBuilder, VarMap};

use crate::attention::Attention;
use crate::layers::{Linear, RmsNorm, SwiGlu};
use crate::moe::{ExpertBackend, LayerRouting, MoeFfn, RoutingNoise};
use crate::{init, ModelConfig, ModelError};

/// Options of one forward pass that are not part of the model.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Training step, for the stochastic routing warm-up; `None` routes with learned logits only
    /// (evaluation, tracing).
    pub step: Option<u64>,
    /// Seed of the warm-up's random logits (the run seed).
    pub seed: u64,
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct Output {
    /// (batch, seq, vocab) next-token logits, when no targets were given. With targets the head
    /// and the loss are one op ([`moelab_kernels::linear_cross_entropy`]) and no logits tensor
    /// is made.
    pub logits: Option<Tensor>,
    /// (batch, seq) cross-entropy per position, when targets were given.
    pub token_losses: Option<Tensor>,
    /// Mean LM cross-entropy, when targets were given.
    pub lm_loss: Option<Tensor>,
    /// One record per MoE layer, in layer order, each with its own (unweighted) balance and
    /// z-loss. The model never sums the losses into a training objective: the train crate's
    /// `loss.rs` does, for every balance scope.
    pub routing: Vec<LayerRouting>,
}

impl Output {
    /// The logits of a forward pass run without targets.
    pub fn logits(&self) -> std::result::Result<&Tensor, ModelError> {
        self.logits.as_ref().ok_or_else(|| {
            ModelError::Input("the logits are not kept by a forward pass with targets".into())
        })
    }
}

/// A block's feed-forward: dense SwiGLU or mixture of experts.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// Dense SwiGLU of width `ffn_hidden`.
    Dense(SwiGlu),
    /// Routed experts (and optional shared experts).
    Moe(MoeFfn),
}

/// A pre-norm transformer block: `h += attn(norm(h)); h += ffn(norm(h))`.
#[derive(Debug, Clone)]
pub struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    ffn: Ffn,
    layer: usize,
}

impl Block {
    /// Builds block `layer` under `{vb}`.
    pub fn new(cfg: &ModelConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_local_experts(cfg, layer, vb, cfg.moe.n_experts)
    }

    /// [`Block::new`] whose MoE layer holds `local` of its routed experts.
    pub fn with_local_experts(
        cfg: &ModelConfig,
        layer: usize,
        vb: VarBuilder,
        local: usize,
    ) -> Result<Self> {
        let ffn = if cfg.is_moe_layer(layer) {
            Ffn::Moe(MoeFfn::with_local_experts(cfg, vb.pp("moe"), local)?)
        } else {
            let hidden = cfg.ffn_hidden.unwrap_or(0);
            Ffn::Dense(SwiGlu::new(cfg.d_model, hidden, vb.pp("mlp"))?)
        };
        Ok(Self {
            attn_norm: RmsNorm::new(cfg.d_model, cfg.norm_eps, vb.pp("attn_norm"))?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            ffn_norm: RmsNorm::new(cfg.d_model, cfg.norm_eps, vb.pp("ffn_norm"))?,
            ffn,
            layer,
        })
    }

    /// The block's feed-forward.
    pub fn ffn(&self) -> &Ffn {
        &self.ffn
    }

    /// `h`: (batch * seq, d_model), `batch` sequences of equal length, row-major (the residual
    /// stream stays 2-D so that no reshape sits between the matmuls and their gradients). Returns
    /// the new residual stream and, for a MoE block, its routing record.
    pub fn forward(
        &self,
        h: &Tensor,
        batch: usize,
        cos: &Tensor,
        sin: &Tensor,
        noise: Option<RoutingNoise>,
    ) -> Result<(Tensor, Option<LayerRouting>)> {
        let h = (h + self
            .attn
            .forward(&self.attn_norm.forward(h)?, batch, cos, sin)?)?;
        let x = self.ffn_norm.forward(&h)?;
        let (y, routing) = match &self.ffn {
            Ffn::Dense(mlp) => (mlp.forward(&x)?, None),
            Ffn::Moe(moe) => {
                let (y, routing) = moe.forward(&x, batch, self.layer, noise)?;
                (y, Some(routing))
            }
        };
        Ok(((h + y)?, routing))
    }
}

/// The whole model: embedding, blocks, final norm, LM head.
#[derive(Debug, Clone)]
pub struct MoeTransformer {
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    lm_head: Linear,
    /// Rotary tables for positions 0..max_seq_len, (max_seq_len, head_dim / 2).
    rope_cos: Tensor,
    rope_sin: Tensor,
    /// Dtype of activations and matmuls; parameters stay in their own (master) dtype.
    compute_dtype: DType,
    cfg: ModelConfig,
}

impl MoeTransformer {
    /// Builds the model from a validated config; parameters come from `vb` (a fresh VarMap or a
    /// checkpoint).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> std::result::Result<Self, ModelError> {
        Self::with_local_experts(cfg, vb, cfg.moe.n_experts)
    }

    /// [`MoeTransformer::new`] whose MoE layers hold `local` of their routed experts each
    /// (expert parallelism; which ones is the caller's layout, see
    /// [`MoeTransformer::init_sharded`]).
    pub fn with_local_experts(
        cfg: &ModelConfig,
        vb: VarBuilder,
        local: usize,
    ) -> std::result::Result<Self, ModelError> {
        cfg.validate()?;
        // A dense model has no experts to hold (0 of 0).
        if local > cfg.moe.n_experts || (local == 0 && cfg.moe.n_experts > 0) {
            return Err(ModelError::Input(format!(
                "{local} local experts of model.moe.n_experts = {}",
                cfg.moe.n_experts
            )));
        }
        let embed_weight = vb.get_with_hints(
            (cfg.vocab_size, cfg.d_model),
            "embed.weight",
            Init::Const(0.0),
        )?;
        let lm_head = if cfg.tie_embeddings {
            Linear::from_weight(embed_weight.clone())
        } else {
            Linear::new(cfg.d_model, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let blocks = (0..cfg.n_layers)
            .map(|layer| {
                Block::with_local_experts(cfg, layer, vb.pp(format!("blocks.{layer}")), local)
            })
            .collect::<Result<Vec<_>>>()?;
        let compute_dtype = vb.dtype();
        let (rope_cos, rope_sin) = moelab_kernels::rope_tables(
            cfg.max_seq_len,
            cfg.head_dim(),
            cfg.rope_theta,
            vb.device(),
            vb.dtype(),
        )?;
        Ok(Self {
            embed: Embedding::new(embed_weight, cfg.d_model),
            blocks,
            final_norm: RmsNorm::new(cfg.d_model, cfg.norm_eps, vb.pp("final_norm"))?,
            lm_head,
            rope_cos,
            rope_sin,
            compute_dtype,
            cfg: cfg.clone(),
        })
    }

    /// Mixed precision: activations and matmuls in `dtype` (bf16 or f16) while the parameters
    /// stay in their master dtype; each weight is cast on use, so its gradient arrives in the
    /// master dtype. The router, the logits and the losses stay in at least f32.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// The dtype activations are computed in.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// A freshly initialised model and the VarMap that owns its parameters, seeded by `seed`.
    pub fn init(
        cfg: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<(Self, VarMap), ModelError> {
        let varmap = VarMap::new();
        let model = Self::new(cfg, VarBuilder::from_varmap(&varmap, dtype, device))?;
        init::initialize(&varmap, seed, cfg.init_std)?;
        Ok((model, varmap))
    }

    /// A freshly initialised model holding only routed experts `experts` of every MoE layer,
    /// with exactly the values those experts have in [`MoeTransformer::init`]'s model of the
    /// same seed (so an expert-parallel run starts where a one-process run does).
    pub fn init_sharded(
        cfg: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
        experts: Range<usize>,
    ) -> std::result::Result<(Self, VarMap), ModelError> {
        if experts.end > cfg.moe.n_experts || experts.is_empty() {
            return Err(ModelError::Input(format!(
                "experts {experts:?} of model.moe.n_experts = {}",
                cfg.moe.n_experts
            )));
        }
        let varmap = VarMap::new();
        let model = Self::with_local_experts(
            cfg,
            VarBuilder::from_varmap(&varmap, dtype, device),
            experts.len(),
        )?;
        init::initialize_sharded(&varmap, seed, cfg.init_std, cfg.moe.n_experts, experts)?;
        Ok((model, varmap))
    }

    /// Runs every MoE layer's routed experts through `backend` (expert parallelism).
    pub fn with_expert_backend(mut self, backend: Arc<dyn ExpertBackend>) -> Self {
        for block in &mut self.blocks {
            if let Ffn::Moe(moe) = &mut block.ffn {
                moe.set_expert_backend(backend.clone());
            }
        }
        self
    }

    /// Whether the routed experts run through an [`ExpertBackend`] (then every process of the
    /// expert-parallel group must run the same forward and backward passes in step).
    pub fn experts_sharded(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| matches!(&b.ffn, Ffn::Moe(moe) if moe.has_expert_backend()))
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The blocks, in order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The auxiliary-loss-free selection biases, by parameter-style name; these are state, not
    /// trainable parameters, and are saved with checkpoints.
    pub fn expert_biases(&self) -> Vec<(String, Var)> {
        self.blocks
            .iter()
            .filter_map(|block| match &block.ffn {
                Ffn::Moe(moe) => moe.router().expert_bias().map(|bias| {
                    (
                        format!("blocks.{}.moe.router.expert_bias", block.layer),
                        bias.clone(),
                    )
                }),
                Ffn::Dense(_) => None,
            })
            .collect()
    }

    /// Runs the model on `tokens` (batch, seq) u32; with `targets` (batch, seq) u32 it also
    /// returns the losses.
    pub fn forward(
        &self,
        tokens: &Tensor,
        targets: Option<&Tensor>,
        options: ForwardOptions,
    ) -> std::result::Result<Output, ModelError> {
        let (batch, seq) = tokens.dims2()?;
        if seq > self.cfg.max_seq_len {
            return Err(ModelError::Input(format!(
                "sequence length {seq} exceeds model.max_seq_len = {}",
                self.cfg.max_seq_len
            )));
        }
        let cos = self
            .rope_cos
            .narrow(0, 0, seq)?
            .to_dtype(self.compute_dtype)?;
        let sin = self
            .rope_sin
            .narrow(0, 0, seq)?
            .to_dtype(self.compute_dtype)?;

        let mut h = self
            .embed_tokens(&tokens.flatten_all()?)?
            .to_dtype(self.compute_dtype)?;
        let mut routing = Vec::new();
        for block in &self.blocks {
            let noise = self.routing_noise(block.layer, options);
            let (next, record) = block.forward(&h, batch, &cos, &sin, noise)?;
            h = next;
            routing.extend(record);
        }
        let h = self.final_norm.forward(&h)?;
        // Logits (and so the cross-entropy) in the master dtype, as the peers do.
        let master = self.embed.embeddings().dtype();

        let (logits, token_losses, lm_loss) = match targets {
            Some(targets) => {
                if targets.dims() != tokens.dims() {
                    return Err(ModelError::Input(format!(
                        "targets have shape {:?}, tokens {:?}",
                        targets.dims(),
                        tokens.dims()
                    )));
                }
                let token_losses = moelab_kernels::linear_cross_entropy(
                    &h,
                    &self.lm_head.weight().to_dtype(master)?,
                    &targets.flatten_all()?,
                )?;
                let lm_loss = token_losses.mean_all()?;
                (
                    None,
                    Some(token_losses.reshape((batch, seq))?),
                    Some(lm_loss),
                )
            }
            None => {
                let logits = self.lm_head.forward(&h)?.to_dtype(master)?;
                let logits = logits.reshape((batch, seq, self.cfg.vocab_size))?;
                (Some(logits), None, None)
            }
        };
        Ok(Output {
            logits,
            token_losses,
            lm_loss,
            routing,
        })
    }

    fn embed_tokens(&self, tokens: &Tensor) -> std::result::Result<Tensor, ModelError> {
        if tokens.dtype() != DType::U32 {
            return Err(ModelError::Input(format!(
                "tokens must be u32, got {:?}",
                tokens.dtype()
            )));
        }
        let max = tokens.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max} is out of range for model.vocab_size = {}",
                self.cfg.vocab_size
            )));
        }
        Ok(candle_nn::Module::forward(&self.embed, tokens)?)
    }

    /// The warm-up blend for `layer` at this step: alpha = min(step / warmup_steps, 1).
    fn routing_noise(&self, layer: usize, options: ForwardOptions) -> Option<RoutingNoise> {
        let warmup = self.cfg.moe.routing_warmup_steps;
        let step = options.step?;
        if warmup == 0 || step >= warmup {
            return None;
        }
        let seed = options
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(step.wrapping_mul(1_000_003))
            .wrapping_add(layer as u64);
        Some(RoutingNoise {
            alpha: step as f64 / warmup as f64,
            seed,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn config() -> ModelConfig {
        toml::from_str(
            r#"
vocab_size = 64
d_model = 16
n_layers = 2
n_heads = 2
n_kv_heads = 2
max_seq_len = 8
[moe]
n_experts = 4
top_k = 2
expert_ff = 8
"#,
        )
        .unwrap()
    }

    fn values(varmap: &VarMap, name: &str) -> Vec<f32> {
        let data = varmap.data().lock().unwrap();
        data[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// A rank's experts start with exactly the rows the one-process model gives them, and
    /// everything replicated is the same.
    #[test]
    fn sharded_init_holds_the_whole_models_rows_of_its_experts() {
        let cfg = config();
        let dev = Device::Cpu;
        let (_, full) = MoeTransformer::init(&cfg, 7, DType::F32, &dev).unwrap();
        let (model, part) = MoeTransformer::init_sharded(&cfg, 7, DType::F32, &dev, 2..4).unwrap();
        assert!(!model.experts_sharded());
        for (name, rows) in [
            ("blocks.0.moe.experts.gate_proj", 8 * 16),
            ("blocks.1.moe.experts.down_proj", 16 * 8),
        ] {
            let (whole, mine) = (values(&full, name), values(&part, name));
            assert_eq!(mine.len(), 2 * rows, "{name}");
            assert_eq!(mine, whole[2 * rows..4 * rows], "{name}");
        }
        let name = "blocks.0.moe.router.weight";
        assert_eq!(values(&full, name), values(&part, name));
        assert!(MoeTransformer::init_sharded(&cfg, 7, DType::F32, &dev, 3..5).is_err());
    }
}
