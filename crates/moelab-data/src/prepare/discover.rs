//! Discovery: the inputs (corpus folders, domain and source folders, record files) walked into
//! units, and the slice of the units that one `--part i/N` prepares.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::hash::sha256_hex;
use crate::input::{self, Format};
use crate::walk::{Entry, SkippedLink};
use crate::{DataError, Result};

use super::options::{Part, PrepareOptions};
use super::units::{file_name, Unit};

/// Units of part `part`: largest first, each to the part with the fewest bytes so far (ties
/// to the lowest part), a deterministic and balanced slice; returned in unit order.
pub(super) fn part_slice(units: &[Unit], part: Part) -> Vec<usize> {
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&u| (std::cmp::Reverse(units[u].bytes), u));
    let mut load = vec![0u64; part.count];
    let mut mine = Vec::new();
    for u in order {
        let p = (0..part.count).min_by_key(|&p| (load[p], p)).unwrap_or(0);
        load[p] += units[u].bytes.max(1);
        if p == part.index {
            mine.push(u);
        }
    }
    mine.sort_unstable();
    mine
}

/// A file-safe unit name: the file or folder name and a hash of the unit's identity.
fn unit_name(path: &Path, id: &str) -> String {
    let stem: String = file_name(path)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stem = if stem.is_empty() { "unit".into() } else { stem };
    format!("{stem}.{}", &sha256_hex(id.as_bytes())[..10])
}

/// Collects units while walking the inputs.
struct Discovery {
    units: BTreeMap<String, Unit>,
    ignored: Vec<PathBuf>,
    walker: crate::walk::Walker,
}

impl Discovery {
    /// A file unit (JSONL, Parquet) or, for text files, a member of its folder's unit.
    /// `rel` names the file independently of how the input was spelled: the input's label and
    /// the path below it, so `data/x`, `./data/x/` and `/abs/data/x` give the same units.
    fn add_file(&mut self, path: &Path, rel: &str, fixed: Option<(String, String)>) -> Result<()> {
        let Some(format) = input::format_of(path) else {
            self.ignored.push(path.to_path_buf());
            return Ok(());
        };
        let bytes = std::fs::metadata(path)
            .map_err(|e| DataError::io(path, e))?
            .len();
        let (id, name_path) = if format == Format::Text {
            let folder = rel.rsplit_once('/').map_or("", |(folder, _)| folder);
            (format!("{folder}/"), moelab_io::parent(path).to_path_buf())
        } else {
            (rel.to_string(), path.to_path_buf())
        };
        if format == Format::Text && fixed.is_none() {
            return Err(DataError::Prepare(format!(
                "{}: a text file is one document and needs a domain: put it in a domain folder \
                 (CORPUS/DOMAIN/[SOURCE/]file.txt) and give CORPUS",
                path.display()
            )));
        }
        let name = unit_name(&name_path, &id);
        let unit = self.units.entry(id.clone()).or_insert_with(|| Unit {
            id: id.clone(),
            name,
            files: Vec::new(),
            rel: Vec::new(),
            format,
            fixed: fixed.clone(),
            bytes: 0,
        });
        if unit.fixed != fixed {
            return Err(DataError::Prepare(format!(
                "{} is given twice with different domains ({:?} and {:?}); give it once",
                path.display(),
                unit.fixed,
                fixed
            )));
        }
        if !unit.rel.iter().any(|f| f == rel) {
            unit.files.push(path.to_path_buf());
            unit.rel.push(rel.to_string());
            unit.bytes += bytes;
        }
        Ok(())
    }

    /// Every corpus file under `dir`, recursively, for one fixed domain and source.
    fn add_tree(&mut self, dir: &Path, rel: &str, fixed: &(String, String)) -> Result<()> {
        for entry in self.walker.entries(dir)? {
            match entry {
                Entry::Dir(path) => {
                    let rel = format!("{rel}/{}", file_name(&path));
                    self.add_tree(&path, &rel, fixed)?;
                }
                Entry::File(path) => {
                    let rel = format!("{rel}/{}", file_name(&path));
                    self.add_file(&path, &rel, Some(fixed.clone()))?;
                }
            }
        }
        Ok(())
    }

