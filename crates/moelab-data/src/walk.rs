//! Walking corpus folders with a policy for symbolic links: a link that resolves outside the
//! input folder is skipped (unless allowed), a link to a folder that holds it (a loop) is
//! skipped at the link, and a file or folder reached twice is read once. Every skipped link is
//! reported with its target.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::{DataError, Result};

/// Why a link (or a second path to the same file) was not followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkSkip {
    /// It resolves outside the input folder (allowed with `--follow-outside-links`).
    Outside,
    /// It points at a folder that contains the link: following it would never end.
    Loop,
    /// Its target does not exist.
    Broken,
    /// Its target was already read through another path.
    Duplicate,
}

impl LinkSkip {
    /// The reason in words, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            LinkSkip::Outside => {
                "resolves outside the input folder (pass --follow-outside-links to read it)"
            }
            LinkSkip::Loop => "points at a folder that contains it (a loop)",
            LinkSkip::Broken => "its target does not exist",
            LinkSkip::Duplicate => "its target was already read through another path (read once)",
        }
    }
}

/// A symbolic link (or second path) that `prepare` did not follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLink {
    /// The link, as reached from the input.
    pub link: PathBuf,
    /// What it resolves to (as written in the link when it does not resolve).
    pub target: PathBuf,
    /// Why it was skipped.
    pub reason: LinkSkip,
}

/// One usable entry of a folder.
pub(crate) enum Entry {
    /// A folder to descend into.
    Dir(PathBuf),
    /// A file.
    File(PathBuf),
}

/// The walk's state across every input: what was read, and what was skipped.
pub(crate) struct Walker {
    allow_outside: bool,
    /// The input folder being walked, resolved.
    root: PathBuf,
    dirs: HashSet<PathBuf>,
    files: HashSet<PathBuf>,
    /// Links not followed, in walk order.
    pub(crate) skipped: Vec<SkippedLink>,
}

impl Walker {
    /// A walker; `allow_outside` follows links that leave the input folder.
    pub(crate) fn new(allow_outside: bool) -> Self {
        Walker {
            allow_outside,
            root: PathBuf::new(),
            dirs: HashSet::new(),
            files: HashSet::new(),
            skipped: Vec::new(),
        }
    }

    /// Starts walking the input folder `root`; false when it was already walked.
    pub(crate) fn enter_root(&mut self, root: &Path) -> Result<bool> {
        self.root = std::fs::canonicalize(root).map_err(|e| DataError::io(root, e))?;
        Ok(self.dirs.insert(self.root.clone()))
    }

    /// Whether the input file `path` is read for the first time (a file given twice, or
    /// inside a folder also given, is read once).
    pub(crate) fn first_visit(&mut self, path: &Path) -> Result<bool> {
        let real = std::fs::canonicalize(path).map_err(|e| DataError::io(path, e))?;
        Ok(self.files.insert(real))
    }

    /// The entries of `dir`, sorted by path, with the link policy applied.
    pub(crate) fn entries(&mut self, dir: &Path) -> Result<Vec<Entry>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| DataError::io(dir, e))?
            .map(|e| e.map(|e| e.path()).map_err(|err| DataError::io(dir, err)))
            .collect::<Result<_>>()?;
        paths.sort();
        let here = std::fs::canonicalize(dir).map_err(|e| DataError::io(dir, e))?;
        // Plain entries claim their files and folders before links do, so a link to a file of
        // this folder is the path skipped, whatever the names' order.
        let mut slots: Vec<Option<Entry>> = Vec::with_capacity(paths.len());
        let mut links = Vec::new();
        for (i, path) in paths.into_iter().enumerate() {
            let meta = std::fs::symlink_metadata(&path).map_err(|e| DataError::io(&path, e))?;
            if meta.file_type().is_symlink() {
                slots.push(None);
                links.push((i, path));
            } else {
                slots.push(self.entry(&here, path)?);
            }
        }
        for (i, path) in links {
            slots[i] = self.entry(&here, path)?;
        }
        Ok(slots.into_iter().flatten().collect())
    }

    /// One entry of the folder whose resolved path is `here`, or None when it is skipped.
    fn entry(&mut self, here: &Path, path: PathBuf) -> Result<Option<Entry>> {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| DataError::io(&path, e))?;
        let is_link = meta.file_type().is_symlink();
        let real = match std::fs::canonicalize(&path) {
            Ok(real) => real,
            Err(_) if is_link => {
                let target = std::fs::read_link(&path).unwrap_or_default();
                return Ok(self.skip(path, target, LinkSkip::Broken));
            }
            Err(e) => return Err(DataError::io(&path, e)),
        };
        if is_link && !self.allow_outside && !real.starts_with(&self.root) {
            return Ok(self.skip(path, real, LinkSkip::Outside));
        }
        if real.is_dir() {
            if is_link && here.starts_with(&real) {
                return Ok(self.skip(path, real, LinkSkip::Loop));
            }
            if !self.dirs.insert(real.clone()) {
                return Ok(self.skip(path, real, LinkSkip::Duplicate));
            }
            return Ok(Some(Entry::Dir(path)));
        }
        if !self.files.insert(real.clone()) {
            return Ok(self.skip(path, real, LinkSkip::Duplicate));
        }
        Ok(Some(Entry::File(path)))
    }

    fn skip(&mut self, link: PathBuf, target: PathBuf, reason: LinkSkip) -> Option<Entry> {
        self.skipped.push(SkippedLink {
            link,
            target,
            reason,
        });
        None
    }
}
