//! Hugging Face interoperability: export a checkpoint as a `transformers` model folder
//! (`OlmoeForCausalLM` or `MixtralForCausalLM`), import such a folder back into a checkpoint,
//! and dump a checkpoint's logits for the parity check (`scripts/hf_parity.py`).
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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moelab_model::{ForwardOptions, ModelConfig, MoeConfig, MoeTransformer, RouterKind};
use serde_json::{json, Value};

use crate::checkpoint::io;
use crate::checkpoint::{self, TrainState};
use crate::{Config, TrainError};

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

fn hf_err(message: String) -> TrainError {
    TrainError::Hf(message)
}

/// Picks the architecture that computes exactly what `cfg` computes, or lists every feature
/// that no supported architecture can express.
pub fn choose_arch(cfg: &ModelConfig) -> Result<HfArch, TrainError> {
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

/// Token ids and strings written into config.json and tokenizer_config.json.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    /// The end-of-document token id (also used as padding).
    pub eos_id: Option<u32>,
}

/// The end-of-document token of the lab's tokenizers.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// config.json for `cfg` as `arch`.
pub fn config_json(cfg: &ModelConfig, arch: HfArch, tokens: &SpecialTokens) -> Value {
    let moe = &cfg.moe;
    let mut v = json!({
        "architectures": [arch.class_name()],
        "model_type": arch.model_type(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": moe.expert_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads(),
        "head_dim": cfg.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coef,
        "output_router_logits": false,
        "attention_dropout": 0.0,
        "use_cache": true,
        "bos_token_id": Value::Null,
        "eos_token_id": tokens.eos_id,
        "pad_token_id": tokens.eos_id,
        "torch_dtype": "float32",
    });
    if let Some(obj) = v.as_object_mut() {
        match arch {
            HfArch::Olmoe => {
                obj.insert("num_experts".into(), json!(moe.n_experts));
                obj.insert("norm_topk_prob".into(), json!(moe.renormalize));
                obj.insert("attention_bias".into(), json!(false));
                obj.insert("clip_qkv".into(), Value::Null);
            }
            HfArch::Mixtral => {
                obj.insert("num_local_experts".into(), json!(moe.n_experts));
                obj.insert("sliding_window".into(), Value::Null);
                obj.insert("router_jitter_noise".into(), json!(0.0));
            }
        }
    }
    v
}

fn get_tensor<'a>(
    map: &'a HashMap<String, Tensor>,
    name: &str,
    shape: &[usize],
    what: &str,
) -> Result<&'a Tensor, TrainError> {
    let t = map
        .get(name)
        .ok_or_else(|| hf_err(format!("{what} lacks tensor `{name}`")))?;
    if t.dims() != shape {
        return Err(hf_err(format!(
            "{what}: tensor `{name}` has shape {:?}, the config needs {shape:?}",
            t.dims()
        )));
    }
    Ok(t)
}

