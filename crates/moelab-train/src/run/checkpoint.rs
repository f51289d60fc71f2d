//! Checkpoints: `checkpoints/step-NNNNNNNN/` with model.safetensors, optimizer.safetensors,
//! state.json and config.toml.
//!
//! A checkpoint folder exists only when complete: everything is written into a temporary folder,
//! each file fsynced, the folder renamed into place and the parent fsynced. A crash at any moment
//! leaves the old set of checkpoints or the new one, never a half-written folder that resume
//! would pick.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use moelab_data::StreamState;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Everything besides tensors needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed (including skipped non-finite ones).
    pub step: u64,
    /// Tokens consumed over all ranks.
    pub tokens: u64,
    /// Updates the optimizer has applied (bias correction).
    pub optimizer_step: u64,
    /// Consecutive non-finite steps at the time of saving.
    pub consecutive_nonfinite: u32,
    /// Position and stage log of the data stream.
    pub stream: StreamState,
    /// The run seed; every random choice is a pure function of (seed, step), so this is the
    /// whole RNG state.
    pub seed: u64,
    /// The losses of the steps since the last metrics line, so that a run resumed between two
    /// lines logs the same interval means as one that never stopped (absent in checkpoints
    /// written before metrics logged means: an empty window).
    #[serde(default)]
    pub log_window: LossWindow,
    /// The step of the newest checkpoint known (when this one was saved) to give a finite loss,
    /// so that the NaN guard of a resumed run can still name it. Absent in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_good_step: Option<u64>,
}

/// Sums of the training losses of the applied steps since the last metrics line; a line logs
/// their mean. The sums are kept as f64 bit patterns in state.json because a JSON decimal need
/// not read back to the same f64, and a resumed run must log bit-identical means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossWindow {
    /// Applied steps summed.
    pub steps: u64,
    /// Sum of their training objectives, as `f64::to_bits`.
    pub loss_sum_bits: u64,
    /// Sum of their LM losses, as `f64::to_bits`.
    pub lm_loss_sum_bits: u64,
}

impl LossWindow {
    /// Adds one applied step's losses.
    pub fn add(&mut self, loss: f64, lm_loss: f64) {
        self.steps += 1;
        self.loss_sum_bits = (f64::from_bits(self.loss_sum_bits) + loss).to_bits();
        self.lm_loss_sum_bits = (f64::from_bits(self.lm_loss_sum_bits) + lm_loss).to_bits();
    }

    /// The mean training objective and LM loss of the window (None when it is empty), and
    /// empties it.
    pub fn take_means(&mut self) -> Option<(f64, f64)> {
        let window = std::mem::take(self);
        (window.steps > 0).then(|| {
            let n = window.steps as f64;
            (
                f64::from_bits(window.loss_sum_bits) / n,
                f64::from_bits(window.lm_loss_sum_bits) / n,
            )
        })
    }
}

impl TrainState {
    /// The state of a run before its first step, reading `stream` from its start.
    pub fn fresh(stream: &moelab_data::MixtureStream, seed: u64) -> Self {
        Self {
            step: 0,
            tokens: 0,
            optimizer_step: 0,
            consecutive_nonfinite: 0,
            stream: stream.state(0),
            seed,
            log_window: LossWindow::default(),
            known_good_step: None,
        }
    }
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its folder.
    pub dir: PathBuf,
    /// Model parameters and expert biases by name.
    pub model: HashMap<String, Tensor>,
    /// Optimizer moments by name.
    pub optimizer: HashMap<String, Tensor>,
    /// The counters.
    pub state: TrainState,
    /// The resolved config of the run that wrote it.
    pub config_toml: String,
}

/// The run folder's sub-folder holding its checkpoints (`step-N` folders).
pub const CHECKPOINTS_DIR: &str = "checkpoints";

const COMPLETE_MARKER: &str = "state.json";

/// Prefix of folders that are not (yet, or any more) checkpoints: saves in progress and
/// replaced checkpoints; removed by [`remove_partial`].
const TMP_PREFIX: &str = ".tmp-";

/// Folder name of the checkpoint after `step` steps.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn fsync(path: &Path) -> Result<(), TrainError> {
    moelab_io::sync_file(path).map_err(TrainError::io(path))
}

