//! The run folder: every path inside it, the lock that gives it to one process at a time, and
//! the history of its resolved configs. No other code writes a run-folder name as a literal.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::checkpoint;
use crate::TrainError;

/// A run folder (`run.out_dir/run.name`, or `--run-dir`).
#[derive(Debug, Clone, PartialEq)]
pub struct RunDir {
    root: PathBuf,
}

/// Exclusive use of a run folder, held until dropped (the OS releases it if the process dies).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    /// True when taking the lock created the run folder: a run that fails before its first step
    /// removes it again ([`RunLock::release_unused`]).
    created: bool,
    root: PathBuf,
}

const LOCK_FILE: &str = ".lock";

/// Written into a run folder when moelab first takes it: only a folder holding it (or an older
/// build's run folder, recognised by a complete checkpoint) is ever written, cleaned or pruned.
const MARKER_FILE: &str = ".moelab-run";

impl RunDir {
    /// The run folder at `root` (nothing is touched).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The resolved config of the run (`config.toml`).
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// The config of the `n`-th earlier part of a resumed run whose config changed.
    pub fn previous_config(&self, n: usize) -> PathBuf {
        self.root.join(format!("config.previous-{n}.toml"))
    }

    /// One JSON object per logged step or evaluation.
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// TensorBoard event files (`log.tensorboard = true`).
    pub fn tensorboard(&self) -> PathBuf {
        self.root.join("tensorboard")
    }

    /// Router-activation log chunks.
    pub fn router(&self) -> PathBuf {
        self.root.join("router")
    }

    /// Evaluations: `step-N.json` and `step-N/` (the validation set's router log).
    pub fn eval(&self) -> PathBuf {
        self.root.join("eval")
    }

    /// The evaluation JSON after `step` steps.
    pub fn eval_json(&self, step: u64) -> PathBuf {
        self.eval()
            .join(format!("{}.json", checkpoint::dir_name(step)))
    }

    /// The validation set's router log of the evaluation after `step` steps.
    pub fn eval_router_log(&self, step: u64) -> PathBuf {
        self.eval().join(checkpoint::dir_name(step))
    }

