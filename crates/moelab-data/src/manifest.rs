//! `manifest.json`: what a prepared dataset holds, with sizes and hashes to detect corruption.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::input::SkipCounts;
use crate::{DataError, Result};

/// Version of the on-disk layout; bumped when shards or manifest change incompatibly.
pub const FORMAT_VERSION: u32 = 2;

/// The manifest's file name inside a dataset folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The tokenizer's file name inside a dataset folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The special token appended after every document.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Width of the little-endian token ids in the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// 2 bytes per token (vocabularies of at most 65536 ids).
    U16,
    /// 4 bytes per token.
    U32,
}

impl TokenDtype {
    /// The narrowest width that holds every id of a vocabulary of `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 65536 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// Training or held-out validation documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Documents the mixture stream draws from.
    Train,
    /// Documents reserved for the fixed per-domain validation stream.
    Validation,
}

/// The tokenizer a dataset was encoded with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// File name inside the dataset folder.
    pub file: String,
    /// sha256 of that file.
    pub sha256: String,
    /// Number of ids, added tokens included.
    pub vocab_size: usize,
    /// Id of the end-of-document token.
    pub eos_id: u32,
    /// Text of the end-of-document token.
    pub eos_token: String,
    /// Vocabulary asked for when the tokenizer was trained by `prepare` (None: given).
    #[serde(default)]
    pub trained_vocab: Option<usize>,
}

/// Documents and tokens (EOS included) of one split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Documents.
    pub documents: u64,
    /// Tokens, one EOS per document included.
    pub tokens: u64,
}

impl Counts {
    /// Adds another count.
    pub fn add(&mut self, other: Counts) {
        self.documents += other.documents;
        self.tokens += other.tokens;
    }
}

/// One shard: a token file and its document index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Which split the documents belong to.
    pub split: Split,
    /// Token file, relative to the dataset folder (little-endian ids of `dtype`).
    pub tokens_file: String,
    /// Document index, relative to the dataset folder (little-endian u64 end offset per document).
    pub docs_file: String,
    /// Documents and tokens in the shard.
    pub counts: Counts,
    /// sha256 of the token file.
    pub tokens_sha256: String,
    /// sha256 of the document index.
    pub docs_sha256: String,
}

/// One source inside a domain (e.g. `math/structured`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceEntry {
    /// Source name (`default` for files directly in the domain folder).
    pub name: String,
    /// Training counts.
    pub train: Counts,
    /// Validation counts.
    pub validation: Counts,
    /// Shards, train and validation, in stream order.
    pub shards: Vec<ShardEntry>,
}

/// One domain and its sources, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainEntry {
    /// Domain name.
    pub name: String,
    /// Sources sorted by name.
    pub sources: Vec<SourceEntry>,
}

/// What `prepare` did with one input file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputStats {
    /// Path as given to prepare.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 of the file's bytes.
    pub sha256: String,
    /// Documents kept.
    pub documents: u64,
    /// Records skipped, by reason.
    pub skipped: SkipCounts,
}

/// Which slice of a corpus a `prepare --part i/N` folder holds (what `prepare merge` checks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// This part's index, 0-based.
    pub index: usize,
    /// Number of parts.
    pub count: usize,
    /// Hash of the whole input listing and the options: every part of one prepare has the same.
    pub listing: String,
    /// Names of the units (input files or text folders) this part prepared, in order.
    pub units: Vec<String>,
}

/// The whole manifest of a prepared dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// Token width in the shards.
    pub dtype: TokenDtype,
    /// The tokenizer used.
    pub tokenizer: TokenizerInfo,
    /// Share of documents held out for validation.
    pub validation_fraction: f64,
    /// Per `domain/source`, the validation share in parts per million actually used: a document
    /// is held out when its content hash mod 1e6 is below it (the fraction, raised for small
    /// sources up to a quarter so they reach --min-validation-tokens). Pinned: re-running
    /// prepare into the dataset keeps it. Datasets from before per-source shares key it by domain.
    pub validation_ppm: BTreeMap<String, u32>,
    /// Largest shard token file written, in bytes (a longer single document gets its own).
    pub max_shard_bytes: u64,
    /// Domains sorted by name; a domain's id is its index here.
    pub domains: Vec<DomainEntry>,
    /// Per input file statistics.
    pub inputs: Vec<InputStats>,
    /// Set in the folder of one `prepare --part`; absent in a whole dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartInfo>,
}