/// Writes a checkpoint atomically under `checkpoints_dir`; returns its folder. A checkpoint
/// already under that step's name (from a run resumed at an earlier step) is replaced: the new
/// folder is complete before the old one is moved out of the way.
pub fn save(
    checkpoints_dir: &Path,
    model: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainState,
    config_toml: &str,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(checkpoints_dir).map_err(TrainError::io(checkpoints_dir))?;
    let final_dir = checkpoints_dir.join(dir_name(state.step));
    let tmp = checkpoints_dir.join(format!(
        "{TMP_PREFIX}{}-{}",
        dir_name(state.step),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    let config_path = tmp.join("config.toml");
    std::fs::write(&config_path, config_toml).map_err(TrainError::io(&config_path))?;
    fsync(&config_path)?;
    let tensors = |name: &str, map: &HashMap<String, Tensor>| -> Result<(), TrainError> {
        let path = tmp.join(name);
        save_tensors(map, &path)?;
        fsync(&path)
    };
    tensors("model.safetensors", model)?;
    tensors("optimizer.safetensors", optimizer)?;
    // state.json last: its presence marks the folder complete.
    let state_path = tmp.join(COMPLETE_MARKER);
    let json = serde_json::to_string_pretty(state)
        .map_err(|e| TrainError::Checkpoint(format!("serialising state: {e}")))?;
    std::fs::write(&state_path, json).map_err(TrainError::io(&state_path))?;
    fsync(&state_path)?;
    fsync(&tmp)?;
    // Anything under the final name (an older run's checkpoint of this step, or an incomplete
    // folder copied by hand) is moved aside first and deleted only once the new one is in place.
    let replaced = checkpoints_dir.join(format!(
        "{TMP_PREFIX}replaced-{}-{}",
        dir_name(state.step),
        std::process::id()
    ));
    let had_old = final_dir.exists();
    if had_old {
        std::fs::rename(&final_dir, &replaced).map_err(TrainError::io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(TrainError::io(&final_dir))?;
    fsync(checkpoints_dir)?;
    if had_old {
        std::fs::remove_dir_all(&replaced).map_err(TrainError::io(&replaced))?;
    }
    Ok(final_dir)
}

/// Writes `map` as safetensors at `path`, with the permissions every other file of the run gets
/// (safetensors writes through a private temporary file, mode 0600).
pub fn save_tensors(map: &HashMap<String, Tensor>, path: &Path) -> Result<(), TrainError> {
    candle_core::safetensors::save(map, path)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    moelab_io::give_default_permissions(path).map_err(TrainError::io(path))
}

/// Complete checkpoints under `checkpoints_dir`, oldest first.
pub fn list(checkpoints_dir: &Path) -> Result<Vec<(u64, PathBuf)>, TrainError> {
    if !checkpoints_dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(checkpoints_dir).map_err(TrainError::io(checkpoints_dir))? {
        let path = entry.map_err(TrainError::io(checkpoints_dir))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step {
            if path.join(COMPLETE_MARKER).is_file() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Removes leftovers of interrupted saves (`.tmp-*` folders).
pub fn remove_partial(checkpoints_dir: &Path) -> Result<(), TrainError> {
    if !checkpoints_dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(checkpoints_dir).map_err(TrainError::io(checkpoints_dir))? {
        let path = entry.map_err(TrainError::io(checkpoints_dir))?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(TMP_PREFIX))
        {
            std::fs::remove_dir_all(&path).map_err(TrainError::io(&path))?;
        }
    }
    Ok(())
}

/// Deletes all but the newest `keep_last` complete checkpoints, sparing `milestones`; the newest
/// complete checkpoint is never deleted. Returns the deleted folders.
pub fn prune(
    checkpoints_dir: &Path,
    keep_last: usize,
    milestones: &[u64],
) -> Result<Vec<PathBuf>, TrainError> {
    let all = list(checkpoints_dir)?;
    let keep_from = all.len().saturating_sub(keep_last.max(1));
    let mut removed = Vec::new();
    for (step, path) in &all[..keep_from] {
        if !milestones.contains(step) {
            std::fs::remove_dir_all(path).map_err(TrainError::io(path))?;
            removed.push(path.clone());
        }
    }
    Ok(removed)
}

/// Resolves a checkpoint argument: a checkpoint folder as is, or a run folder's newest
/// complete checkpoint.
pub fn resolve(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join(COMPLETE_MARKER).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(TrainError::Checkpoint(format!(
            "{} does not exist",
            path.display()
        )));
    }
    if let Some((_, newest)) = list(&path.join(CHECKPOINTS_DIR))?.pop() {
        return Ok(newest);
    }
    Err(TrainError::Checkpoint(format!(
        "{} is neither a complete checkpoint folder (no {COMPLETE_MARKER}) nor a run folder with one under checkpoints/",
        path.display()
    )))
}

/// Refuses a `step-N` folder whose state.json records another step (a folder renamed or copied
/// by hand): resuming from it would number the steps, the schedule and the data position after
/// one of the two while the other names it.
fn check_step_matches_name(dir: &Path, state: &TrainState) -> Result<(), TrainError> {
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse::<u64>().ok());
    match named {
        Some(step) if step != state.step => Err(TrainError::Checkpoint(format!(
            "{}: its {COMPLETE_MARKER} records step {} but the folder is named for step {step}; the two disagree \
             (was the folder renamed or its {COMPLETE_MARKER} copied from another checkpoint?); rename the folder to {} \
             or restore the checkpoint's own {COMPLETE_MARKER}",
            dir.display(),
            state.step,
            dir_name(state.step)
        ))),
        _ => Ok(()),
    }
}

/// Reads a checkpoint folder (tensors onto `device`).
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint, TrainError> {
    if !dir.exists() {
        return Err(TrainError::Checkpoint(format!(
            "{} does not exist",
            dir.display()
        )));
    }
    if !dir.join(COMPLETE_MARKER).is_file() {
        return Err(TrainError::Checkpoint(format!(
            "{} is not a complete checkpoint (no {COMPLETE_MARKER})",
            dir.display()
        )));
    }
    let tensors = |name: &str| {
        let path = dir.join(name);
        candle_core::safetensors::load(&path, device)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))
    };
    let state_path = dir.join(COMPLETE_MARKER);
    let state_text = std::fs::read_to_string(&state_path).map_err(TrainError::io(&state_path))?;
    let state: TrainState = serde_json::from_str(&state_text)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", state_path.display())))?;
    check_step_matches_name(dir, &state)?;
    let config_path = dir.join("config.toml");
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        model: tensors("model.safetensors")?,
        optimizer: tensors("optimizer.safetensors")?,
        state,
        config_toml: std::fs::read_to_string(&config_path).map_err(TrainError::io(&config_path))?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            tokens: step * 10,
            optimizer_step: step,
            consecutive_nonfinite: 0,
            stream: StreamState {
                sequences_consumed: step,
                stages: Vec::new(),
                source_mixture: Default::default(),
                fingerprint: "f".into(),
            },
            seed: 1,
            log_window: LossWindow::default(),
            known_good_step: None,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moelab-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn save_load_list_and_prune() {
        let dir = temp_dir("cycle");
        let t = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let model = HashMap::from([("w".to_string(), t.clone())]);
        let opt = HashMap::from([("m.w".to_string(), t)]);
        for step in [2, 4, 6, 8] {
            save(&dir, &model, &opt, &state(step), "x = 1\n").unwrap();
        }
        // A partial folder (crash mid-save) and a folder without the marker are ignored.
        std::fs::create_dir_all(dir.join(".tmp-step-00000010-1")).unwrap();
        std::fs::create_dir_all(dir.join("step-00000012")).unwrap();
        let steps: Vec<u64> = list(&dir).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![2, 4, 6, 8]);
        let ckpt = load(&list(&dir).unwrap()[3].1, &Device::Cpu).unwrap();
        assert_eq!(ckpt.state, state(8));
        assert_eq!(ckpt.model["w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);

        let removed = prune(&dir, 2, &[2]).unwrap();
        assert_eq!(removed, vec![dir.join("step-00000004")]);
        let steps: Vec<u64> = list(&dir).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![2, 6, 8]);
        // keep_last = 0 still keeps the newest complete checkpoint.
        prune(&dir, 0, &[]).unwrap();
        let steps: Vec<u64> = list(&dir).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![8]);
        remove_partial(&dir).unwrap();
        assert!(!dir.join(".tmp-step-00000010-1").exists());
        let err = load(&dir.join("step-00000012"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a complete checkpoint"), "{err}");
        // A folder named for another step than its state.json records says that they disagree.
        std::fs::rename(dir.join("step-00000008"), dir.join("step-00000009")).unwrap();
        let err = load(&dir.join("step-00000009"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("records step 8")
                && err.contains("named for step 9")
                && err.contains("disagree")
                && !err.contains("global_batch_tokens"),
            "{err}"
        );
    }
}