    /// Complete checkpoints, `step-NNNNNNNN/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join(checkpoint::CHECKPOINTS_DIR)
    }

    /// The checkpoint folder after `step` steps (it may not exist).
    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.checkpoints().join(checkpoint::dir_name(step))
    }

    /// The ranks' progress reports of a distributed run (`.progress/rank-N.json`, see
    /// `dist::watchdog`): what a timeout reads to name the rank that stopped.
    pub fn progress(&self) -> PathBuf {
        self.root.join(".progress")
    }

    /// Where checkpoints newer than a resume point are kept when a run resumes from an older
    /// checkpoint: the abandoned continuation is set aside, never deleted.
    pub fn abandoned(&self, resumed_at: u64) -> PathBuf {
        let mut n = 1;
        loop {
            let dir = self
                .root
                .join("abandoned")
                .join(format!("after-{}-{n}", checkpoint::dir_name(resumed_at)));
            if !dir.exists() {
                return dir;
            }
            n += 1;
        }
    }

    /// Resuming from a checkpoint older than the run's newest: the checkpoints past `step`
    /// belong to a continuation that is being replaced; they are moved to `abandoned/`, never
    /// deleted. Returns where they went.
    pub fn set_aside_checkpoints_after(&self, step: u64) -> Result<Option<PathBuf>, TrainError> {
        let later: Vec<PathBuf> = checkpoint::list(&self.checkpoints())?
            .into_iter()
            .filter(|(s, _)| *s > step)
            .map(|(_, p)| p)
            .collect();
        if later.is_empty() {
            return Ok(None);
        }
        let target = self.abandoned(step);
        std::fs::create_dir_all(&target).map_err(TrainError::io(&target))?;
        for dir in later {
            let name = dir.file_name().map(PathBuf::from).unwrap_or_default();
            std::fs::rename(&dir, target.join(name)).map_err(TrainError::io(&dir))?;
        }
        let checkpoints = self.checkpoints();
        moelab_io::sync_dir(&checkpoints).map_err(TrainError::io(&checkpoints))?;
        Ok(Some(target))
    }

    /// Removes evaluations past `step` (an interrupted or abandoned continuation's), as metrics
    /// and router chunks past it are removed.
    pub fn remove_evals_after(&self, step: u64) -> Result<(), TrainError> {
        let Ok(entries) = std::fs::read_dir(self.eval()) else {
            return Ok(());
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let eval_step = name
                .strip_prefix("step-")
                .map(|n| n.trim_end_matches(".json"))
                .and_then(|n| n.parse::<u64>().ok());
            if eval_step.is_some_and(|s| s > step) {
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(TrainError::io(&path))?;
            }
        }
        Ok(())
    }

    /// Refuses a folder moelab did not make a run folder of: a checkpoint folder, a folder
    /// inside another run, or one that is not empty and holds neither the run marker nor a
    /// complete checkpoint of an older build. Nothing is written.
    fn check_ours(&self) -> Result<(), TrainError> {
        let refuse = |reason: String| {
            Err(TrainError::RunDir {
                path: self.root.clone(),
                reason,
            })
        };
        if self.root.join("state.json").is_file() || self.root.join("model.safetensors").is_file() {
            return refuse("it is a checkpoint folder, not a run folder; to continue from it pass --resume PATH with the run's own --run-dir".into());
        }
        let absolute = std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone());
        if let Some(run) = absolute
            .ancestors()
            .skip(1)
            .find(|a| a.join(MARKER_FILE).is_file())
        {
            return refuse(format!(
                "it lies inside the run folder {}; a run folder is never inside another run",
                run.display()
            ));
        }
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(());
        };
        let empty = entries.filter_map(Result::ok).next().is_none();
        let legacy = checkpoint::list(&self.checkpoints()).is_ok_and(|c| !c.is_empty());
        if empty || self.root.join(MARKER_FILE).is_file() || legacy {
            return Ok(());
        }
        refuse(format!(
            "it is not empty and moelab did not create it (no {MARKER_FILE} marker); choose a new or empty --run-dir. If it is the run folder of an older moelab, create an empty {MARKER_FILE} in it"
        ))
    }

    /// Takes the folder for this process (creating it), or fails naming the process that holds
    /// it; a refused process changes nothing.
    pub fn lock(&self) -> Result<RunLock, TrainError> {
        self.check_ours()?;
        let created = !self.root.exists();
        std::fs::create_dir_all(&self.root).map_err(TrainError::io(&self.root))?;
        let path = self.root.join(LOCK_FILE);
        // Not truncated before the lock is ours: the holder's PID must survive a refused open.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(TrainError::io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("process {pid}"),
                };
                return Err(TrainError::RunDir {
                    path: self.root.clone(),
                    reason: format!(
                        "it is in use by {holder} (lock {}); wait for that run to finish or stop it, or choose another --run-dir",
                        path.display()
                    ),
                });
            }
            Err(TryLockError::Error(source)) => return Err(TrainError::io(&path)(source)),
        }
        file.set_len(0).map_err(TrainError::io(&path))?;
        writeln!(file, "{}", std::process::id()).map_err(TrainError::io(&path))?;
        let marker = self.root.join(MARKER_FILE);
        if !marker.exists() {
            moelab_io::write_atomic(&marker, b"moelab run folder\n")
                .map_err(TrainError::io(&marker))?;
        }
        Ok(RunLock {
            _file: file,
            created,
            root: self.root.clone(),
        })
    }

    /// Checks, without writing anything, that a run with `resolved` config may use this folder:
    /// a fresh run is refused where checkpoints exist, or where another config's run has logged
    /// steps. A folder whose run failed before its first step holds neither and stays usable.
    pub fn check_usable(&self, resolved: &str, resuming: bool) -> Result<(), TrainError> {
        if resuming {
            return Ok(());
        }
        let checkpointed = !checkpoint::list(&self.checkpoints())?.is_empty();
        let logged = std::fs::metadata(self.metrics()).is_ok_and(|m| m.len() > 0);
        let existing = std::fs::read_to_string(self.config()).ok();
        if existing.is_some_and(|e| e != resolved) && (checkpointed || logged) {
            return Err(TrainError::RunDir {
                path: self.root.clone(),
                reason: "it holds another run's config.toml and results; pass --resume auto to continue that run, or choose another --run-dir".into(),
            });
        }
        if checkpointed {
            return Err(TrainError::RunDir {
                path: self.root.clone(),
                reason: "it already has checkpoints; pass --resume auto to continue, or choose another --run-dir".into(),
            });
        }
        Ok(())
    }

    /// Writes the resolved config; a different config of an earlier part of the run is kept as
    /// `config.previous-N.toml`. Called only once everything else has been validated.
    pub fn record_config(&self, resolved: &str, resuming: bool) -> Result<(), TrainError> {
        let io = TrainError::io;
        let config = self.config();
        if let Ok(existing) = std::fs::read_to_string(&config) {
            if resuming && existing != resolved {
                let mut n = 1;
                while self.previous_config(n).exists() {
                    n += 1;
                }
                let previous = self.previous_config(n);
                moelab_io::write_atomic(&previous, existing.as_bytes()).map_err(io(&previous))?;
            }
        }
        moelab_io::write_atomic(&config, resolved.as_bytes()).map_err(io(&config))
    }
}