    /// One corpus folder: domain folders (with source folders) and record files at its root.
    fn add_corpus(&mut self, input: &Path, label: &str) -> Result<()> {
        for entry in self.walker.entries(input)? {
            let entry = match entry {
                Entry::File(path) => {
                    // Corpus files at the root name their domain in each record; anything else
                    // there (README, PROVENANCE, scripts) is not data.
                    if matches!(
                        input::format_of(&path),
                        Some(Format::Jsonl | Format::Parquet)
                    ) {
                        let rel = format!("{label}/{}", file_name(&path));
                        self.add_file(&path, &rel, None)?;
                    }
                    continue;
                }
                Entry::Dir(path) => path,
            };
            let domain = file_name(&entry);
            if !input::is_name(&domain, false) {
                return Err(DataError::Prepare(format!(
                    "{}: a domain folder name may use only letters, digits, '_', '-' and '.', at most {} of them",
                    entry.display(),
                    input::MAX_NAME_BYTES
                )));
            }
            for item in self.walker.entries(&entry)? {
                match item {
                    Entry::Dir(item) => {
                        let source = file_name(&item);
                        if !input::is_name(&source, false) {
                            return Err(DataError::Prepare(format!(
                                "{}: a source folder name may use only letters, digits, '_', '-' and '.', at most {} of them",
                                item.display(),
                                input::MAX_NAME_BYTES
                            )));
                        }
                        let rel = format!("{label}/{domain}/{source}");
                        self.add_tree(&item, &rel, &(domain.clone(), source))?;
                    }
                    Entry::File(item) => {
                        let rel = format!("{label}/{domain}/{}", file_name(&item));
                        self.add_file(&item, &rel, Some((domain.clone(), "default".into())))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Each input's label in unit identities: its resolved folder or file name, or its whole
/// resolved path when two different inputs share that name. Inputs that resolve to the same
/// path are given once.
fn input_labels(inputs: &[PathBuf]) -> Result<Vec<(PathBuf, String)>> {
    let mut resolved: Vec<(PathBuf, PathBuf)> = Vec::new();
    for input in inputs {
        let real = std::fs::canonicalize(input).map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                std::io::Error::new(std::io::ErrorKind::NotFound, "input not found")
            } else {
                e
            };
            DataError::io(input, what)
        })?;
        if !resolved.iter().any(|(_, r)| *r == real) {
            resolved.push((input.clone(), real));
        }
    }
    let name = |real: &Path| file_name(real);
    Ok(resolved
        .iter()
        .map(|(input, real)| {
            let shared = resolved
                .iter()
                .any(|(_, other)| other != real && name(other) == name(real));
            let label = if shared || name(real).is_empty() {
                real.to_string_lossy().into_owned()
            } else {
                name(real)
            };
            (input.clone(), label)
        })
        .collect())
}

/// Turns the inputs into units, sorted by identity; also returns the ignored files and the
/// links not followed.
pub(super) fn discover(
    opts: &PrepareOptions,
) -> Result<(Vec<Unit>, Vec<PathBuf>, Vec<SkippedLink>)> {
    if opts.inputs.is_empty() {
        return Err(DataError::Prepare("no inputs given".into()));
    }
    let mut found = Discovery {
        units: BTreeMap::new(),
        ignored: Vec::new(),
        walker: crate::walk::Walker::new(opts.follow_outside_links),
    };
    for (input, label) in input_labels(&opts.inputs)? {
        if input.is_dir() {
            if found.walker.enter_root(&input)? {
                found.add_corpus(&input, &label)?;
            }
        } else if input.is_file() {
            match input::format_of(&input) {
                Some(Format::Jsonl | Format::Parquet) => {
                    if found.walker.first_visit(&input)? {
                        found.add_file(&input, &label, None)?
                    }
                }
                _ => {
                    return Err(DataError::Prepare(format!(
                        "{}: a file given directly must be JSONL or Parquet whose records carry a `{}` field \
                         ({}); put plain text files in a domain folder instead",
                        input.display(),
                        opts.fields.domain.0,
                        input::SUPPORTED
                    )))
                }
            }
        } else {
            return Err(DataError::Prepare(format!(
                "{}: not a file or folder (a FIFO or device?); give corpus folders or files",
                input.display()
            )));
        }
    }
    let units: Vec<Unit> = found.units.into_values().collect();
    if units.is_empty() {
        return Err(DataError::Prepare(format!(
            "no input files found: give folders of domain folders or corpus files ({})",
            input::SUPPORTED
        )));
    }
    Ok((units, found.ignored, found.walker.skipped))
}