/// (moelab name, HF name, shape) of every tensor that maps one to one.
fn plain_pairs(cfg: &ModelConfig, arch: HfArch) -> Vec<(String, String, Vec<usize>)> {
    let (d, v) = (cfg.d_model, cfg.vocab_size);
    let q_dim = cfg.n_heads * cfg.head_dim();
    let kv_dim = cfg.kv_heads() * cfg.head_dim();
    let mut out = vec![
        (
            "embed.weight".to_string(),
            "model.embed_tokens.weight".to_string(),
            vec![v, d],
        ),
        (
            "final_norm.weight".into(),
            "model.norm.weight".into(),
            vec![d],
        ),
    ];
    if !cfg.tie_embeddings {
        out.push(("lm_head.weight".into(), "lm_head.weight".into(), vec![v, d]));
    }
    for i in 0..cfg.n_layers {
        let (b, l) = (format!("blocks.{i}"), format!("model.layers.{i}"));
        let mut push = |ours: String, theirs: String, shape: Vec<usize>| {
            out.push((format!("{b}.{ours}"), format!("{l}.{theirs}"), shape))
        };
        push(
            "attn_norm.weight".into(),
            "input_layernorm.weight".into(),
            vec![d],
        );
        push(
            "ffn_norm.weight".into(),
            "post_attention_layernorm.weight".into(),
            vec![d],
        );
        for (p, rows) in [("q", q_dim), ("k", kv_dim), ("v", kv_dim)] {
            push(
                format!("attn.{p}_proj.weight"),
                format!("self_attn.{p}_proj.weight"),
                vec![rows, d],
            );
        }
        push(
            "attn.o_proj.weight".into(),
            "self_attn.o_proj.weight".into(),
            vec![d, q_dim],
        );
        if cfg.qk_norm {
            push(
                "attn.q_norm.weight".into(),
                "self_attn.q_norm.weight".into(),
                vec![q_dim],
            );
            push(
                "attn.k_norm.weight".into(),
                "self_attn.k_norm.weight".into(),
                vec![kv_dim],
            );
        }
        push(
            "moe.router.weight".into(),
            format!("{}.gate.weight", arch.moe_prefix()),
            vec![cfg.moe.n_experts, d],
        );
    }
    out
}

fn expert_shapes(cfg: &ModelConfig) -> [Vec<usize>; 3] {
    let (e, ff, d) = (cfg.moe.n_experts, cfg.moe.expert_ff, cfg.d_model);
    [vec![e, ff, d], vec![e, ff, d], vec![e, d, ff]]
}

const OUR_EXPERTS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Renames (and splits the stacked experts of) a moelab model map into HF tensors.
pub fn to_hf_tensors(
    cfg: &ModelConfig,
    arch: HfArch,
    model: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let what = "the checkpoint's model.safetensors";
    let mut used = HashSet::new();
    let mut out = HashMap::new();
    for (ours, theirs, shape) in plain_pairs(cfg, arch) {
        let t = get_tensor(model, &ours, &shape, what)?;
        out.insert(theirs, t.to_dtype(DType::F32)?.contiguous()?);
        used.insert(ours);
    }
    let shapes = expert_shapes(cfg);
    for i in 0..cfg.n_layers {
        for (k, ours) in OUR_EXPERTS.iter().enumerate() {
            let name = format!("blocks.{i}.moe.experts.{ours}");
            let stacked = get_tensor(model, &name, &shapes[k], what)?.to_dtype(DType::F32)?;
            for j in 0..cfg.moe.n_experts {
                out.insert(
                    format!(
                        "model.layers.{i}.{}.experts.{j}.{}.weight",
                        arch.moe_prefix(),
                        arch.expert_names()[k]
                    ),
                    stacked.get(j)?.contiguous()?,
                );
            }
            used.insert(name);
        }
    }
    let mut extra: Vec<&String> = model.keys().filter(|k| !used.contains(*k)).collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(hf_err(format!(
            "{what}: tensor `{name}` has no place in the {} export",
            arch.class_name()
        )));
    }
    Ok(out)
}

