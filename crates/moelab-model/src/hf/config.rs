//! The typed `config.json` of `OlmoeForCausalLM` and `MixtralForCausalLM`, and the exact
//! mapping between it and `[model]`.

use serde::{Deserialize, Serialize};

use super::{hf_err, HfArch};
use crate::{ModelConfig, ModelError, MoeConfig, RouterKind};

/// Token ids written into config.json (the tokenizer files are the train crate's).
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    /// The end-of-document token id (also used as padding).
    pub eos_id: Option<u32>,
}

/// `rope_parameters`, the transformers >= 4.56 spelling of the RoPE settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// `default` is plain RoPE; anything else (linear, yarn, ...) rescales positions.
    #[serde(default)]
    pub rope_type: Option<String>,
    /// The base frequency.
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// `rope_scaling`, the older spelling of a non-default RoPE; read only, to refuse it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// The scaling kind (current spelling).
    #[serde(default)]
    pub rope_type: Option<String>,
    /// The scaling kind (oldest spelling, `type`).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// An `OlmoeForCausalLM` or `MixtralForCausalLM` config.json: every key moelab writes and every
/// key it reads on import (other keys are ignored). The two architectures share all keys but
/// the few marked OLMoE or Mixtral, which are `None` (absent) for the other one.
///
/// Keys marked "written only" tell `transformers` how to run the model and are not read back:
/// they do not change the function moelab computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfConfig {
    /// The model class, e.g. `["OlmoeForCausalLM"]`.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// `olmoe` or `mixtral`; names the architecture when `architectures` is absent.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Rows of the embedding and the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream (`model.d_model`).
    pub hidden_size: usize,
    /// Hidden width of each expert (`model.moe.expert_ff`).
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads; absent means plain multi-head attention.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; must equal hidden_size / num_attention_heads for moelab.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Expert activation; moelab's experts are SiLU-gated.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Longest sequence (`model.max_seq_len`).
    pub max_position_embeddings: usize,
    /// Std of the normal initialisation (`model.init_std`).
    #[serde(default)]
    pub initializer_range: Option<f64>,
    /// Epsilon inside every RMSNorm.
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    /// RoPE base frequency (the pre-4.56 spelling, still written for older readers).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE settings (the 4.56+ spelling).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// A non-default RoPE in the older spelling (read only).
    #[serde(default, skip_serializing)]
    pub rope_scaling: Option<RopeScaling>,
    /// Whether the LM head shares the embedding.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Experts per token (`model.moe.top_k`).
    pub num_experts_per_tok: usize,
    /// Weight of the load-balancing loss.
    #[serde(default)]
    pub router_aux_loss_coef: Option<f64>,
    /// OLMoE: routed experts per block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    /// Mixtral: routed experts per block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_local_experts: Option<usize>,
    /// OLMoE: renormalise the top-k probabilities (Mixtral always does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// OLMoE: biases on the attention projections, which moelab does not have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// OLMoE: clamp of q/k/v; `Some(None)` writes `null` (no clamp), `None` omits the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_qkv: Option<Option<f64>>,
    /// Mixtral: sliding-window attention; `Some(None)` writes `null`, `None` omits the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<Option<usize>>,
    /// Mixtral, written only: router noise during training (moelab has none).
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub router_jitter_noise: Option<f64>,
    /// Written only: whether `forward` also returns router logits.
    #[serde(skip_deserializing)]
    pub output_router_logits: bool,
    /// Written only: attention dropout (moelab has none).
    #[serde(skip_deserializing)]
    pub attention_dropout: f64,
    /// Written only: KV cache during generation.
    #[serde(skip_deserializing)]
    pub use_cache: bool,
    /// Written only: the lab's tokenizers have no beginning-of-text token.
    #[serde(skip_deserializing)]
    pub bos_token_id: Option<u32>,
    /// Written only: end of document.
    #[serde(skip_deserializing)]
    pub eos_token_id: Option<u32>,
    /// Written only: padding (the end-of-document token).
    #[serde(skip_deserializing)]
    pub pad_token_id: Option<u32>,
    /// Written only: the dtype of the stored tensors.
    #[serde(skip_deserializing)]
    pub torch_dtype: String,
}

