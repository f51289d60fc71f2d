//! What makes a folder a moelab dataset, and what moelab may do inside one: the marker a
//! prepare writes when it creates the folder, the lock a prepare holds while it writes, and the
//! file-name patterns of everything prepare writes (the only files it ever deletes).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::manifest::{Manifest, MANIFEST_FILE, TOKENIZER_FILE};
use crate::{DataError, Result};

/// Written into a dataset folder when moelab creates it: moelab changes files only in folders
/// that carry it (or that hold a valid manifest of an older moelab, which then gets it).
pub const MARKER_FILE: &str = ".moelab-dataset";

/// The lock a prepare or merge holds on its dataset folder (an flock; the file holds the PID).
pub const LOCK_FILE: &str = ".lock";

/// The marker's content: what the folder is and who wrote it.
fn marker_text() -> String {
    format!(
        "moelab dataset (written by moelab {}; prepare changes files only in folders holding this file)\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Whether `dir` is absent or holds nothing but a lock (a folder another prepare has just
/// created and locked, before it wrote the marker).
pub(crate) fn is_empty_or_absent(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |entries| {
        entries.flatten().all(|e| e.file_name() == LOCK_FILE)
    })
}

/// Whether moelab may write into the existing folder `dir`: it carries the marker, or it is a
/// dataset of an older moelab (a manifest that loads). Anything else
/// that is not empty is refused naming the folder and a few of its files.
pub(crate) fn check_ours(dir: &Path, option: &str) -> Result<()> {
    if dir.join(MARKER_FILE).is_file() || is_empty_or_absent(dir) {
        return Ok(());
    }
    // A dataset of an older moelab, which wrote no marker: the caller marks it once locked.
    if Manifest::load(&dir.join(MANIFEST_FILE)).is_ok() {
        return Ok(());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.truncate(5);
    Err(DataError::Prepare(format!(
        "{option} {} is a folder that moelab did not create (it holds {} and no {MARKER_FILE} marker \
         or valid {MANIFEST_FILE}); moelab writes only into a new or empty folder or a dataset it \
         prepared, so that no file of yours is changed: choose another {option}",
        dir.display(),
        names.join(", ")
    )))
}

/// Writes the marker into `dir`.
pub(crate) fn mark(dir: &Path) -> Result<()> {
    let path = dir.join(MARKER_FILE);
    moelab_io::write_atomic(&path, marker_text().as_bytes()).map_err(|e| DataError::io(&path, e))
}

/// The lock on a dataset folder, held until dropped.
#[derive(Debug)]
pub(crate) struct DatasetLock {
    _file: File,
}

/// Takes the lock of `dir` (which exists): when another process holds it, waits for it with
/// `wait`, else fails naming that process's PID.
pub(crate) fn lock(dir: &Path, wait: bool) -> Result<DatasetLock> {
    let path = dir.join(LOCK_FILE);
    let io = |e| DataError::io(&path, e);
    // Not truncated before the lock is ours: the holder's PID must survive a refused open.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) if wait => file.lock().map_err(io)?,
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_string(),
                pid => format!("process {pid}"),
            };
            return Err(DataError::Prepare(format!(
                "{} is being written by {holder} (lock {}); wait for it to finish, or prepare into another folder",
                dir.display(),
                path.display()
            )));
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DatasetLock { _file: file })
}

/// Whether `name` is a shard file prepare writes: `<unit>.<key>.<train|valid>.<NNNN>.<tokens|docs>`.
pub(crate) fn is_shard_file_name(name: &str) -> bool {
    let parts: Vec<&str> = name.rsplitn(5, '.').collect();
    // Reversed: extension, sequence, split, key, unit.
    parts.len() == 5
        && matches!(parts[0], "tokens" | "docs")
        && parts[1].len() == 4
        && parts[1].bytes().all(|b| b.is_ascii_digit())
        && matches!(parts[2], "train" | "valid")
        && parts[3].len() == 8
        && parts[3].bytes().all(|b| b.is_ascii_hexdigit())
        && crate::manifest::is_plain_name(parts[4])
}

/// Whether `name` is a temporary file moelab's atomic writes leave when killed, of a file
/// whose name satisfies `target`: `.<target>.<pid>.tmp`.
pub(crate) fn is_tmp_of(name: &str, target: impl Fn(&str) -> bool) -> bool {
    let Some(inner) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
        return false;
    };
    match inner.rsplit_once('.') {
        Some((file, pid)) => {
            !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && target(file)
        }
        None => false,
    }
}

/// Removes the temporary files a killed or failed prepare left in the dataset `dir` (its lock
/// is held, so no other prepare is writing them): hidden `.tmp` shards under `shards/`, unit
/// records under `units/`, and the manifest's and tokenizer's. Returns the files removed.
pub(crate) fn remove_leftovers(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let top = |n: &str| {
        matches!(
            n,
            MANIFEST_FILE | TOKENIZER_FILE | "tokenizer.train.json" | MARKER_FILE
        )
    };
    remove_matching(dir, &top, false, &mut removed)?;
    let unit = |n: &str| {
        n.strip_suffix(".json")
            .is_some_and(crate::manifest::is_plain_name)
    };
    remove_matching(&dir.join("units"), &unit, false, &mut removed)?;
    remove_matching(&dir.join("shards"), &is_shard_file_name, true, &mut removed)?;
    Ok(removed)
}

fn remove_matching(
    dir: &Path,
    target: &dyn Fn(&str) -> bool,
    recurse: bool,
    removed: &mut Vec<PathBuf>,
) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        if kind.is_dir() && recurse {
            remove_matching(&path, target, true, removed)?;
        } else if kind.is_file() && is_tmp_of(&name, target) {
            std::fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
            removed.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_prepare_writes_match() {
        assert!(is_shard_file_name(
            "part_jsonl.0123456789.0a1b2c3d.train.0000.tokens"
        ));
        assert!(is_shard_file_name(
            "web.abcdef0123.deadbeef.valid.0012.docs"
        ));
        for bad in [
            "mine.tokens",
            "file.bin",
            "a.0a1b2c3d.train.0000.json",
            ".x.0a1b2c3d.train.0000.docs",
        ] {
            assert!(!is_shard_file_name(bad), "{bad}");
        }
        assert!(is_tmp_of(".manifest.json.1234.tmp", |n| n == "manifest.json"));
        assert!(!is_tmp_of(".manifest.json.tmp", |n| n == "manifest.json"));
        assert!(!is_tmp_of(".mine.1234.tmp", |n| n == "manifest.json"));
    }
}
