//! Causal self-attention with rotary embeddings, grouped-query heads and optional QK-norm.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{Linear, RmsNorm};
use crate::ModelConfig;

/// One attention sub-layer: projections `q/k/v/o_proj`, optional `q_norm`/`k_norm`.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// OLMoE-style QK-norm: over the whole query (and key) projection, before the heads split.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Builds the sub-layer from `[model]`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let head_dim = cfg.head_dim();
        let (q_dim, kv_dim) = (cfg.n_heads * head_dim, cfg.kv_heads() * head_dim);
        let qk_norm = if cfg.qk_norm {
            Some((
                RmsNorm::new(q_dim, cfg.norm_eps, vb.pp("q_norm"))?,
                RmsNorm::new(kv_dim, cfg.norm_eps, vb.pp("k_norm"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            q_proj: Linear::new(cfg.d_model, q_dim, vb.pp("q_proj"))?,
            k_proj: Linear::new(cfg.d_model, kv_dim, vb.pp("k_proj"))?,
            v_proj: Linear::new(cfg.d_model, kv_dim, vb.pp("v_proj"))?,
            o_proj: Linear::new(q_dim, cfg.d_model, vb.pp("o_proj"))?,
            qk_norm,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.kv_heads(),
            head_dim,
        })
    }

    /// `x`: (batch * seq, d_model), `batch` sequences of equal length, row-major; `cos`/`sin`:
    /// rotary tables (seq, head_dim / 2). Returns (batch * seq, d_model).
    pub fn forward(&self, x: &Tensor, batch: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (tokens, _) = x.dims2()?;
        if batch == 0 || tokens % batch != 0 {
            candle_core::bail!("attention: {tokens} tokens do not split into {batch} sequences");
        }
        let seq = tokens / batch;
        let mut q = self.q_proj.forward(x)?;
        let mut k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let heads = |t: Tensor, n: usize| {
            t.reshape((batch, seq, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = moelab_kernels::rope(&heads(q, self.n_heads)?, cos, sin)?;
        let k = moelab_kernels::rope(&heads(k, self.n_kv_heads)?, cos, sin)?;
        let v = heads(v, self.n_kv_heads)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = moelab_kernels::flash_attention::flash_attention(&q, &k, &v, scale)?;
        let y = y
            .transpose(1, 2)?
            .reshape((tokens, self.n_heads * self.head_dim))?;
        self.o_proj.forward(&y)
    }
}
