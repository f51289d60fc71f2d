//! Manifest assembly: the manifest of the unit records, what every part of a prepare must
//! agree on, and removing the shards and records a new manifest no longer lists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::hash::Hasher;
use crate::manifest::{
    Counts, DomainEntry, Manifest, PartInfo, ShardEntry, SourceEntry, Split, TokenDtype,
    TokenizerInfo, FORMAT_VERSION,
};
use crate::{DataError, Result};

use super::options::PrepareOptions;
use super::units::{file_name, Unit, UnitRecord, SHARDS_DIR, UNITS_DIR};

/// What every part of one prepare must agree on: the inputs and the options.
pub(super) fn listing_hash(opts: &PrepareOptions, units: &[Unit], info: &TokenizerInfo) -> String {
    let mut h = Hasher::new();
    h.update(
        format!(
            "format {FORMAT_VERSION} {:?} {} {} {} {} {} max-doc {}",
            opts.fields,
            opts.validation_fraction,
            opts.min_validation_tokens,
            opts.max_shard_bytes,
            info.sha256,
            info.eos_id,
            opts.limits.max_document_bytes
        )
        .as_bytes(),
    );
    for u in units {
        h.update(format!("{} {:?}", u.id, u.fixed).as_bytes());
        for (f, rel) in u.files.iter().zip(&u.rel) {
            let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            h.update(format!("{rel} {size}").as_bytes());
        }
    }
    h.hex()
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| DataError::io(dir, err)))
        .collect::<Result<_>>()?;
    entries.sort();
    Ok(entries)
}

/// The manifest of `records` (in unit order): domains and sources sorted by name, each
/// source's shards in unit order.
pub(super) fn build_manifest(
    tokenizer: TokenizerInfo,
    dtype: TokenDtype,
    opts: &PrepareOptions,
    records: Vec<UnitRecord>,
    part: Option<PartInfo>,
) -> Manifest {
    manifest_of(
        tokenizer,
        dtype,
        opts.validation_fraction,
        opts.max_shard_bytes,
        records,
        part,
    )
}

pub(super) fn manifest_of(
    tokenizer: TokenizerInfo,
    dtype: TokenDtype,
    validation_fraction: f64,
    max_shard_bytes: u64,
    records: Vec<UnitRecord>,
    part: Option<PartInfo>,
) -> Manifest {
    let mut tree: BTreeMap<String, BTreeMap<String, Vec<ShardEntry>>> = BTreeMap::new();
    let mut validation_ppm = BTreeMap::new();
    let mut inputs = Vec::new();
    for record in records {
        validation_ppm.extend(record.validation_ppm);
        inputs.extend(record.inputs);
        for s in record.shards {
            tree.entry(s.domain)
                .or_default()
                .entry(s.source)
                .or_default()
                .push(s.shard);
        }
    }
    let domains = tree
        .into_iter()
        .map(|(name, sources)| DomainEntry {
            name,
            sources: sources
                .into_iter()
                .map(|(name, shards)| {
                    let mut train = Counts::default();
                    let mut validation = Counts::default();
                    for s in &shards {
                        match s.split {
                            Split::Train => train.add(s.counts),
                            Split::Validation => validation.add(s.counts),
                        }
                    }
                    SourceEntry {
                        name,
                        train,
                        validation,
                        shards,
                    }
                })
                .collect(),
        })
        .collect();
    Manifest {
        format: FORMAT_VERSION,
        dtype,
        tokenizer,
        validation_fraction,
        validation_ppm,
        max_shard_bytes,
        domains,
        inputs,
        part,
    }
}

/// Deletes shards and unit records the manifest no longer lists (inputs that changed or
/// were removed), once the manifest that replaces them is saved. Only files named as prepare
/// names them are candidates (a shard `<unit>.<key>.<split>.NNNN.tokens|docs`, a unit record
/// that parses as one): anything else in the folder is left alone.
pub(super) fn remove_unlisted(
    dir: &Path,
    manifest: &Manifest,
    records: &BTreeSet<String>,
) -> Result<()> {
    let mut keep: BTreeSet<PathBuf> = BTreeSet::new();
    for d in &manifest.domains {
        for s in &d.sources {
            for shard in &s.shards {
                keep.insert(dir.join(&shard.tokens_file));
                keep.insert(dir.join(&shard.docs_file));
            }
        }
    }
    fn walk(path: &Path, keep: &BTreeSet<PathBuf>) -> Result<bool> {
        let mut empty = true;
        for entry in sorted_entries(path)? {
            let is_dir = std::fs::symlink_metadata(&entry).is_ok_and(|m| m.is_dir());
            if is_dir {
                if walk(&entry, keep)? {
                    std::fs::remove_dir(&entry).map_err(|e| DataError::io(&entry, e))?;
                } else {
                    empty = false;
                }
            } else if keep.contains(&entry)
                || !crate::dataset_dir::is_shard_file_name(&file_name(&entry))
            {
                empty = false;
            } else {
                std::fs::remove_file(&entry).map_err(|e| DataError::io(&entry, e))?;
            }
        }
        Ok(empty)
    }
    let shards = dir.join(SHARDS_DIR);
    if shards.is_dir() {
        walk(&shards, &keep)?;
    }
    let units = dir.join(UNITS_DIR);
    if units.is_dir() {
        for entry in sorted_entries(&units)? {
            let name = file_name(&entry);
            let listed = name
                .strip_suffix(".json")
                .is_some_and(|n| records.contains(n));
            let ours = !listed
                && std::fs::read(&entry)
                    .ok()
                    .is_some_and(|b| serde_json::from_slice::<UnitRecord>(&b).is_ok());
            if ours {
                std::fs::remove_file(&entry).map_err(|e| DataError::io(&entry, e))?;
            }
        }
    }
    Ok(())
}