/// Builds the moelab model map from HF tensors; every tensor must be used exactly once.
pub fn from_hf_tensors(
    cfg: &ModelConfig,
    arch: HfArch,
    hf: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let what = "the Hugging Face model.safetensors";
    let f32 = |t: &Tensor| -> Result<Tensor, TrainError> { Ok(t.to_dtype(DType::F32)?) };
    let mut used = HashSet::new();
    let mut out = HashMap::new();
    for (ours, theirs, shape) in plain_pairs(cfg, arch) {
        // Mixtral checkpoints written by newer transformers spell the MoE module `mlp`.
        let theirs = if arch == HfArch::Mixtral && !hf.contains_key(&theirs) {
            theirs.replace(".block_sparse_moe.", ".mlp.")
        } else {
            theirs
        };
        let t = get_tensor(hf, &theirs, &shape, what)?;
        out.insert(ours, f32(t)?);
        used.insert(theirs);
    }
    let (e, ff, d) = (cfg.moe.n_experts, cfg.moe.expert_ff, cfg.d_model);
    for i in 0..cfg.n_layers {
        let fused_prefix = format!("model.layers.{i}.mlp.experts");
        let fused_gate_up = format!("{fused_prefix}.gate_up_proj");
        if hf.contains_key(&fused_gate_up) {
            // The fused layout: gate_up_proj (E, 2 ff, d) = [gate; up], down_proj (E, d, ff).
            let gu = get_tensor(hf, &fused_gate_up, &[e, 2 * ff, d], what)?;
            let down_name = format!("{fused_prefix}.down_proj");
            let down = get_tensor(hf, &down_name, &[e, d, ff], what)?;
            let b = format!("blocks.{i}.moe.experts");
            out.insert(
                format!("{b}.gate_proj"),
                f32(&gu.narrow(1, 0, ff)?.contiguous()?)?,
            );
            out.insert(
                format!("{b}.up_proj"),
                f32(&gu.narrow(1, ff, ff)?.contiguous()?)?,
            );
            out.insert(format!("{b}.down_proj"), f32(down)?);
            used.insert(fused_gate_up);
            used.insert(down_name);
            continue;
        }
        let shapes = expert_shapes(cfg);
        for (k, ours) in OUR_EXPERTS.iter().enumerate() {
            let mut experts = Vec::with_capacity(e);
            for j in 0..e {
                let classic = format!(
                    "model.layers.{i}.{}.experts.{j}.{}.weight",
                    arch.moe_prefix(),
                    arch.expert_names()[k]
                );
                let name = if arch == HfArch::Mixtral && !hf.contains_key(&classic) {
                    classic.replace(".block_sparse_moe.", ".mlp.")
                } else {
                    classic
                };
                experts.push(f32(get_tensor(hf, &name, &shapes[k][1..], what)?)?);
                used.insert(name);
            }
            out.insert(
                format!("blocks.{i}.moe.experts.{ours}"),
                Tensor::stack(&experts, 0)?,
            );
        }
    }
    let mut extra: Vec<&String> = hf
        .keys()
        .filter(|k| !used.contains(*k) && !k.ends_with("rotary_emb.inv_freq"))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        let hint = if cfg.tie_embeddings && name.as_str() == "lm_head.weight" {
            " (config.json has tie_word_embeddings = true)"
        } else {
            ""
        };
        return Err(hf_err(format!(
            "{what}: unexpected tensor `{name}`: it has no place in the model config.json describes{hint}"
        )));
    }
    Ok(out)
}

/// What `moelab export-hf` wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The export folder.
    pub dir: PathBuf,
    /// The architecture chosen.
    pub arch: HfArch,
    /// Tensors written.
    pub tensors: usize,
    /// Warnings (e.g. no tokenizer found).
    pub notes: Vec<String>,
}

fn write_json(path: &Path, value: &Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| hf_err(format!("serialising {}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(io(path))
}

/// A sibling temporary folder of `out`, emptied.
fn temp_sibling(out: &Path) -> Result<PathBuf, TrainError> {
    let name = out.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        TrainError::Argument(format!("--out {}: not a folder name", out.display()))
    })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    Ok(tmp)
}

fn refuse_existing(out: &Path) -> Result<(), TrainError> {
    if out.exists() {
        return Err(TrainError::Argument(format!(
            "--out {} already exists; choose a new folder",
            out.display()
        )));
    }
    Ok(())
}

