//! Units (input files encoded together into their own shards) and the record each finished
//! unit leaves under `units/`, which a later prepare reuses and `merge` joins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::input::{self, Format};
use crate::manifest::{InputStats, ShardEntry};
use crate::{DataError, Result};

/// A set of input files encoded together into its own shards.
pub(super) struct Unit {
    /// Identity and order: the file's path, or the text folder's path with a trailing `/`.
    pub(super) id: String,
    /// File-safe name: shard file stems and the record under `units/`.
    pub(super) name: String,
    pub(super) files: Vec<PathBuf>,
    /// Each file's identity: the input's label and the path below the input.
    pub(super) rel: Vec<String>,
    pub(super) format: Format,
    /// Folder units fix domain and source; file units read them from each record.
    pub(super) fixed: Option<(String, String)>,
    /// Bytes on disk.
    pub(super) bytes: u64,
}

/// The record a finished unit leaves under `units/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct UnitRecord {
    pub(super) key: String,
    pub(super) id: String,
    pub(super) name: String,
    /// Validation share (ppm) used for each `domain/source` the unit holds.
    pub(super) validation_ppm: BTreeMap<String, u32>,
    pub(super) inputs: Vec<InputStats>,
    pub(super) shards: Vec<UnitShard>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct UnitShard {
    pub(super) domain: String,
    pub(super) source: String,
    pub(super) shard: ShardEntry,
}

/// The folder holding unit records.
pub(super) const UNITS_DIR: &str = "units";
/// The folder holding shards.
pub(super) const SHARDS_DIR: &str = "shards";

pub(super) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(super) fn save_record(dir: &Path, record: &UnitRecord) -> Result<()> {
    let path = dir.join(UNITS_DIR).join(format!("{}.json", record.name));
    let text = serde_json::to_vec_pretty(record)
        .map_err(|e| DataError::Prepare(format!("cannot serialise unit record: {e}")))?;
    write_file(&path, &text)
}

/// Writes a whole file atomically (the one helper every moelab crate shares).
pub(super) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    moelab_io::write_atomic(path, bytes).map_err(|e| DataError::io(path, e))
}

/// Every shard path of a unit record is `shards/<domain>/<source>/<plain name>`.
pub(super) fn check_record_paths(record: &UnitRecord) -> std::result::Result<(), String> {
    for s in &record.shards {
        if !input::is_name(&s.domain, false) || !input::is_name(&s.source, true) {
            return Err(format!(
                "domain/source `{}/{}` is not a usable name",
                s.domain, s.source
            ));
        }
        for f in [&s.shard.tokens_file, &s.shard.docs_file] {
            crate::manifest::check_shard_path(f, &s.domain, &s.source)?;
        }
    }
    Ok(())
}