impl RunLock {
    /// Gives up a folder this lock created when the run never started: the folder is removed
    /// if nothing but the lock file is in it.
    pub fn release_unused(self) {
        if !self.created {
            return;
        }
        let only_lock = std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .all(|e| e.file_name() == LOCK_FILE || e.file_name() == MARKER_FILE)
            })
            .unwrap_or(false);
        if only_lock {
            let _ = std::fs::remove_file(self.root.join(MARKER_FILE));
            let _ = std::fs::remove_file(self.root.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn scratch(name: &str) -> RunDir {
        let dir = std::env::temp_dir().join(format!("moelab-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        RunDir::new(dir)
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let run = scratch("lock");
        let held = run.lock().unwrap();
        // flock locks belong to the open file, so a second open in this process conflicts too.
        let err = run.lock().unwrap_err().to_string();
        assert!(
            err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        held.release_unused();
        assert!(
            !run.root().exists(),
            "an unused folder it created is removed"
        );
        let again = run.lock().unwrap();
        std::fs::write(run.config(), "x = 1\n").unwrap();
        again.release_unused();
        assert!(run.config().exists(), "a folder with content is kept");
        std::fs::remove_dir_all(run.root()).unwrap();
    }

    /// A folder of someone else's files is never taken, even when its names look like a run's;
    /// nothing in it changes. So is a checkpoint folder, and a folder inside another run.
    #[test]
    fn folders_moelab_did_not_make_are_refused_untouched() {
        let run = scratch("not-ours");
        let files = [
            "config.toml",
            "metrics.jsonl",
            "eval/step-00000010.json",
            "checkpoints/.tmp-mydata/keep.bin",
        ];
        for f in files {
            let path = run.root().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, f).unwrap();
        }
        let err = run.lock().unwrap_err().to_string();
        assert!(err.contains("moelab did not create it"), "{err}");
        assert!(!run.root().join(LOCK_FILE).exists());
        assert!(!run.root().join(MARKER_FILE).exists());
        for f in files {
            assert_eq!(std::fs::read_to_string(run.root().join(f)).unwrap(), f);
        }
        std::fs::remove_dir_all(run.root()).unwrap();

        // A run folder of ours, and a checkpoint inside it given as a run folder.
        let run = scratch("ours");
        let lock = run.lock().unwrap();
        assert!(run.root().join(MARKER_FILE).is_file());
        let ckpt = RunDir::new(run.checkpoint(20));
        std::fs::create_dir_all(ckpt.root()).unwrap();
        std::fs::write(ckpt.root().join("state.json"), "{}").unwrap();
        std::fs::write(ckpt.root().join("config.toml"), "x = 1\n").unwrap();
        let err = ckpt.lock().unwrap_err().to_string();
        assert!(err.contains("checkpoint folder"), "{err}");
        assert_eq!(std::fs::read_to_string(ckpt.config()).unwrap(), "x = 1\n");
        let nested = RunDir::new(run.root().join("sub"));
        let err = nested.lock().unwrap_err().to_string();
        assert!(err.contains("inside the run folder"), "{err}");
        assert!(!nested.root().exists());
        drop(lock);
        std::fs::remove_dir_all(run.root()).unwrap();
    }

    #[test]
    fn config_history_and_fresh_runs() {
        let run = scratch("config");
        std::fs::create_dir_all(run.root()).unwrap();
        run.record_config("a = 1\n", false).unwrap();
        // A different config in a folder whose run never logged a step is fine.
        run.check_usable("b = 2\n", false).unwrap();
        std::fs::write(run.metrics(), "{\"step\": 1}\n").unwrap();
        let err = run.check_usable("b = 2\n", false).unwrap_err().to_string();
        assert!(err.contains("another run's config.toml"), "{err}");
        run.check_usable("a = 1\n", false).unwrap();
        run.record_config("b = 2\n", true).unwrap();
        assert_eq!(std::fs::read_to_string(run.config()).unwrap(), "b = 2\n");
        assert_eq!(
            std::fs::read_to_string(run.previous_config(1)).unwrap(),
            "a = 1\n"
        );
        std::fs::remove_dir_all(run.root()).unwrap();
    }
}
