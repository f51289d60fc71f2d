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
    std::fs::write(path, text + "\n").map_err(TrainError::io(path))
}

/// Marks a temporary export/import folder as moelab's (what the next run's cleanup checks).
const TMP_MARKER: &str = ".moelab-tmp";

/// Files an export or import writes into its temporary folder (a leftover holding anything
/// else is not removed).
const TMP_CONTENT: [&str; 9] = [
    TMP_MARKER,
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.toml",
    "ckpt",
];

/// A sibling temporary folder of `out`, created empty and marked; leftovers of killed
/// exports or imports into the same `out` are removed first.
fn temp_sibling(out: &Path) -> Result<PathBuf, TrainError> {
    let name = out.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        TrainError::Argument(format!("--out {}: not a folder name", out.display()))
    })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(TrainError::io(&parent))?;
    remove_stale_temps(&parent, name);
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    let marker = tmp.join(TMP_MARKER);
    std::fs::write(&marker, b"moelab export/import in progress\n")
        .map_err(TrainError::io(&marker))?;
    Ok(tmp)
}

/// Removes `.tmp-<name>-<pid>` folders in `parent` left by killed moelab exports or imports:
/// only when that process is gone (Linux: no /proc/<pid>) and the folder holds nothing but
/// what an export or import writes. Best effort: a leftover that cannot be removed stays.
fn remove_stale_temps(parent: &Path, name: &str) {
    let prefix = format!(".tmp-{name}-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        let is_pid = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
        let gone = Path::new("/proc/self").exists() && !Path::new("/proc").join(pid).exists();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !(is_pid && gone && is_dir) {
            continue;
        }
        let path = entry.path();
        let only_ours = std::fs::read_dir(&path).is_ok_and(|inner| {
            inner
                .flatten()
                .all(|e| TMP_CONTENT.iter().any(|n| e.file_name() == *n))
        });
        if only_ours {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
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

/// Exports the checkpoint folder `checkpoint` as a Hugging Face model folder `out`, with the
/// run's tokenizer unless `with_tokenizer` is false; a tokenizer that cannot be found is an
/// error (a model folder without it does not load with `AutoTokenizer`).
pub fn export(
    checkpoint: &Path,
    out: &Path,
    with_tokenizer: bool,
) -> Result<ExportSummary, TrainError> {
    refuse_existing(out)?;
    let cfg = Config::load(&checkpoint.join("config.toml"), &[])?;
    let arch = choose_arch(&cfg.model).map_err(mapping_err(""))?;
    let model_path = checkpoint.join("model.safetensors");
    let model = candle_core::safetensors::load(&model_path, &Device::Cpu)
        .map_err(|e| hf_err(format!("{}: {e}", model_path.display())))?;
    let tensors = to_hf_tensors(&cfg.model, arch, &model)
        .map_err(mapping_err("the checkpoint's model.safetensors"))?;

    // Where transformers' router_aux_loss_coef cannot mean what aux_loss_coef meant.
    let mut notes = moelab_model::hf::aux_loss_notes(&cfg.model);
    let dataset = match with_tokenizer {
        true => Some(moelab_data::Dataset::open(&cfg.data.dataset)),
        false => None,
    };
    let (tokens, tokenizer) = match &dataset {
        Some(Ok(ds)) => (
            SpecialTokens {
                eos_id: Some(ds.eos_id()),
            },
            Some((
                ds.tokenizer_path(),
                ds.manifest().tokenizer.eos_token.clone(),
            )),
        ),
        Some(Err(e)) => {
            return Err(TrainError::Argument(format!(
                "cannot export the tokenizer: the run's dataset {}{} cannot be opened ({e}); run from \
                 the folder the run was started in, or pass --no-tokenizer to export the model alone",
                cfg.data.dataset.display(),
                moelab_data::relative_to_cwd(&cfg.data.dataset)
            )))
        }
        None => {
            notes.push("no tokenizer exported (--no-tokenizer)".into());
            (SpecialTokens::default(), None)
        }
    };

    let tmp = temp_sibling(out)?;
    let result = (|| -> Result<(), TrainError> {
        let config_path = tmp.join("config.json");
        let config_text = HfConfig::new(&cfg.model, arch, &tokens)
            .to_json()
            .map_err(mapping_err(""))?;
        std::fs::write(&config_path, config_text).map_err(TrainError::io(&config_path))?;
        let path = tmp.join("model.safetensors");
        checkpoint::save_tensors(&tensors, &path)?;
        if let Some((src, eos)) = &tokenizer {
            let dst = tmp.join("tokenizer.json");
            std::fs::copy(src, &dst).map_err(TrainError::io(src))?;
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
        let marker = tmp.join(TMP_MARKER);
        std::fs::remove_file(&marker).map_err(TrainError::io(&marker))?;
        std::fs::rename(&tmp, out).map_err(TrainError::io(out))
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
/// Every shard the index names must be a plain file name in `dir` (never `../x` or an
/// absolute path), and every file read a regular file: a FIFO or a device is named as such.
pub fn load_hf_tensors(dir: &Path) -> Result<HashMap<String, Tensor>, TrainError> {
    let load = |path: &Path| {
        check_regular_file(path)?;
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| hf_err(format!("{}: {e}", path.display())))
    };
    let single = dir.join("model.safetensors");
    // Present in any form (a link to /dev/zero is not `is_file`): say what it is.
    if std::fs::symlink_metadata(&single).is_ok() {
        return load(&single);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if std::fs::symlink_metadata(&index_path).is_ok() {
        check_regular_file(&index_path)?;
    }
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
    // Checked before any is read: the index may come from anyone.
    if let Some(bad) = shards.iter().find(|s| !is_plain_file_name(s)) {
        return Err(hf_err(format!(
            "{}: weight_map names `{bad}`, not a file name inside {}; a model's index lists only its \
             own shard files (model-00001-of-00002.safetensors): refusing to read outside the folder",
            index_path.display(),
            dir.display()
        )));
    }
    let mut all = HashMap::new();
    for shard in shards {
        all.extend(load(&dir.join(shard))?);
    }
    Ok(all)
}

/// One plain file name: no folder separator, not `.` or `..`, not absolute, not empty.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

/// A file about to be read whole is a regular file (links followed); a FIFO, a socket or a
/// device (a link to /dev/zero) would block or never end, so it gets a message saying what it is.
fn check_regular_file(path: &Path) -> Result<(), TrainError> {
    let meta = std::fs::metadata(path).map_err(TrainError::io(path))?;
    if meta.is_file() {
        return Ok(());
    }
    let what = special_kind(&meta);
    let link = std::fs::read_link(path)
        .map(|t| format!(" (a link to {})", t.display()))
        .unwrap_or_default();
    Err(hf_err(format!(
        "{}{link} is {what}, not a regular file; a Hugging Face model folder holds its weights in \
         regular .safetensors files",
        path.display()
    )))
}

/// What kind of non-regular file `meta` describes, in words.
fn special_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() {
            return "a character device (such as /dev/zero)";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// The layer and expert counts config.json claims must be those of the tensors present,
/// checked before anything is sized by them (a claimed 1e9 layers would otherwise allocate
/// names and buffers for each before the first missing tensor is noticed).
fn check_counts_against_tensors(
    cfg: &ModelConfig,
    hf: &HashMap<String, Tensor>,
    cfg_file: &str,
) -> Result<(), TrainError> {
    // Largest index after `marker` in any tensor name, plus one (0 when none has it).
    let count_after = |marker: &str| -> usize {
        hf.keys()
            .filter_map(|name| {
                let rest = &name[name.find(marker)? + marker.len()..];
                let digits = rest.split('.').next()?;
                digits.parse::<usize>().ok()
            })
            .map(|i| i.saturating_add(1))
            .max()
            .unwrap_or(0)
    };
    let layers = count_after("model.layers.");
    if layers != cfg.n_layers {
        return Err(hf_err(format!(
            "{cfg_file}: num_hidden_layers = {} but the weights hold {layers} layers \
             (model.layers.0 ... model.layers.{}); the config does not describe these weights",
            cfg.n_layers,
            layers.saturating_sub(1)
        )));
    }
    let fused = hf
        .iter()
        .find(|(name, _)| name.ends_with(".experts.gate_up_proj"))
        .and_then(|(_, t)| t.dims().first().copied());
    let experts = fused.unwrap_or_else(|| count_after(".experts."));
    if experts != cfg.moe.n_experts {
        return Err(hf_err(format!(
            "{cfg_file}: the config claims {} experts per layer but the weights hold {experts}; \
             the config does not describe these weights",
            cfg.moe.n_experts
        )));
    }
    Ok(())
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
    /// Where the imported `router_aux_loss_coef` cannot mean what `aux_loss_coef` means.
    pub notes: Vec<String>,
}

/// Imports the Hugging Face folder `hf_dir` as a step-0 checkpoint folder `out`, whose
/// config.toml is `run_config` with `[model]` replaced by the one config.json describes.
pub fn import(hf_dir: &Path, out: &Path, run_config: &Path) -> Result<ImportSummary, TrainError> {
    refuse_existing(out)?;
    let cfg_path = hf_dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(TrainError::io(&cfg_path))?;
    let cfg_file = cfg_path.display().to_string();
    let hf_config = HfConfig::from_json(&text).map_err(mapping_err(&cfg_file))?;
    let base = Config::load(run_config, &[])?;
    let (arch, model_cfg) = hf_config
        .to_model_config(Some(&base.model))
        .map_err(mapping_err(""))?;
    let hf = load_hf_tensors(hf_dir)?;
    check_counts_against_tensors(&model_cfg, &hf, &cfg_file)?;
    let tensors = from_hf_tensors(&model_cfg, arch, &hf)
        .map_err(mapping_err("the Hugging Face model.safetensors"))?;

    // The run config with the derived [model]; loading it again runs every cross-section check.
    let run_text = std::fs::read_to_string(run_config).map_err(TrainError::io(run_config))?;
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
    let result = (|| -> Result<Config, TrainError> {
        let merged_path = tmp.join("config.toml");
        let merged = toml::to_string_pretty(&table)
            .map_err(|e| hf_err(format!("serialising the run config: {e}")))?;
        std::fs::write(&merged_path, merged).map_err(TrainError::io(&merged_path))?;
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
        // A config with expert_bias = true gets zero biases: HF routers have none, and a zero
        // bias selects the same experts (state, not parameters: no optimizer moments).
        let mut model_tensors = tensors.clone();
        for (name, bias) in model.expert_biases() {
            let zeros = Tensor::zeros(bias.dims(), DType::F32, &Device::Cpu)?;
            model_tensors.insert(name, zeros);
        }
        crate::run::load::restore_model(&model, &params, &model_tensors, hf_dir)?;

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
            &model_tensors,
            &optimizer,
            &state,
            &cfg.to_toml(),
        )?;
        std::fs::rename(&written, out).map_err(TrainError::io(out))?;
        Ok(cfg)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    let cfg = result?;
    Ok(ImportSummary {
        dir: out.to_path_buf(),
        arch,
        notes: moelab_model::hf::aux_loss_notes(&cfg.model),
        model: cfg.model,
    })
}

/// What `moelab eval --dump-logits` wrote.
#[derive(Debug, Clone)]
pub struct DumpSummary {
    /// Sequences (one per domain that has a validation sequence).
    pub sequences: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// The domains, in row order.
    pub domains: Vec<String>,
}

/// Writes the logits of the checkpoint's model on the first validation sequence of every domain
/// that has one (at most `tokens` tokens each; [`DumpSummary::domains`] names the rows) to `file`: `input_ids` I64 (B, T), `logits` F32 (B, T, V).
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
    let mut domains = Vec::new();
    // A domain whose validation split holds no whole sequence has no row.
    let plan = dataset.validation_plan(cfg.data.seq_len, cfg.data.seq_len as u64);
    for (d, domain) in dataset.domains().iter().enumerate() {
        if plan.get(d).is_some_and(|p| p.shortfall.is_some()) {
            continue;
        }
        let batches =
            dataset.validation_batches(d, cfg.data.seq_len, cfg.data.seq_len as u64, 1)?;
        let first = batches.first().ok_or_else(|| {
            TrainError::Argument(format!("domain `{domain}` has no validation sequence"))
        })?;
        domains.push(domain.clone());
        let sequence = first.tokens.get(..seq_len).ok_or_else(|| {
            TrainError::Argument(format!(
                "domain `{domain}`: validation sequence shorter than {seq_len} tokens"
            ))
        })?;
        ids.extend_from_slice(sequence);
    }
    let b = domains.len();
    if b == 0 {
        return Err(TrainError::Argument(format!(
            "{}: no domain of the dataset has a validation sequence of {} tokens",
            checkpoint.display(),
            cfg.data.seq_len
        )));
    }
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

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moelab-hf-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("hf")).unwrap();
        dir
    }

    #[test]
    fn an_index_naming_files_outside_the_model_folder_is_refused_unread() {
        let dir = scratch("index");
        let victim = dir.join("victim.safetensors");
        let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        checkpoint::save_tensors(&HashMap::from([("x".to_string(), t)]), &victim).unwrap();
        for target in [
            "../victim.safetensors".to_string(),
            victim.display().to_string(),
        ] {
            let index = json!({"weight_map": {"model.embed_tokens.weight": target}});
            write_json(&dir.join("hf/model.safetensors.index.json"), &index).unwrap();
            let err = load_hf_tensors(&dir.join("hf")).unwrap_err().to_string();
            assert!(
                err.contains(&target) && err.contains("refusing to read outside"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[cfg(unix)]
    fn a_fifo_or_a_device_as_the_weights_is_named_for_what_it_is() {
        let dir = scratch("special");
        let weights = dir.join("hf/model.safetensors");
        std::os::unix::fs::symlink("/dev/zero", &weights).unwrap();
        let err = load_hf_tensors(&dir.join("hf")).unwrap_err().to_string();
        assert!(
            err.contains("character device") && err.contains("/dev/zero"),
            "{err}"
        );
        std::fs::remove_file(&weights).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&weights).status();
        if made.is_ok_and(|s| s.success()) {
            let err = load_hf_tensors(&dir.join("hf")).unwrap_err().to_string();
            assert!(err.contains("FIFO"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn claimed_layer_and_expert_counts_are_checked_against_the_tensors_first() {
        let cfg: ModelConfig = toml::from_str(
            "vocab_size = 16\nd_model = 8\nn_layers = 1000000000\nn_heads = 2\nmax_seq_len = 8\n\
             [moe]\nn_experts = 2\ntop_k = 1\nexpert_ff = 8\n",
        )
        .unwrap();
        let t = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let mut hf = HashMap::new();
        for name in [
            "model.layers.0.mlp.experts.0.up_proj.weight",
            "model.layers.0.mlp.experts.1.up_proj.weight",
            "model.layers.1.mlp.experts.1.up_proj.weight",
        ] {
            hf.insert(name.to_string(), t.clone());
        }
        let err = check_counts_against_tensors(&cfg, &hf, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("num_hidden_layers = 1000000000") && err.contains("2 layers"),
            "{err}"
        );
        let cfg = ModelConfig { n_layers: 2, ..cfg };
        assert!(check_counts_against_tensors(&cfg, &hf, "config.json").is_ok());
        let mut many = cfg.clone();
        many.moe.n_experts = 64;
        let err = check_counts_against_tensors(&many, &hf, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("64 experts") && err.contains("hold 2"),
            "{err}"
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn leftover_temporary_folders_of_dead_processes_are_removed_when_they_hold_only_ours() {
        let dir = scratch("temps");
        let ours = dir.join(".tmp-out-999999999");
        std::fs::create_dir_all(ours.join("ckpt")).unwrap();
        std::fs::write(ours.join("config.json"), "{}").unwrap();
        let theirs = dir.join(".tmp-out-999999998");
        std::fs::create_dir_all(&theirs).unwrap();
        std::fs::write(theirs.join("notes.txt"), "mine").unwrap();
        let live = dir.join(format!(".tmp-out-{}", std::process::id()));
        std::fs::create_dir_all(&live).unwrap();
        let tmp = temp_sibling(&dir.join("out")).unwrap();
        assert_eq!(tmp, live);
        assert!(!ours.exists(), "a dead export's leftover is removed");
        assert!(
            theirs.join("notes.txt").is_file(),
            "a folder with other files is kept"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