impl Manifest {
    /// Reads and checks a manifest; a missing, truncated or inconsistent file is an error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let invalid = |e: serde_json::Error| DataError::Manifest {
            path: path.to_path_buf(),
            reason: format!("not a valid manifest ({e}); re-run `moelab prepare` to rebuild it"),
        };
        // The version first: an older layout gets its own message, not a missing-field error.
        #[derive(Deserialize)]
        struct Version {
            format: u32,
        }
        let version: Version = serde_json::from_slice(&bytes).map_err(invalid)?;
        if version.format != FORMAT_VERSION {
            return Err(DataError::Manifest {
                path: path.to_path_buf(),
                reason: format!(
                    "format {} but this moelab reads format {FORMAT_VERSION} (sharded outputs, per-domain \
                     validation shares); run `moelab prepare` again, into a new folder or into this one \
                     (which rebuilds every shard)",
                    version.format
                ),
            });
        }
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(invalid)?;
        let mut names: Vec<&str> = manifest.domains.iter().map(|d| d.name.as_str()).collect();
        names.dedup();
        let sorted = names.windows(2).all(|w| w[0] < w[1]);
        if !sorted || names.len() != manifest.domains.len() {
            return Err(DataError::Manifest {
                path: path.to_path_buf(),
                reason: "domains are not unique and sorted by name".into(),
            });
        }
        manifest
            .check_paths()
            .map_err(|reason| DataError::Manifest {
                path: path.to_path_buf(),
                reason,
            })?;
        if manifest.dtype != TokenDtype::for_vocab(manifest.tokenizer.vocab_size) {
            return Err(DataError::Manifest {
                path: path.to_path_buf(),
                reason: format!(
                    "dtype {:?} does not fit vocab_size {}",
                    manifest.dtype, manifest.tokenizer.vocab_size
                ),
            });
        }
        Ok(manifest)
    }

    /// Every path the manifest names must stay inside the dataset folder: the tokenizer a plain
    /// file name, each shard file `shards/<its domain>/<its source>/<plain name>`. A manifest
    /// that names anything else (`../x`, an absolute path) was not written by moelab, and
    /// reading or writing there would touch files outside the dataset.
    fn check_paths(&self) -> std::result::Result<(), String> {
        if !is_plain_name(&self.tokenizer.file) {
            return Err(format!(
                "tokenizer file `{}` is not a plain file name inside the dataset folder; the manifest was \
                 not written by moelab (or was edited): refusing to read or write outside the dataset",
                self.tokenizer.file
            ));
        }
        for d in &self.domains {
            for s in &d.sources {
                for shard in &s.shards {
                    for file in [&shard.tokens_file, &shard.docs_file] {
                        check_shard_path(file, &d.name, &s.name)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the manifest atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| DataError::Manifest {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        moelab_io::write_atomic(path, &text).map_err(|e| DataError::io(path, e))
    }

    /// Hash of the manifest's content (identifies the dataset in stream fingerprints).
    pub fn content_hash(&self) -> String {
        // Hash the shard hashes and counts, not the JSON text, so reformatting does not matter.
        let mut h = crate::hash::Hasher::new();
        h.update(self.tokenizer.sha256.as_bytes());
        for d in &self.domains {
            h.update(d.name.as_bytes());
            for s in &d.sources {
                h.update(s.name.as_bytes());
                for shard in &s.shards {
                    h.update(shard.tokens_sha256.as_bytes());
                    h.update(&shard.counts.tokens.to_le_bytes());
                }
            }
        }
        h.hex()
    }
}

/// Whether `name` is one plain file or folder name: letters, digits, `_`, `-` and `.`, not
/// empty and not starting with `.` (so never `.`, `..`, hidden, absolute or holding a `/`).
pub fn is_plain_name(name: &str) -> bool {
    crate::input::is_name(name, false)
}

/// Checks a shard path read from a manifest or unit record: `shards/<domain>/<source>/<file>`
/// with every part a plain name, so that joining it to the dataset folder stays inside it.
pub(crate) fn check_shard_path(
    file: &str,
    domain: &str,
    source: &str,
) -> std::result::Result<(), String> {
    let parts: Vec<&str> = file.split('/').collect();
    let source_parts: Vec<&str> = source.split('/').collect();
    let inside = parts.len() == 3 + source_parts.len()
        && parts[0] == "shards"
        && parts[1] == domain
        && parts[2..parts.len() - 1] == source_parts[..]
        && parts.iter().all(|p| is_plain_name(p));
    if inside {
        Ok(())
    } else {
        Err(format!(
            "shard file `{file}` of {domain}/{source} is not shards/{domain}/{source}/<file name> inside \
             the dataset folder; it was not written by moelab (or was edited): refusing to read or write \
             outside the dataset"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_paths_must_stay_inside_their_source_folder() {
        assert!(check_shard_path(
            "shards/web/default/a.1234.train.0000.tokens",
            "web",
            "default"
        )
        .is_ok());
        assert!(check_shard_path("shards/web/cc/2019/a.tokens", "web", "cc/2019").is_ok());
        for bad in [
            "../../victim.txt",
            "/etc/passwd",
            "shards/web/default/../../../x",
            "shards/web/default/.hidden",
            "shards/other/default/a.tokens",
            "shards/web/default/sub/a.tokens",
            "shards/web/default/",
            "shards//default/a.tokens",
        ] {
            assert!(check_shard_path(bad, "web", "default").is_err(), "{bad}");
        }
        assert!(is_plain_name("tokenizer.json"));
        for bad in ["", ".", "..", "../t.json", "/t.json", "a/b", ".t"] {
            assert!(!is_plain_name(bad), "{bad}");
        }
    }
}