/// HF's `router_aux_loss_coef` for moelab's `aux_loss_coef`. transformers (OLMoE and Mixtral
/// alike) pools the router logits of all `moe_layers` layers into one balance loss
/// `E * sum_e (tokens routed to e / tokens) * mean prob of e`, whose fractions sum to k;
/// moelab sums one `E * sum_e f_e P_e` per layer with fractions that sum to 1. With one MoE
/// layer HF's loss is exactly k times moelab's, so the coefficient is divided by k. With L
/// layers HF's pooled loss also holds products across layers: no coefficient makes the two
/// equal in general; `aux * L / k` makes them equal (value and per-layer gradient) when every
/// layer routes alike, and [`aux_loss_notes`] says so.
pub fn hf_aux_loss_coef(aux_loss_coef: f64, top_k: usize, moe_layers: usize) -> f64 {
    aux_loss_coef * moe_layers.max(1) as f64 / top_k.max(1) as f64
}

/// moelab's `aux_loss_coef` for HF's `router_aux_loss_coef`: the inverse of
/// [`hf_aux_loss_coef`], exact for one MoE layer.
pub fn aux_loss_coef_from_hf(router_aux_loss_coef: f64, top_k: usize, moe_layers: usize) -> f64 {
    router_aux_loss_coef * top_k.max(1) as f64 / moe_layers.max(1) as f64
}

/// Where moelab's auxiliary losses of `cfg` and what transformers trains with
/// `router_aux_loss_coef` cannot agree, one sentence each (empty when they agree exactly).
pub fn aux_loss_notes(cfg: &ModelConfig) -> Vec<String> {
    let moe = &cfg.moe;
    let layers = cfg.n_layers.saturating_sub(moe.dense_layers);
    let mut notes = Vec::new();
    if moe.aux_loss_coef == 0.0 {
        return notes;
    }
    if layers > 1 {
        notes.push(format!(
            "router_aux_loss_coef = aux_loss_coef x {layers} layers / top-{} = {}: transformers \
             pools the {layers} MoE layers into one balance loss with products across layers, \
             moelab sums one loss per layer; the two agree only when every layer routes alike \
             (exactly with one MoE layer)",
            moe.top_k,
            hf_aux_loss_coef(moe.aux_loss_coef, moe.top_k, layers)
        ));
    }
    if moe.aux_loss_scope != crate::BalanceScope::MicroBatch {
        notes.push(format!(
            "model.moe.aux_loss_scope = {}: transformers balances over each forward's batch \
             (the micro-batch scope); this scope has no Hugging Face equivalent",
            format!("{:?}", moe.aux_loss_scope).to_lowercase()
        ));
    }
    notes
}

fn required(v: Option<usize>, key: &str) -> Result<usize, ModelError> {
    v.ok_or_else(|| hf_err(format!("config.json lacks `{key}`")))
}

impl HfConfig {
    /// config.json for `cfg` as `arch` (which [`super::choose_arch`] should have picked).
    pub fn new(cfg: &ModelConfig, arch: HfArch, tokens: &SpecialTokens) -> Self {
        let moe = &cfg.moe;
        let olmoe = arch == HfArch::Olmoe;
        Self {
            architectures: Some(vec![arch.class_name().to_string()]),
            model_type: Some(arch.model_type().to_string()),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.d_model,
            intermediate_size: moe.expert_ff,
            num_hidden_layers: cfg.n_layers,
            num_attention_heads: cfg.n_heads,
            num_key_value_heads: Some(cfg.kv_heads()),
            head_dim: Some(cfg.head_dim()),
            hidden_act: Some("silu".to_string()),
            max_position_embeddings: cfg.max_seq_len,
            initializer_range: Some(cfg.init_std),
            rms_norm_eps: Some(cfg.norm_eps),
            rope_theta: Some(cfg.rope_theta),
            rope_parameters: Some(RopeParameters {
                rope_type: Some("default".to_string()),
                rope_theta: Some(cfg.rope_theta),
            }),
            rope_scaling: None,
            tie_word_embeddings: Some(cfg.tie_embeddings),
            num_experts_per_tok: moe.top_k,
            router_aux_loss_coef: Some(hf_aux_loss_coef(
                moe.aux_loss_coef,
                moe.top_k,
                cfg.n_layers.saturating_sub(moe.dense_layers),
            )),
            num_experts: olmoe.then_some(moe.n_experts),
            num_local_experts: (!olmoe).then_some(moe.n_experts),
            norm_topk_prob: olmoe.then_some(moe.renormalize),
            attention_bias: olmoe.then_some(false),
            clip_qkv: olmoe.then_some(None),
            sliding_window: (!olmoe).then_some(None),
            router_jitter_noise: (!olmoe).then_some(0.0),
            output_router_logits: false,
            attention_dropout: 0.0,
            use_cache: true,
            bos_token_id: None,
            eos_token_id: tokens.eos_id,
            pad_token_id: tokens.eos_id,
            torch_dtype: "float32".to_string(),
        }
    }

