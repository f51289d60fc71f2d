//! Tensor names and shapes on both sides: moelab's parameter map <-> a `transformers` state
//! dict (table in [`super`]). Every tensor must be used exactly once, so a mismatch is named
//! instead of silently dropped.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Tensor};

use super::{hf_err, HfArch};
use crate::{ModelConfig, ModelError};

/// moelab's stacked expert tensors, in the order of [`HfArch::expert_names`].
const OUR_EXPERTS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

fn get_tensor<'a>(
    map: &'a HashMap<String, Tensor>,
    name: &str,
    shape: &[usize],
) -> Result<&'a Tensor, ModelError> {
    let t = map
        .get(name)
        .ok_or_else(|| hf_err(format!("tensor `{name}` is missing")))?;
    if t.dims() != shape {
        return Err(hf_err(format!(
            "tensor `{name}` has shape {:?}, the config needs {shape:?}",
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

/// Renames (and splits the stacked experts of) a moelab parameter map into f32 HF tensors.
pub fn to_hf_tensors(
    cfg: &ModelConfig,
    arch: HfArch,
    model: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut used = HashSet::new();
    let mut out = HashMap::new();
    for (ours, theirs, shape) in plain_pairs(cfg, arch) {
        let t = get_tensor(model, &ours, &shape)?;
        out.insert(theirs, t.to_dtype(DType::F32)?.contiguous()?);
        used.insert(ours);
    }
    let shapes = expert_shapes(cfg);
    for i in 0..cfg.n_layers {
        for (k, ours) in OUR_EXPERTS.iter().enumerate() {
            let name = format!("blocks.{i}.moe.experts.{ours}");
            let stacked = get_tensor(model, &name, &shapes[k])?.to_dtype(DType::F32)?;
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
            "tensor `{name}` has no place in the {} export",
            arch.class_name()
        )));
    }
    Ok(out)
}

/// Builds the f32 moelab parameter map from HF tensors (classic or fused expert layout).
pub fn from_hf_tensors(
    cfg: &ModelConfig,
    arch: HfArch,
    hf: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let f32 = |t: &Tensor| -> Result<Tensor, ModelError> { Ok(t.to_dtype(DType::F32)?) };
    // Mixtral checkpoints written by newer transformers spell the MoE module `mlp`.
    let spelled = |classic: String| {
        if arch == HfArch::Mixtral && !hf.contains_key(&classic) {
            classic.replace(".block_sparse_moe.", ".mlp.")
        } else {
            classic
        }
    };
    let mut used = HashSet::new();
    let mut out = HashMap::new();
    for (ours, theirs, shape) in plain_pairs(cfg, arch) {
        let theirs = spelled(theirs);
        let t = get_tensor(hf, &theirs, &shape)?;
        out.insert(ours, f32(t)?);
        used.insert(theirs);
    }
    let (e, ff, d) = (cfg.moe.n_experts, cfg.moe.expert_ff, cfg.d_model);
    let shapes = expert_shapes(cfg);
    for i in 0..cfg.n_layers {
        let fused_prefix = format!("model.layers.{i}.mlp.experts");
        let fused_gate_up = format!("{fused_prefix}.gate_up_proj");
        if hf.contains_key(&fused_gate_up) {
            // The fused layout: gate_up_proj (E, 2 ff, d) = [gate; up], down_proj (E, d, ff).
            let gu = get_tensor(hf, &fused_gate_up, &[e, 2 * ff, d])?;
            let down_name = format!("{fused_prefix}.down_proj");
            let down = get_tensor(hf, &down_name, &[e, d, ff])?;
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
        for (k, ours) in OUR_EXPERTS.iter().enumerate() {
            let mut experts = Vec::with_capacity(e);
            for j in 0..e {
                let name = spelled(format!(
                    "model.layers.{i}.{}.experts.{j}.{}.weight",
                    arch.moe_prefix(),
                    arch.expert_names()[k]
                ));
                experts.push(f32(get_tensor(hf, &name, &shapes[k][1..])?)?);
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
            "unexpected tensor `{name}`: it has no place in the model config.json describes{hint}"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::hf::tests::model;
    use crate::MoeTransformer;
    use candle_core::Device;

    fn params(cfg: &ModelConfig) -> HashMap<String, Tensor> {
        let (_model, varmap) = MoeTransformer::init(cfg, 7, DType::F32, &Device::Cpu).unwrap();
        let vars = varmap.data().lock().unwrap();
        vars.iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn the_mapping_round_trips_every_tensor_of_the_built_model() {
        for (qk, renorm, arch) in [(true, false, HfArch::Olmoe), (false, true, HfArch::Mixtral)] {
            let cfg = model(qk, renorm);
            let ours = params(&cfg);
            let theirs = to_hf_tensors(&cfg, arch, &ours).unwrap();
            assert!(theirs.contains_key(&format!(
                "model.layers.1.{}.experts.3.{}.weight",
                arch.moe_prefix(),
                arch.expert_names()[2]
            )));
            let back = from_hf_tensors(&cfg, arch, &theirs).unwrap();
            assert_eq!(back.len(), ours.len());
            for (name, t) in &ours {
                assert_eq!(bits(&back[name]), bits(t), "{name}");
            }
        }
    }

    #[test]
    fn the_fused_expert_layout_is_read() {
        let cfg = model(true, false);
        let ours = params(&cfg);
        let mut theirs = to_hf_tensors(&cfg, HfArch::Olmoe, &ours).unwrap();
        for i in 0..cfg.n_layers {
            let classic =
                |j: usize, w: &str| format!("model.layers.{i}.mlp.experts.{j}.{w}.weight");
            let stack = |w: &str, theirs: &mut HashMap<String, Tensor>| {
                let parts: Vec<Tensor> = (0..cfg.moe.n_experts)
                    .map(|j| theirs.remove(&classic(j, w)).unwrap())
                    .collect();
                Tensor::stack(&parts, 0).unwrap()
            };
            let gate = stack("gate_proj", &mut theirs);
            let up = stack("up_proj", &mut theirs);
            let down = stack("down_proj", &mut theirs);
            let prefix = format!("model.layers.{i}.mlp.experts");
            theirs.insert(
                format!("{prefix}.gate_up_proj"),
                Tensor::cat(&[gate, up], 1).unwrap(),
            );
            theirs.insert(format!("{prefix}.down_proj"), down);
        }
        let back = from_hf_tensors(&cfg, HfArch::Olmoe, &theirs).unwrap();
        for (name, t) in &ours {
            assert_eq!(bits(&back[name]), bits(t), "{name}");
        }
    }

    #[test]
    fn a_wrong_shape_or_extra_tensor_is_named() {
        let cfg = model(true, false);
        let mut theirs = to_hf_tensors(&cfg, HfArch::Olmoe, &params(&cfg)).unwrap();
        let name = "model.layers.1.self_attn.k_proj.weight";
        let right = theirs[name].clone();
        theirs.insert(
            name.into(),
            Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = from_hf_tensors(&cfg, HfArch::Olmoe, &theirs)
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains("[8, 32]"), "{err}");
        theirs.insert(name.into(), right);
        theirs.insert(
            "lm_head.bias".into(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = from_hf_tensors(&cfg, HfArch::Olmoe, &theirs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unexpected tensor `lm_head.bias`"), "{err}");
    }
}
