//! What every moelab crate shares: one atomic-write helper (temp file, fsync file and folder,
//! rename) and [`rng`], the one seeded generator. The helpers here return plain `io::Error`s:
//! every crate's error type attaches the path it was writing (one constructor per error type).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub mod rng;

/// The temporary name `path` is written under before its rename: hidden (a leading dot, so no
/// reader's file pattern picks it up), in the same folder, tagged with the process id.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` so that readers see the old file or the complete new one, never a
/// part: a temporary file beside it, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |out| out.write_all(bytes))
}

/// [`write_atomic`] for content produced by a writer (buffered).
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut out = io::BufWriter::new(std::fs::File::create(&tmp)?);
        fill(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: the error already names the real problem.
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(parent(path))
}

/// Gives `path` the permissions a file newly created beside it gets (the process's umask),
/// for files written by a library through a private temporary file (safetensors writes 0600).
pub fn give_default_permissions(path: &Path) -> io::Result<()> {
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let probe = path.with_file_name(format!(".{name}.{}.mode", std::process::id()));
    let permissions = std::fs::File::create(&probe).and_then(|f| f.metadata());
    let _ = std::fs::remove_file(&probe);
    std::fs::set_permissions(path, permissions?.permissions())
}

/// Flushes a folder's entries (a rename into it, a new file) to disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Flushes a file's content to disk.
pub fn sync_file(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// The folder holding `path` (`.` for a bare file name).
pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn writes_replace_whole_files_and_errors_name_the_path() {
        let dir = std::env::temp_dir().join(format!("moelab-io-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        // A failing writer leaves the old file and no temporary behind.
        let err = write_atomic_with(&path, |_| Err(io::Error::other("disk full"))).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let missing = dir.join("no/such/folder/b.json");
        assert!(write_atomic(&missing, b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[cfg(unix)]
    fn default_permissions_are_those_of_a_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("moelab-io-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (private, plain) = (dir.join("private"), dir.join("plain"));
        std::fs::write(&private, b"x").unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&plain, b"x").unwrap();
        give_default_permissions(&private).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&private), mode(&plain));
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            2,
            "the probe is removed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