    /// Parses config.json text; unknown keys are ignored, a mistyped or missing one is named.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| hf_err(e.to_string()))
    }

    /// The config.json text as `save_pretrained` writes it: indented, keys sorted, final newline.
    pub fn to_json(&self) -> Result<String, ModelError> {
        let err = |e: serde_json::Error| hf_err(format!("serialising config.json: {e}"));
        // Through a `Value` because its map sorts the keys, as transformers' `sort_keys=True`.
        let value = serde_json::to_value(self).map_err(err)?;
        Ok(serde_json::to_string_pretty(&value).map_err(err)? + "\n")
    }

    /// The architecture named by `architectures[0]`, else by `model_type`.
    pub fn arch(&self) -> Result<HfArch, ModelError> {
        let name = self
            .architectures
            .as_ref()
            .and_then(|a| a.first())
            .or(self.model_type.as_ref())
            .map(String::as_str)
            .unwrap_or("");
        HfArch::from_name(name).ok_or_else(|| {
            hf_err(format!(
                "config.json: architecture `{name}` is not supported (OlmoeForCausalLM, MixtralForCausalLM)"
            ))
        })
    }

    /// Every key whose value no moelab model computes, described for the error message.
    fn unsupported(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let act = self.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" {
            problems.push(format!("hidden_act = {act} (moelab experts use SiLU)"));
        }
        if self.attention_bias == Some(true) {
            problems.push("attention_bias = true".to_string());
        }
        if let Some(c) = self.clip_qkv.flatten() {
            problems.push(format!("clip_qkv = {c}"));
        }
        if let Some(w) = self.sliding_window.flatten() {
            problems.push(format!("sliding_window = {w}"));
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
            .or_else(|| {
                self.rope_scaling
                    .as_ref()
                    .and_then(|r| r.rope_type.as_deref().or(r.kind.as_deref()))
            })
            .unwrap_or("default");
        if rope_type != "default" {
            problems.push(format!("rope_type = {rope_type} (moelab has plain RoPE)"));
        }
        if let Some(hd) = self.head_dim {
            let heads = self.num_attention_heads;
            if heads > 0 && hd * heads != self.hidden_size {
                problems.push(format!(
                    "head_dim = {hd} != hidden_size / num_attention_heads = {}",
                    self.hidden_size / heads
                ));
            }
        }
        problems
    }

    /// moelab's `aux_loss_coef` for `router_aux_loss_coef` (see [`aux_loss_coef_from_hf`]);
    /// `base`'s own value when it converts to the same number, so that an export imported with
    /// its run config gets back the coefficient it was trained with, bit for bit.
    fn aux_loss_coef(&self, base: &MoeConfig) -> f64 {
        let layers = self.num_hidden_layers;
        let Some(hf) = self.router_aux_loss_coef else {
            return base.aux_loss_coef;
        };
        if hf_aux_loss_coef(base.aux_loss_coef, self.num_experts_per_tok, layers) == hf {
            return base.aux_loss_coef;
        }
        aux_loss_coef_from_hf(hf, self.num_experts_per_tok, layers)
    }

    /// The moelab `[model]` that computes what this config describes. Keys HF does not store
    /// (init_std, the balancing-loss scope, z-loss, routing warm-up) come from `base` when given.
    pub fn to_model_config(
        &self,
        base: Option<&ModelConfig>,
    ) -> Result<(HfArch, ModelConfig), ModelError> {
        let arch = self.arch()?;
        let problems = self.unsupported();
        if !problems.is_empty() {
            return Err(hf_err(format!(
                "config.json describes a model moelab cannot represent exactly: {}",
                problems.join("; ")
            )));
        }
        let (n_experts, experts_key) = match arch {
            HfArch::Olmoe => (self.num_experts, "num_experts"),
            HfArch::Mixtral => (self.num_local_experts, "num_local_experts"),
        };
        let rope_theta = self
            .rope_theta
            .or(self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(match arch {
                HfArch::Olmoe => 10_000.0,
                HfArch::Mixtral => 1_000_000.0,
            });
        let defaults = MoeConfig::default();
        let base_moe = base.map(|b| &b.moe).unwrap_or(&defaults);
        let model = ModelConfig {
            vocab_size: self.vocab_size,
            d_model: self.hidden_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads: Some(self.num_key_value_heads.unwrap_or(self.num_attention_heads)),
            max_seq_len: self.max_position_embeddings,
            rope_theta,
            norm_eps: self.rms_norm_eps.unwrap_or(1e-5),
            qk_norm: arch == HfArch::Olmoe,
            tie_embeddings: self.tie_word_embeddings.unwrap_or(false),
            ffn_hidden: None,
            init_std: self
                .initializer_range
                .or(base.map(|b| b.init_std))
                .unwrap_or(0.02),
            moe: MoeConfig {
                n_experts: required(n_experts, experts_key)?,
                top_k: self.num_experts_per_tok,
                expert_ff: self.intermediate_size,
                n_shared_experts: 0,
                dense_layers: 0,
                router: RouterKind::Softmax,
                renormalize: match arch {
                    HfArch::Olmoe => self.norm_topk_prob.unwrap_or(false),
                    HfArch::Mixtral => true,
                },
                capacity_factor: None,
                aux_loss_coef: self.aux_loss_coef(base_moe),
                aux_loss_scope: base_moe.aux_loss_scope,
                z_loss_coef: base_moe.z_loss_coef,
                routing_warmup_steps: base_moe.routing_warmup_steps,
                // HF routers have no selection bias; a zero bias selects the same experts, so
                // the function is the same and the run can go on balancing with it.
                expert_bias: base_moe.expert_bias,
            },
        };
        model.validate()?;
        Ok((arch, model))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::hf::choose_arch;
    use crate::hf::tests::model;

    #[test]
    fn router_aux_loss_coef_is_converted_where_the_losses_agree() {
        // One MoE layer, top-2: HF's pooled loss is 2x moelab's, so its coefficient is half.
        let mut cfg = model(true, false);
        cfg.n_layers = 1;
        cfg.moe.aux_loss_coef = 0.01;
        let hf = HfConfig::new(&cfg, HfArch::Olmoe, &SpecialTokens::default());
        assert_eq!(hf.router_aux_loss_coef, Some(0.005));
        assert!(
            aux_loss_notes(&cfg).is_empty(),
            "{:?}",
            aux_loss_notes(&cfg)
        );
        // Imported without a base config (none to prefer): doubled back.
        let (_, back) = hf.to_model_config(None).unwrap();
        assert_eq!(back.moe.aux_loss_coef, 0.01);
        // A foreign HF model's coefficient: OLMoE-1B-7B's 0.01 with top-8 over 1 layer.
        let mut foreign = hf.clone();
        foreign.router_aux_loss_coef = Some(0.01);
        foreign.num_experts_per_tok = 4;
        let (_, back) = foreign.to_model_config(None).unwrap();
        assert_eq!(back.moe.aux_loss_coef, 0.04);

        // Four layers, top-2: x 4 / 2, and the note says the two differ.
        cfg.n_layers = 4;
        let hf = HfConfig::new(&cfg, HfArch::Olmoe, &SpecialTokens::default());
        assert_eq!(hf.router_aux_loss_coef, Some(0.02));
        let notes = aux_loss_notes(&cfg);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("products across layers"), "{notes:?}");
        let (_, back) = hf.to_model_config(Some(&cfg)).unwrap();
        assert_eq!(back.moe.aux_loss_coef, 0.01);
    }

    #[test]
    fn expert_bias_of_the_base_config_is_kept_on_import() {
        let mut cfg = model(true, false);
        let hf = HfConfig::new(&cfg, HfArch::Olmoe, &SpecialTokens::default());
        cfg.moe.expert_bias = true;
        let (_, back) = hf.to_model_config(Some(&cfg)).unwrap();
        assert!(back.moe.expert_bias);
    }

    #[test]
    fn config_json_round_trips_for_both_architectures() {
        for (qk, renorm, arch) in [
            (true, false, HfArch::Olmoe),
            (true, true, HfArch::Olmoe),
            (false, true, HfArch::Mixtral),
        ] {
            let cfg = model(qk, renorm);
            assert_eq!(choose_arch(&cfg).unwrap(), arch);
            let text = HfConfig::new(&cfg, arch, &SpecialTokens { eos_id: Some(0) })
                .to_json()
                .unwrap();
            let (back_arch, back) = HfConfig::from_json(&text)
                .unwrap()
                .to_model_config(Some(&cfg))
                .unwrap();
            assert_eq!(back_arch, arch);
            assert_eq!(back, cfg);
        }
    }

    /// The exact bytes `moelab export-hf` has always written (captured before config.json became
    /// typed): sorted keys, arch-only keys present for their architecture alone, nulls kept.
    #[test]
    fn config_json_bytes_are_stable() {
        let mut cfg = model(true, false);
        cfg.init_std = 0.05;
        cfg.moe.aux_loss_coef = 0.013;
        let olmoe = HfConfig::new(&cfg, HfArch::Olmoe, &SpecialTokens { eos_id: Some(0) });
        assert_eq!(olmoe.to_json().unwrap(), OLMOE_JSON);
        cfg.qk_norm = false;
        cfg.tie_embeddings = true;
        cfg.moe.renormalize = true;
        let mixtral = HfConfig::new(&cfg, HfArch::Mixtral, &SpecialTokens { eos_id: Some(7) });
        assert_eq!(mixtral.to_json().unwrap(), MIXTRAL_JSON);
    }

    #[test]
    fn unrepresentable_config_json_is_refused() {
        let cfg = model(true, false);
        let mut hf = HfConfig::new(&cfg, HfArch::Olmoe, &SpecialTokens::default());
        hf.clip_qkv = Some(Some(8.0));
        hf.attention_bias = Some(true);
        let text = hf.to_json().unwrap();
        let err = HfConfig::from_json(&text)
            .unwrap()
            .to_model_config(None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("clip_qkv") && err.contains("attention_bias"),
            "{err}"
        );
    }

    #[test]
    fn a_mistyped_or_missing_key_is_named() {
        let text = HfConfig::new(
            &model(true, false),
            HfArch::Olmoe,
            &SpecialTokens::default(),
        )
        .to_json()
        .unwrap();
        let mistyped = text.replace("\"num_experts\": 4", "\"num_experts\": \"four\"");
        let err = HfConfig::from_json(&mistyped).unwrap_err().to_string();
        assert!(err.contains("num_experts"), "{err}");
        let missing = text.replace("\"vocab_size\": 64", "\"vocab\": 64");
        let err = HfConfig::from_json(&missing).unwrap_err().to_string();
        assert!(err.contains("vocab_size"), "{err}");
    }

    #[test]
    fn a_hub_style_config_is_read() {
        // The shape of a Hub OLMoE config.json: no head_dim or rope_parameters, keys moelab
        // ignores, and an eos list, which a written-only key must not trip over.
        let text = r#"{"architectures": ["OlmoeForCausalLM"], "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 16, "num_experts": 4,
            "num_experts_per_tok": 2, "rope_scaling": null, "clip_qkv": null,
            "eos_token_id": [50279], "torch_dtype": "bfloat16", "output_router_logits": false}"#;
        let (arch, cfg) = HfConfig::from_json(text)
            .unwrap()
            .to_model_config(None)
            .unwrap();
        assert_eq!(arch, HfArch::Olmoe);
        assert_eq!(
            (cfg.rope_theta, cfg.kv_heads(), cfg.moe.n_experts),
            (10_000.0, 4, 4)
        );
        let scaled = text.replace(
            "\"rope_scaling\": null",
            r#""rope_scaling": {"type": "linear"}"#,
        );
        let err = HfConfig::from_json(&scaled)
            .unwrap()
            .to_model_config(None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rope_type = linear"), "{err}");
    }

    const OLMOE_JSON: &str = r#"{
  "architectures": [
    "OlmoeForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": null,
  "clip_qkv": null,
  "eos_token_id": 0,
  "head_dim": 8,
  "hidden_act": "silu",
  "hidden_size": 32,
  "initializer_range": 0.05,
  "intermediate_size": 8,
  "max_position_embeddings": 16,
  "model_type": "olmoe",
  "norm_topk_prob": false,
  "num_attention_heads": 4,
  "num_experts": 4,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "output_router_logits": false,
  "pad_token_id": 0,
  "rms_norm_eps": 1e-6,
  "rope_parameters": {
    "rope_theta": 500000.0,
    "rope_type": "default"
  },
  "rope_theta": 500000.0,
  "router_aux_loss_coef": 0.013,
  "tie_word_embeddings": false,
  "torch_dtype": "float32",
  "use_cache": true,
  "vocab_size": 64
}
"#;

    const MIXTRAL_JSON: &str = r#"{
  "architectures": [
    "MixtralForCausalLM"
  ],
  "attention_dropout": 0.0,
  "bos_token_id": null,
  "eos_token_id": 7,
  "head_dim": 8,
  "hidden_act": "silu",
  "hidden_size": 32,
  "initializer_range": 0.05,
  "intermediate_size": 8,
  "max_position_embeddings": 16,
  "model_type": "mixtral",
  "num_attention_heads": 4,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "num_local_experts": 4,
  "output_router_logits": false,
  "pad_token_id": 7,
  "rms_norm_eps": 1e-6,
  "rope_parameters": {
    "rope_theta": 500000.0,
    "rope_type": "default"
  },
  "rope_theta": 500000.0,
  "router_aux_loss_coef": 0.013,
  "router_jitter_noise": 0.0,
  "sliding_window": null,
  "tie_word_embeddings": true,
  "torch_dtype": "float32",
  "use_cache": true,
  "vocab_size": 64
}
"#;
}
