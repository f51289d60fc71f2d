//! `merge`: the folders of `prepare --part i/N` joined, after every file they name is checked,
//! into the dataset a single prepare would have written.

use std::path::{Path, PathBuf};

use crate::manifest::{Manifest, PartInfo, MANIFEST_FILE};
use crate::{DataError, Result};

use super::assemble::manifest_of;
use super::units::{check_record_paths, save_record, UnitRecord, UNITS_DIR};
use super::work_dir::WorkDir;

/// Joins the folders of `prepare --part 0/N` ... `--part N-1/N` into one dataset at `out`,
/// equal (shards and manifest, byte for byte) to a single prepare of the same inputs. Shards
/// are hard-linked where the file system allows, else copied; the part folders are kept.
pub fn merge(out: &Path, parts: &[PathBuf]) -> Result<Manifest> {
    if out.join(MANIFEST_FILE).is_file() {
        return Err(DataError::Prepare(format!(
            "{} already holds a dataset; merge into a new folder",
            out.display()
        )));
    }
    if parts.is_empty() {
        return Err(DataError::Prepare("merge needs the part folders".into()));
    }
    let manifests = part_manifests(parts)?;
    check_parts_agree(&manifests, parts)?;
    // Everything the parts name is read and checked before anything is written.
    let records = merged_records(&manifests, parts)?;
    let first = &manifests[0];
    let tokenizer = parts[0].join(&first.tokenizer.file);

    if !crate::dataset_dir::is_empty_or_absent(out) {
        return Err(DataError::Prepare(format!(
            "{} is not empty; merge into a new folder",
            out.display()
        )));
    }
    let work = WorkDir::for_output(out, false)?;
    if work.rename_to.is_none() {
        return Err(DataError::Prepare(format!(
            "{} is not empty; merge into a new folder",
            out.display()
        )));
    }
    match write_merged(&work.dir, first, &tokenizer, records) {
        Ok(manifest) => {
            work.finish()?;
            Ok(manifest)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work.dir);
            Err(e)
        }
    }
}

/// The manifest of each part folder, each that of one part (not a whole dataset).
fn part_manifests(parts: &[PathBuf]) -> Result<Vec<Manifest>> {
    let mut manifests = Vec::new();
    for p in parts {
        let m = Manifest::load(&p.join(MANIFEST_FILE))?;
        if m.part.is_none() {
            return Err(DataError::Prepare(format!(
                "{} is a whole dataset, not the folder of one `moelab prepare --part i/N`",
                p.display()
            )));
        }
        manifests.push(m);
    }
    Ok(manifests)
}

/// The parts (`manifests[i]` read from `parts[i]`, at least one) are of one prepare, each part
/// given once and none missing.
fn check_parts_agree(manifests: &[Manifest], parts: &[PathBuf]) -> Result<()> {
    let first = &manifests[0];
    let first_part = first.part.clone().unwrap_or_else(|| PartInfo {
        index: 0,
        count: 0,
        listing: String::new(),
        units: Vec::new(),
    });
    let mut seen = vec![None; first_part.count];
    for (m, dir) in manifests.iter().zip(parts) {
        let Some(part) = &m.part else { continue };
        let same = part.count == first_part.count
            && part.listing == first_part.listing
            && m.tokenizer == first.tokenizer
            && m.dtype == first.dtype
            && m.max_shard_bytes == first.max_shard_bytes
            && m.validation_fraction == first.validation_fraction;
        if !same {
            return Err(DataError::Prepare(format!(
                "{} is a part of another prepare than {} (inputs, options, tokenizer or part count differ); \
                 re-run every part with the same inputs and options",
                dir.display(),
                parts[0].display()
            )));
        }
        match seen.get_mut(part.index) {
            Some(slot @ None) => *slot = Some(dir),
            Some(Some(other)) => {
                return Err(DataError::Prepare(format!(
                    "{} and {} are both part {}/{}",
                    other.display(),
                    dir.display(),
                    part.index,
                    part.count
                )))
            }
            None => {}
        }
    }
    let missing: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| format!("{i}/{}", first_part.count))
        .collect();
    if !missing.is_empty() {
        return Err(DataError::Prepare(format!(
            "parts {} are missing; run `moelab prepare ... --part i/{}` for them and merge every part",
            missing.join(", "),
            first_part.count
        )));
    }
    Ok(())
}