/// Exports the checkpoint folder `checkpoint` as a Hugging Face model folder `out`.
pub fn export(checkpoint: &Path, out: &Path) -> Result<ExportSummary, TrainError> {
    refuse_existing(out)?;
    let cfg = Config::load(&checkpoint.join("config.toml"), &[])?;
    let arch = choose_arch(&cfg.model)?;
    let model_path = checkpoint.join("model.safetensors");
    let model = candle_core::safetensors::load(&model_path, &Device::Cpu)
        .map_err(|e| hf_err(format!("{}: {e}", model_path.display())))?;
    let tensors = to_hf_tensors(&cfg.model, arch, &model)?;

    let mut notes = Vec::new();
    let dataset = moelab_data::Dataset::open(&cfg.data.dataset);
    let (tokens, tokenizer) = match &dataset {
        Ok(ds) => (
            SpecialTokens {
                eos_id: Some(ds.eos_id()),
            },
            Some(ds.tokenizer_path()),
        ),
        Err(e) => {
            notes.push(format!(
                "no tokenizer exported: the run's dataset {} cannot be opened ({e})",
                cfg.data.dataset.display()
            ));
            (SpecialTokens::default(), None)
        }
    };

    let tmp = temp_sibling(out)?;
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = (|| -> Result<(), TrainError> {
        write_json(
            &tmp.join("config.json"),
            &config_json(&cfg.model, arch, &tokens),
        )?;
        let path = tmp.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path)
            .map_err(|e| hf_err(format!("{}: {e}", path.display())))?;
        if let Some(src) = &tokenizer {
            let dst = tmp.join("tokenizer.json");
            std::fs::copy(src, &dst).map_err(io(src))?;
            write_json(
                &tmp.join("tokenizer_config.json"),
                &json!({
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "eos_token": EOS_TOKEN,
                    "pad_token": EOS_TOKEN,
                    "model_max_length": cfg.model.max_seq_len,
                    "clean_up_tokenization_spaces": false,
                }),
            )?;
            write_json(
                &tmp.join("special_tokens_map.json"),
                &json!({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}),
            )?;
        }
        write_json(
            &tmp.join("generation_config.json"),
            &json!({"eos_token_id": tokens.eos_id, "pad_token_id": tokens.eos_id}),
        )?;
        std::fs::rename(&tmp, out).map_err(io(out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    Ok(ExportSummary {
        dir: out.to_path_buf(),
        arch,
        tensors: tensors.len(),
        notes,
    })
}

fn json_usize(cfg: &Value, key: &str) -> Result<Option<usize>, TrainError> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            hf_err(format!(
                "config.json: `{key}` must be a non-negative integer, got {v}"
            ))
        }),
    }
}

fn json_f64(cfg: &Value, key: &str) -> Result<Option<f64>, TrainError> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| hf_err(format!("config.json: `{key}` must be a number, got {v}"))),
    }
}

fn json_bool(cfg: &Value, key: &str) -> Result<Option<bool>, TrainError> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            hf_err(format!(
                "config.json: `{key}` must be true or false, got {v}"
            ))
        }),
    }
}

fn required(v: Option<usize>, key: &str) -> Result<usize, TrainError> {
    v.ok_or_else(|| hf_err(format!("config.json lacks `{key}`")))
}

