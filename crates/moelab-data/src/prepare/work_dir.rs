//! The locked folder a prepare or merge writes into, moved into place only when it succeeds.

use std::path::{Path, PathBuf};

use crate::{DataError, Result};

use super::units::{UnitRecord, UNITS_DIR};

/// The folder a prepare writes into: the output itself when it already holds a dataset, else
/// a hidden sibling renamed to the output on success, so a failed first prepare leaves no
/// folder that looks like a dataset. Either carries the marker and is locked while it exists.
pub(super) struct WorkDir {
    pub(super) dir: PathBuf,
    /// Where `dir` is renamed to at the end (None: working in place).
    pub(super) rename_to: Option<PathBuf>,
    /// Held until the work is done (the lock file moves with a renamed folder).
    _lock: crate::dataset_dir::DatasetLock,
}

impl WorkDir {
    /// The work folder for `out`, locked (waiting for another prepare with `wait`); a folder
    /// moelab did not create is refused before anything is written.
    pub(super) fn for_output(out: &Path, wait: bool) -> Result<WorkDir> {
        use crate::dataset_dir::{check_ours, is_empty_or_absent, lock, mark, MARKER_FILE};
        if out.exists() && !out.is_dir() {
            return Err(DataError::Prepare(format!(
                "--out {} is a file; give a folder for the dataset",
                out.display()
            )));
        }
        // Twice at most: a prepare that finished while we waited turns a fresh output into
        // a dataset to work in.
        for _ in 0..2 {
            check_ours(out, "--out")?;
            if !is_empty_or_absent(out) {
                let held = lock(out, wait)?;
                if !out.join(MARKER_FILE).is_file() {
                    mark(out)?;
                }
                return Ok(WorkDir {
                    dir: out.to_path_buf(),
                    rename_to: None,
                    _lock: held,
                });
            }
            let name = out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    DataError::Prepare(format!("--out {} has no folder name", out.display()))
                })?;
            let dir = out.with_file_name(format!(".{name}.partial"));
            check_ours(&dir, "the work folder of --out")?;
            std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
            let held = lock(&dir, wait)?;
            if !is_empty_or_absent(out) || !dir.is_dir() {
                // Another prepare finished (and renamed its work folder) meanwhile.
                continue;
            }
            if !dir.join(MARKER_FILE).is_file() {
                mark(&dir)?;
            }
            return Ok(WorkDir {
                dir,
                rename_to: Some(out.to_path_buf()),
                _lock: held,
            });
        }
        Err(DataError::Prepare(format!(
            "{} changed while waiting for its lock; run again",
            out.display()
        )))
    }

    /// Moves the finished dataset into place.
    pub(super) fn finish(&self) -> Result<()> {
        let Some(out) = &self.rename_to else {
            return Ok(());
        };
        if out.is_dir() {
            // An empty folder the user made (checked when choosing the work folder).
            std::fs::remove_dir(out).map_err(|e| DataError::io(out, e))?;
        }
        std::fs::rename(&self.dir, out).map_err(|e| DataError::io(out, e))?;
        moelab_io::sync_dir(moelab_io::parent(out)).map_err(|e| DataError::io(out, e))
    }

    /// After a failure: a fresh work folder with no finished unit holding documents is
    /// removed; one with finished units is kept (hidden) so that a re-run resumes from it.
    pub(super) fn abandon(&self) {
        if self.rename_to.is_none() {
            return;
        }
        let has_work = std::fs::read_dir(self.dir.join(UNITS_DIR))
            .map(|entries| {
                entries.flatten().any(|e| {
                    std::fs::read(e.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice::<UnitRecord>(&b).ok())
                        .is_some_and(|r| r.inputs.iter().any(|i| i.documents > 0))
                })
            })
            .unwrap_or(false);
        if !has_work {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