/// Every part's unit records (with the folder holding them), checked, in unit order; also
/// checks the first part's tokenizer file. The parts must hold a document and no unit twice.
fn merged_records(manifests: &[Manifest], parts: &[PathBuf]) -> Result<Vec<(PathBuf, UnitRecord)>> {
    let first = &manifests[0];
    let mut records = Vec::new();
    for (m, dir) in manifests.iter().zip(parts) {
        records.extend(part_records(m, dir)?);
    }
    let tokenizer = parts[0].join(&first.tokenizer.file);
    check_part_file(&tokenizer, None, &first.tokenizer.sha256)?;
    records.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    if records
        .iter()
        .flat_map(|r| &r.1.inputs)
        .all(|s| s.documents == 0)
    {
        return Err(DataError::Prepare(
            "the parts hold no document; their manifests' `inputs` say why each file's records were skipped"
                .into(),
        ));
    }
    if records.windows(2).any(|w| w[0].1.id == w[1].1.id) {
        return Err(DataError::Prepare(
            "two parts hold the same input; re-run every part with the same --part count".into(),
        ));
    }
    Ok(records)
}

/// Writes the merged dataset into the work folder `dir`: every shard and unit record, the
/// tokenizer and the manifest (the one a single prepare would have written).
fn write_merged(
    dir: &Path,
    first: &Manifest,
    tokenizer: &Path,
    records: Vec<(PathBuf, UnitRecord)>,
) -> Result<Manifest> {
    let units_dir = dir.join(UNITS_DIR);
    std::fs::create_dir_all(&units_dir).map_err(|e| DataError::io(&units_dir, e))?;
    for (part_dir, record) in &records {
        for s in &record.shards {
            for f in [&s.shard.tokens_file, &s.shard.docs_file] {
                link_or_copy(&part_dir.join(f), &dir.join(f))?;
            }
        }
        save_record(dir, record)?;
    }
    link_or_copy(tokenizer, &dir.join(&first.tokenizer.file))?;
    let manifest = manifest_of(
        first.tokenizer.clone(),
        first.dtype,
        first.validation_fraction,
        first.max_shard_bytes,
        records.into_iter().map(|r| r.1).collect(),
        None,
    );
    manifest.save(&dir.join(MANIFEST_FILE))?;
    Ok(manifest)
}

/// The unit records of one part folder, each checked: its name is the one the part's manifest
/// lists, every shard path stays inside the part folder, and every shard file is a regular
/// file (not a link) of the recorded size and sha256.
fn part_records(m: &Manifest, dir: &Path) -> Result<Vec<(PathBuf, UnitRecord)>> {
    let names = m.part.as_ref().map(|p| p.units.clone()).unwrap_or_default();
    let mut records = Vec::new();
    for name in names {
        let manifest_path = dir.join(MANIFEST_FILE);
        if !crate::manifest::is_plain_name(&name) {
            return Err(DataError::Manifest {
                path: manifest_path,
                reason: format!(
                    "unit `{name}` is not a plain file name; the part was not written by moelab: re-run that part"
                ),
            });
        }
        let path = dir.join(UNITS_DIR).join(format!("{name}.json"));
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        let bad = |reason: String| DataError::Manifest {
            path: path.clone(),
            reason: format!("{reason}; re-run that part"),
        };
        let record: UnitRecord =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a unit record ({e})")))?;
        if record.name != name {
            return Err(bad(format!("names unit `{}`, not `{name}`", record.name)));
        }
        check_record_paths(&record).map_err(bad)?;
        for s in &record.shards {
            let width = m.dtype.bytes() as u64;
            let shard = &s.shard;
            let tokens = Some(shard.counts.tokens * width);
            check_part_file(&dir.join(&shard.tokens_file), tokens, &shard.tokens_sha256)?;
            let docs = Some(shard.counts.documents * 8);
            check_part_file(&dir.join(&shard.docs_file), docs, &shard.docs_sha256)?;
        }
        records.push((dir.to_path_buf(), record));
    }
    Ok(records)
}

/// A file a part names: a regular file (a link could point anywhere), of `size` bytes when
/// given, with the recorded sha256.
fn check_part_file(path: &Path, size: Option<u64>, sha256: &str) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| DataError::io(path, e))?;
    let corrupt = |reason: String| DataError::CorruptShard {
        path: path.to_path_buf(),
        reason,
    };
    if !meta.file_type().is_file() {
        return Err(corrupt(
            "not a regular file (a link or special file); merge copies only files a part wrote"
                .into(),
        ));
    }
    if let Some(size) = size.filter(|&s| s != meta.len()) {
        return Err(corrupt(format!(
            "{} bytes, its unit record says {size}",
            meta.len()
        )));
    }
    let got = crate::hash::sha256_file(path)?;
    if got != sha256 {
        return Err(corrupt(format!("sha256 {got}, the part says {sha256}")));
    }
    Ok(())
}

/// Hard-links `from` to `to` (shards are never modified once written), or copies it.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let dir = moelab_io::parent(to);
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(|e| DataError::io(from, e))?;
    moelab_io::sync_file(to).map_err(|e| DataError::io(to, e))
}