/// The moelab `[model]` that computes what config.json describes. Keys HF does not store
/// (init_std, the balancing-loss scope, z-loss, routing warm-up) come from `base` when given.
pub fn model_config_from_json(
    cfg: &Value,
    base: Option<&ModelConfig>,
) -> Result<(HfArch, ModelConfig), TrainError> {
    let arch_name = cfg
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .or_else(|| cfg.get("model_type").and_then(Value::as_str))
        .unwrap_or("");
    let arch = match arch_name {
        "OlmoeForCausalLM" | "olmoe" => HfArch::Olmoe,
        "MixtralForCausalLM" | "mixtral" => HfArch::Mixtral,
        other => {
            return Err(hf_err(format!(
                "config.json: architecture `{other}` is not supported (OlmoeForCausalLM, MixtralForCausalLM)"
            )))
        }
    };
    let mut problems = Vec::new();
    let act = cfg
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    if act != "silu" {
        problems.push(format!("hidden_act = {act} (moelab experts use SiLU)"));
    }
    if json_bool(cfg, "attention_bias")?.unwrap_or(false) {
        problems.push("attention_bias = true".to_string());
    }
    if let Some(c) = json_f64(cfg, "clip_qkv")? {
        problems.push(format!("clip_qkv = {c}"));
    }
    if let Some(w) = json_usize(cfg, "sliding_window")? {
        problems.push(format!("sliding_window = {w}"));
    }
    let rope_type = cfg
        .get("rope_parameters")
        .and_then(|r| r.get("rope_type"))
        .or_else(|| {
            cfg.get("rope_scaling")
                .and_then(|r| r.get("rope_type").or(r.get("type")))
        })
        .and_then(Value::as_str)
        .unwrap_or("default");
    if rope_type != "default" {
        problems.push(format!("rope_type = {rope_type} (moelab has plain RoPE)"));
    }
    let d_model = required(json_usize(cfg, "hidden_size")?, "hidden_size")?;
    let n_heads = required(
        json_usize(cfg, "num_attention_heads")?,
        "num_attention_heads",
    )?;
    if let Some(hd) = json_usize(cfg, "head_dim")? {
        if n_heads > 0 && hd * n_heads != d_model {
            problems.push(format!(
                "head_dim = {hd} != hidden_size / num_attention_heads = {}",
                d_model / n_heads
            ));
        }
    }
    if !problems.is_empty() {
        return Err(hf_err(format!(
            "config.json describes a model moelab cannot represent exactly: {}",
            problems.join("; ")
        )));
    }
    let experts_key = match arch {
        HfArch::Olmoe => "num_experts",
        HfArch::Mixtral => "num_local_experts",
    };
    let rope_theta = json_f64(cfg, "rope_theta")?
        .or(cfg
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64))
        .unwrap_or(match arch {
            HfArch::Olmoe => 10_000.0,
            HfArch::Mixtral => 1_000_000.0,
        });
    let defaults = MoeConfig::default();
    let base_moe = base.map(|b| &b.moe).unwrap_or(&defaults);
    let model = ModelConfig {
        vocab_size: required(json_usize(cfg, "vocab_size")?, "vocab_size")?,
        d_model,
        n_layers: required(json_usize(cfg, "num_hidden_layers")?, "num_hidden_layers")?,
        n_heads,
        n_kv_heads: Some(json_usize(cfg, "num_key_value_heads")?.unwrap_or(n_heads)),
        max_seq_len: required(
            json_usize(cfg, "max_position_embeddings")?,
            "max_position_embeddings",
        )?,
        rope_theta,
        norm_eps: json_f64(cfg, "rms_norm_eps")?.unwrap_or(1e-5),
        qk_norm: arch == HfArch::Olmoe,
        tie_embeddings: json_bool(cfg, "tie_word_embeddings")?.unwrap_or(false),
        ffn_hidden: None,
        init_std: json_f64(cfg, "initializer_range")?
            .or(base.map(|b| b.init_std))
            .unwrap_or(0.02),
        moe: MoeConfig {
            n_experts: required(json_usize(cfg, experts_key)?, experts_key)?,
            top_k: required(
                json_usize(cfg, "num_experts_per_tok")?,
                "num_experts_per_tok",
            )?,
            expert_ff: required(json_usize(cfg, "intermediate_size")?, "intermediate_size")?,
            n_shared_experts: 0,
            dense_layers: 0,
            router: RouterKind::Softmax,
            renormalize: match arch {
                HfArch::Olmoe => json_bool(cfg, "norm_topk_prob")?.unwrap_or(false),
                HfArch::Mixtral => true,
            },
            capacity_factor: None,
            aux_loss_coef: json_f64(cfg, "router_aux_loss_coef")?.unwrap_or(base_moe.aux_loss_coef),
            aux_loss_scope: base_moe.aux_loss_scope,
            z_loss_coef: base_moe.z_loss_coef,
            routing_warmup_steps: base_moe.routing_warmup_steps,
            expert_bias: false,
        },
    };
    model.validate()?;
    Ok((arch, model))
}

