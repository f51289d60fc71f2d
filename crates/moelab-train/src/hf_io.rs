//! Hugging Face interoperability, the file side: export a checkpoint as a `transformers` model
//! folder (`OlmoeForCausalLM` or `MixtralForCausalLM`), import such a folder back into a
//! checkpoint, and dump a checkpoint's logits for the parity check (`scripts/hf_parity.py`).
//!
//! The mapping itself (which architecture, config.json, tensor names) is the model's:
//! [`moelab_model::hf`]. This module reads and writes the folders around it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moelab_model::hf::{
    choose_arch, from_hf_tensors, to_hf_tensors, HfArch, HfConfig, SpecialTokens,
};
use moelab_model::{ForwardOptions, ModelConfig, ModelError, MoeTransformer};
use serde_json::{json, Value};

use crate::checkpoint::io;
use crate::checkpoint::{self, TrainState};
use crate::{Config, TrainError};

fn hf_err(message: String) -> TrainError {
    TrainError::Hf(message)
}

/// The model crate's mapping errors become [`TrainError::Hf`], prefixed with the file they
/// concern (`""`: none); its other errors keep their own variant.
fn mapping_err(file: &str) -> impl Fn(ModelError) -> TrainError + '_ {
    move |e| match e {
        ModelError::Hf(message) if file.is_empty() => TrainError::Hf(message),
        ModelError::Hf(message) => TrainError::Hf(format!("{file}: {message}")),
        other => TrainError::Model(other),
    }
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
    let arch = choose_arch(&cfg.model).map_err(mapping_err(""))?;
    let model_path = checkpoint.join("model.safetensors");
    let model = candle_core::safetensors::load(&model_path, &Device::Cpu)
        .map_err(|e| hf_err(format!("{}: {e}", model_path.display())))?;
    let tensors = to_hf_tensors(&cfg.model, arch, &model)
        .map_err(mapping_err("the checkpoint's model.safetensors"))?;

    let mut notes = Vec::new();
    let dataset = moelab_data::Dataset::open(&cfg.data.dataset);
    let (tokens, tokenizer) = match &dataset {
        Ok(ds) => (
            SpecialTokens {
                eos_id: Some(ds.eos_id()),
            },
            Some((
                ds.tokenizer_path(),
                ds.manifest().tokenizer.eos_token.clone(),
            )),
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
        let config_path = tmp.join("config.json");
        let config_text = HfConfig::new(&cfg.model, arch, &tokens)
            .to_json()
            .map_err(mapping_err(""))?;
        std::fs::write(&config_path, config_text).map_err(io(&config_path))?;
        let path = tmp.join("model.safetensors");
        checkpoint::save_tensors(&tensors, &path)?;
        if let Some((src, eos)) = &tokenizer {
            let dst = tmp.join("tokenizer.json");
            std::fs::copy(src, &dst).map_err(io(src))?;
            write_json(
                &tmp.join("tokenizer_config.json"),
                &json!({
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "eos_token": eos,
                    "pad_token": eos,
                    "model_max_length": cfg.model.max_seq_len,
                    "clean_up_tokenization_spaces": false,
                }),
            )?;
            write_json(
                &tmp.join("special_tokens_map.json"),
                &json!({"eos_token": eos, "pad_token": eos}),
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
    let cfg_file = cfg_path.display().to_string();
    let hf_config = HfConfig::from_json(&text).map_err(mapping_err(&cfg_file))?;
    let base = Config::load(run_config, &[])?;
    let (arch, model_cfg) = hf_config
        .to_model_config(Some(&base.model))
        .map_err(mapping_err(""))?;
    let hf = load_hf_tensors(hf_dir)?;
    let tensors = from_hf_tensors(&model_cfg, arch, &hf)
        .map_err(mapping_err("the Hugging Face model.safetensors"))?;

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
        let params = crate::run::load::named_params(&varmap)?;
        crate::run::load::restore_model(&model, &params, &tensors, hf_dir)?;

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
    let (cfg, model, _) = crate::run::load::load_model(checkpoint, &device)?;
    let dataset = crate::run::load::open_run_data(&cfg, checkpoint)?;
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
            out.logits()?.to_dtype(DType::F32)?.contiguous()?,
        ),
    ]);
    checkpoint::save_tensors(&map, file)?;
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

    #[test]
    fn mapping_errors_name_their_file_and_keep_the_hf_prefix() {
        let tensor = ModelError::Hf("tensor `x` is missing".into());
        let err = mapping_err("the Hugging Face model.safetensors")(tensor).to_string();
        assert_eq!(
            err,
            "hugging face: the Hugging Face model.safetensors: tensor `x` is missing"
        );
        let unsupported = ModelError::Hf("unsupported: model.moe.router".into());
        assert_eq!(
            mapping_err("")(unsupported).to_string(),
            "hugging face: unsupported: model.moe.router"
        );
        let config = ModelError::Config {
            key: "model.moe.top_k".into(),
            reason: "too large".into(),
        };
        assert!(matches!(mapping_err("f")(config), TrainError::Model(_)));
    }
}
