//! The checkpointer: when a checkpoint is due, saving and pruning, where a run resumes from, and
//! which checkpoint is known good (its weights gave a finite loss).

use std::path::{Path, PathBuf};

use candle_core::Device;
use moelab_data::MixtureStream;

#[cfg(doc)]
use super::step::Learner;
use super::step::TensorMap;
use crate::config::CheckpointConfig;
use crate::run::checkpoint::{self, Checkpoint, TrainState};
use crate::run::RunDir;
use crate::TrainError;

/// Where to resume from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest complete checkpoint of the run folder, or a fresh start if there is none.
    Auto,
    /// This checkpoint folder.
    Path(PathBuf),
}

/// Saves, prunes and finds the checkpoints of one run.
pub(crate) struct Checkpointer {
    dir: PathBuf,
    policy: CheckpointConfig,
    config_toml: String,
    /// Newest checkpoint whose weights were seen to give a finite loss and gradient.
    known_good: Option<PathBuf>,
    /// Newest checkpoint not yet followed by a finite step (its weights are unproven).
    unproven: Option<PathBuf>,
}

impl Checkpointer {
    /// The checkpointer of `run_dir`, saving runs whose resolved config is `config_toml`;
    /// `resumed_from` is the checkpoint the run continues from (unproven until a finite step).
    /// `known_good_step` is the known-good checkpoint the resumed checkpoint recorded; it is
    /// carried on while its folder is still on disk.
    pub(crate) fn new(
        run_dir: &RunDir,
        policy: CheckpointConfig,
        config_toml: String,
        resumed_from: Option<PathBuf>,
        known_good_step: Option<u64>,
    ) -> Self {
        let known_good = known_good_step
            .map(|step| run_dir.checkpoint(step))
            .filter(|dir| dir.join("state.json").is_file());
        Self {
            dir: run_dir.checkpoints(),
            policy,
            config_toml,
            known_good,
            unproven: resumed_from,
        }
    }

    /// Whether step `step` (steps completed) is a checkpoint step; never inside a non-finite
    /// streak, which would only record the streak.
    pub(crate) fn due(&self, step: u64, finite: bool) -> bool {
        self.policy.interval > 0 && step.is_multiple_of(self.policy.interval) && finite
    }

    /// Notes the outcome of a step: a finite one proves the weights it started from, which are
    /// those of the newest checkpoint when no update came in between.
    pub(crate) fn observe(&mut self, finite: bool) {
        if finite {
            if let Some(dir) = self.unproven.take() {
                self.known_good = Some(dir);
            }
        }
    }

    /// The newest checkpoint known to give a finite loss, if any.
    pub(crate) fn known_good(&self) -> Option<&Path> {
        self.known_good.as_deref()
    }

    /// Whether the newest complete checkpoint is at `step`.
    pub(crate) fn has(&self, step: u64) -> Result<bool, TrainError> {
        Ok(checkpoint::list(&self.dir)?.last().map(|(s, _)| *s) == Some(step))
    }

    /// Saves the learner's state after `state.step` steps (its tensors from
    /// [`Learner::checkpoint_tensors`]), then prunes old checkpoints (never the known-good one).
    pub(crate) fn save(
        &mut self,
        (model, moments, optimizer_step): (TensorMap, TensorMap, u64),
        state: &TrainState,
        stream: &MixtureStream,
        sequences_per_step: u64,
    ) -> Result<PathBuf, TrainError> {
        let mut state = state.clone();
        state.optimizer_step = optimizer_step;
        state.known_good_step = self.known_good.as_deref().and_then(step_of);
        state.stream = stream.state(state.step * sequences_per_step);
        let dir = checkpoint::save(&self.dir, &model, &moments, &state, &self.config_toml)?;
        self.unproven = Some(dir.clone());
        let mut spared = self.policy.milestones.clone();
        if let Some(good) = &self.known_good {
            spared.extend(
                checkpoint::list(&self.dir)?
                    .into_iter()
                    .find_map(|(s, p)| (p == *good).then_some(s)),
            );
        }
        checkpoint::prune(&self.dir, self.policy.keep_last, &spared)?;
        Ok(dir)
    }
}

/// The step a checkpoint folder is named for (`step-N`).
fn step_of(dir: &Path) -> Option<u64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse()
        .ok()
}

/// The checkpoint to resume from, loaded: for `auto`, the newest complete one (a fresh start
/// when there is none); an unreadable newest checkpoint is an error that names the newest older
/// one that loads.
pub(crate) fn resume_point(
    run_dir: &RunDir,
    resume: Option<&Resume>,
    device: &Device,
) -> Result<Option<Checkpoint>, TrainError> {
    match resume {
        None => Ok(None),
        Some(Resume::Path(path)) => checkpoint::load(path, device).map(Some),
        Some(Resume::Auto) => {
            let mut all = checkpoint::list(&run_dir.checkpoints())?;
            let Some((_, newest)) = all.pop() else {
                return Ok(None);
            };
            match checkpoint::load(&newest, device) {
                Ok(ckpt) => Ok(Some(ckpt)),
                Err(e) => {
                    let older = all
                        .iter()
                        .rev()
                        .find(|(_, p)| checkpoint::load(p, device).is_ok());
                    let hint = match older {
                        Some((_, p)) => format!(
                            "the older checkpoint {} loads: resume from it with --resume {}",
                            p.display(),
                            p.display()
                        ),
                        None => "no older checkpoint loads either".into(),
                    };
                    Err(TrainError::Checkpoint(format!(
                        "the newest checkpoint {} cannot be read ({e}); {hint}",
                        newest.display()
                    )))
                }
            }
        }
    }
}