/// Reads `model.safetensors` (or the shards of `model.safetensors.index.json`) of `dir`.
pub fn load_hf_tensors(dir: &Path) -> Result<HashMap<String, Tensor>, TrainError> {
    let load = |path: &Path| {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| hf_err(format!("{}: {e}", path.display())))
    };
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return load(&single);
    }
    let index_path = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).map_err(|e| {
        hf_err(format!(
            "{}: neither model.safetensors nor model.safetensors.index.json is readable ({e})",
            dir.display()
        ))
    })?;
    let index: Value = serde_json::from_str(&text)
        .map_err(|e| hf_err(format!("{}: {e}", index_path.display())))?;
    let mut shards: Vec<&str> = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| hf_err(format!("{}: no `weight_map`", index_path.display())))?
        .values()
        .filter_map(Value::as_str)
        .collect();
    shards.sort_unstable();
    shards.dedup();
    let mut all = HashMap::new();
    for shard in shards {
        all.extend(load(&dir.join(shard))?);
    }
    Ok(all)
}

/// What `moelab import-hf` wrote.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    /// The checkpoint folder.
    pub dir: PathBuf,
    /// The architecture read.
    pub arch: HfArch,
    /// The derived `[model]`.
    pub model: ModelConfig,
}

/// Imports the Hugging Face folder `hf_dir` as a step-0 checkpoint folder `out`, whose
/// config.toml is `run_config` with `[model]` replaced by the one config.json describes.
pub fn import(hf_dir: &Path, out: &Path, run_config: &Path) -> Result<ImportSummary, TrainError> {
    refuse_existing(out)?;
    let cfg_path = hf_dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| hf_err(format!("{}: {e}", cfg_path.display())))?;
    let base = Config::load(run_config, &[])?;
    let (arch, model_cfg) = model_config_from_json(&json, Some(&base.model))?;
    let hf = load_hf_tensors(hf_dir)?;
    let tensors = from_hf_tensors(&model_cfg, arch, &hf)?;

    // The run config with the derived [model]; loading it again runs every cross-section check.
    let run_text = std::fs::read_to_string(run_config).map_err(io(run_config))?;
    let mut table: toml::Table =
        run_text
            .parse()
            .map_err(|e: toml::de::Error| TrainError::Config {
                path: run_config.to_path_buf(),
                message: e.to_string(),
            })?;
    let model_value = toml::Value::try_from(&model_cfg)
        .map_err(|e| hf_err(format!("serialising the derived [model]: {e}")))?;
    table.insert("model".into(), model_value);
    let tmp = temp_sibling(out)?;
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = (|| -> Result<Config, TrainError> {
        let merged_path = tmp.join("config.toml");
        let merged = toml::to_string_pretty(&table)
            .map_err(|e| hf_err(format!("serialising the run config: {e}")))?;
        std::fs::write(&merged_path, merged).map_err(io(&merged_path))?;
        let cfg = Config::load(&merged_path, &[]).map_err(|e| {
            TrainError::Argument(format!(
                "--config {} does not fit the imported model: {e}",
                run_config.display()
            ))
        })?;
        // The real model checks every name and shape once more.
        let (model, varmap) =
            MoeTransformer::init(&cfg.model, cfg.run.seed, DType::F32, &Device::Cpu)?;
        let params = crate::trainer::named_params(&varmap)?;
        crate::trainer::restore_model(&model, &params, &tensors, hf_dir)?;

        let dataset = Arc::new(moelab_data::ensure_prepared(&cfg.data)?);
        if dataset.vocab_size() > cfg.model.vocab_size {
            return Err(TrainError::Argument(format!(
                "the imported vocab_size {} is smaller than the tokenizer vocabulary of --config's dataset ({})",
                cfg.model.vocab_size,
                dataset.vocab_size()
            )));
        }
        let stream = moelab_data::MixtureStream::new(dataset, &cfg.data, cfg.run.seed)?;
        let mut optimizer = HashMap::new();
        for (name, t) in &tensors {
            let zeros = Tensor::zeros(t.shape(), DType::F32, &Device::Cpu)?;
            optimizer.insert(format!("m.{name}"), zeros.clone());
            optimizer.insert(format!("v.{name}"), zeros);
        }
        let state = TrainState::fresh(&stream, cfg.run.seed);
        let written = checkpoint::save(
            &tmp.join("ckpt"),
            &tensors,
            &optimizer,
            &state,
            &cfg.to_toml(),
        )?;
        std::fs::rename(&written, out).map_err(io(out))?;
        Ok(cfg)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    let cfg = result?;
    Ok(ImportSummary {
        dir: out.to_path_buf(),
        arch,
        model: cfg.model,
    })
}

/// What `moelab eval --dump-logits` wrote.
#[derive(Debug, Clone)]
pub struct DumpSummary {
    /// Sequences (one per domain).
    pub sequences: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// The domains, in row order.
    pub domains: Vec<String>,
}

/// Writes the logits of the checkpoint's model on the first validation sequence of every domain
/// (at most `tokens` tokens each) to `file`: `input_ids` I64 (B, T), `logits` F32 (B, T, V).
pub fn dump_logits(
    checkpoint: &Path,
    file: &Path,
    tokens: Option<usize>,
) -> Result<DumpSummary, TrainError> {
    let device = Device::Cpu;
    let (cfg, model, _) = crate::trainer::load_model(checkpoint, &device)?;
    let dataset = moelab_data::ensure_prepared(&cfg.data)?;
    let seq_len = tokens.unwrap_or(cfg.data.seq_len).min(cfg.data.seq_len);
    if seq_len == 0 {
        return Err(TrainError::Argument("--tokens must be at least 1".into()));
    }
    let mut ids = Vec::new();
    let domains = dataset.domains().to_vec();
    for (d, domain) in domains.iter().enumerate() {
        let batches =
            dataset.validation_batches(d, cfg.data.seq_len, cfg.data.seq_len as u64, 1)?;
        let first = batches.first().ok_or_else(|| {
            TrainError::Argument(format!("domain `{domain}` has no validation sequence"))
        })?;
        let sequence = first.tokens.get(..seq_len).ok_or_else(|| {
            TrainError::Argument(format!(
                "domain `{domain}`: validation sequence shorter than {seq_len} tokens"
            ))
        })?;
        ids.extend_from_slice(sequence);
    }
    let b = domains.len();
    let input = Tensor::from_vec(ids.clone(), (b, seq_len), &device)?;
    let out = model
        .forward(&input, None, ForwardOptions::default())
        .map_err(TrainError::from)?;
    let ids64: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
    let map = HashMap::from([
        (
            "input_ids".to_string(),
            Tensor::from_vec(ids64, (b, seq_len), &device)?,
        ),
        (
            "logits".to_string(),
            out.logits.to_dtype(DType::F32)?.contiguous()?,
        ),
    ]);
    candle_core::safetensors::save(&map, file)
        .map_err(|e| hf_err(format!("{}: {e}", file.display())))?;
    Ok(DumpSummary {
        sequences: b,
        tokens: seq_len,
        domains,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn model(qk_norm: bool, renormalize: bool) -> ModelConfig {
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
    fn config_json_round_trips_for_both_architectures() {
        for (qk, renorm, arch) in [
            (true, false, HfArch::Olmoe),
            (true, true, HfArch::Olmoe),
            (false, true, HfArch::Mixtral),
        ] {
            let cfg = model(qk, renorm);
            assert_eq!(choose_arch(&cfg).unwrap(), arch);
            let json = config_json(&cfg, arch, &SpecialTokens { eos_id: Some(0) });
            let (back_arch, back) = model_config_from_json(&json, Some(&cfg)).unwrap();
            assert_eq!(back_arch, arch);
            assert_eq!(back, cfg);
        }
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

    #[test]
    fn unrepresentable_config_json_is_refused() {
        let cfg = model(true, false);
        let mut json = config_json(&cfg, HfArch::Olmoe, &SpecialTokens::default());
        json["clip_qkv"] = json!(8.0);
        json["attention_bias"] = json!(true);
        let err = model_config_from_json(&json, None).unwrap_err().to_string();
        assert!(
            err.contains("clip_qkv") && err.contains("attention_bias"),
            "{err}"
        );
    }
}
