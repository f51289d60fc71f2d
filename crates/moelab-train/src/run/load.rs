//! Loading what a run folder holds: the model's named parameters and tensors, restoring a
//! checkpoint into a model, and opening the run's dataset.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use moelab_data::Dataset;
use moelab_model::MoeTransformer;

use super::checkpoint;
use crate::{Config, TrainError};

/// Trainable parameters by name, sorted.
pub fn named_params(varmap: &VarMap) -> Result<Vec<(String, Var)>, TrainError> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| TrainError::Checkpoint("parameter map lock poisoned".into()))?;
    let mut params: Vec<(String, Var)> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(params)
}

/// Parameters and expert biases as saved in model.safetensors.
pub fn model_tensors(params: &[(String, Var)], model: &MoeTransformer) -> HashMap<String, Tensor> {
    params
        .iter()
        .cloned()
        .chain(model.expert_biases())
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect()
}

/// Loads checkpoint tensors into the model; every tensor must exist with the right shape and
/// nothing may be left over, and the error names the tensor otherwise.
pub fn restore_model(
    model: &MoeTransformer,
    params: &[(String, Var)],
    saved: &HashMap<String, Tensor>,
    dir: &Path,
) -> Result<(), TrainError> {
    let wanted: Vec<(String, Var)> = params
        .iter()
        .cloned()
        .chain(model.expert_biases())
        .collect();
    for (name, var) in &wanted {
        let tensor = saved.get(name).ok_or_else(|| {
            TrainError::Checkpoint(format!(
                "{}: model.safetensors lacks tensor `{name}` that the config needs",
                dir.display()
            ))
        })?;
        if tensor.dims() != var.dims() {
            return Err(TrainError::Checkpoint(format!(
                "{}: tensor `{name}` has shape {:?} but the config needs {:?}",
                dir.display(),
                tensor.dims(),
                var.dims()
            )));
        }
        var.set(&tensor.to_dtype(var.dtype())?)?;
    }
    if let Some(extra) = saved.keys().find(|k| !wanted.iter().any(|(n, _)| n == *k)) {
        return Err(TrainError::Checkpoint(format!(
            "{}: tensor `{extra}` in model.safetensors has no place in the configured model",
            dir.display()
        )));
    }
    Ok(())
}

/// Loads a checkpoint's model for evaluation: its own config, its weights.
pub fn load_model(
    dir: &Path,
    device: &Device,
) -> Result<(Config, MoeTransformer, checkpoint::Checkpoint), TrainError> {
    let ckpt = checkpoint::load(dir, device)?;
    let config_path = dir.join("config.toml");
    let cfg = Config::load(&config_path, &[])?;
    let (model, varmap) = MoeTransformer::init(&cfg.model, cfg.run.seed, DType::F32, device)?;
    restore_model(&model, &named_params(&varmap)?, &ckpt.model, dir)?;
    Ok((cfg, model, ckpt))
}

/// Opens the dataset of the run that wrote `checkpoint`, for evaluating or tracing it. A relative
/// `data.dataset` is relative to the folder the run was started from; from anywhere else it is
/// missing, which is said as such (rather than preparing a new dataset in the wrong place).
pub fn open_run_data(cfg: &Config, checkpoint: &Path) -> Result<Dataset, TrainError> {
    let dataset = &cfg.data.dataset;
    if dataset.is_relative() && !dataset.exists() {
        let cwd = std::env::current_dir().unwrap_or_default();
        return Err(TrainError::Argument(format!(
            "{}: its run's data.dataset = \"{}\" is relative to the folder the run was started from, and {} has no such folder; run this command from that folder, or make data.dataset absolute in {}",
            checkpoint.display(),
            dataset.display(),
            cwd.display(),
            checkpoint.join("config.toml").display()
        )));
    }
    Ok(moelab_data::ensure_prepared(&cfg.data)?)
}
