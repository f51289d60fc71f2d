//! Corpora -> tokenizer -> domain shards -> mixture streams of batches.
//!
//! Knows nothing of the model. `prepare` turns domain-tagged files into token shards with a
//! document index and a manifest; [`Dataset`] opens them (memory-mapped, checked against the
//! manifest); [`MixtureStream`] maps every global sequence index to a span of one domain's
//! tokens, exactly following the configured mixture, so a stream is reproducible, resumable
//! from a [`StreamState`] of a few numbers, and sliceable across data-parallel ranks.

pub mod batch;
mod blend;
pub mod classify;
pub mod config;
pub mod dataset;
pub mod dataset_dir;
mod error;
mod hash;
pub mod input;
pub mod manifest;
pub mod prefetch;
pub mod prepare;
mod shard;
pub mod stream;
mod tokenize;
pub mod walk;

use std::path::Path;

pub use batch::Batch;
pub use config::{DataConfig, StageConfig};
pub use dataset::{Dataset, ValidationPlan};
pub use error::{DataError, Result};
pub use input::{FieldPath, Fields, Limits, SkipCounts};
pub use manifest::{Manifest, TokenDtype};
pub use prefetch::Prefetcher;
pub use prepare::{
    merge, prepare, Part, PrepareEvent, PrepareOptions, PrepareReport, ShortValidation,
    TokenizerChoice,
};
pub use stream::{MixReport, MixtureStream, StreamStage, StreamState};
pub use walk::{LinkSkip, SkippedLink};

/// Opens `cfg.dataset`, preparing it first from `cfg.sources` when it has no usable manifest
/// (training a BPE of `cfg.tokenizer_vocab` unless `cfg.tokenizer` is given).
pub fn ensure_prepared(cfg: &DataConfig) -> Result<Dataset, DataError> {
    ensure_prepared_with(cfg, &|_| {})
}

/// [`ensure_prepared`] with a progress callback for the prepare step.
pub fn ensure_prepared_with(
    cfg: &DataConfig,
    progress: &(dyn Fn(&PrepareEvent) + Sync),
) -> Result<Dataset, DataError> {
    let manifest = cfg.dataset.join(manifest::MANIFEST_FILE);
    let opened = if manifest.is_file() {
        Some(Dataset::open(&cfg.dataset))
    } else {
        None
    };
    match (opened, &cfg.sources) {
        (Some(Ok(dataset)), _) => {
            check_tokenizer_matches(cfg, &dataset)?;
            Ok(dataset)
        }
        (Some(Err(e)), None) => Err(e),
        (None, None) => Err(DataError::config(
            "data.dataset",
            format!(
                "{}{} has no {}; run `moelab prepare` into it, or set data.sources to prepare it on first use",
                cfg.dataset.display(),
                relative_to_cwd(&cfg.dataset),
                manifest::MANIFEST_FILE
            ),
        )),
        // No manifest, or a broken one: (re)prepare; intact shards are reused.
        (_, Some(sources)) => {
            check_exists("data.sources", sources)?;
            if let Some(tokenizer) = &cfg.tokenizer {
                check_exists("data.tokenizer", tokenizer)?;
            }
            let tokenizer = match &cfg.tokenizer {
                Some(path) => TokenizerChoice::File(path.clone()),
                None => TokenizerChoice::Train(cfg.tokenizer_vocab),
            };
            let mut opts = PrepareOptions::new(vec![sources.clone()], cfg.dataset.clone(), tokenizer);
            if let Some(f) = cfg.validation_fraction {
                opts.validation_fraction = f;
            }
            // Several runs (a Slurm array) may prepare the same dataset on first use: the
            // first prepares, the others wait for it and then reuse every unit.
            opts.wait_for_lock = true;
            prepare(&opts, progress)?;
            Dataset::open(&cfg.dataset)
        }
    }
}

/// Refuses a configured input path that does not exist, naming the key, the path and, for a
/// relative path, the working directory it was looked up in (a run started from another folder
/// would otherwise get a bare "not found" for a path that exists elsewhere).
pub fn check_exists(key: &str, path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    Err(DataError::config(
        key,
        format!("{}{} not found", path.display(), relative_to_cwd(path)),
    ))
}

/// " (relative to the working directory DIR)" for a relative path, else "".
pub fn relative_to_cwd(path: &Path) -> String {
    if path.is_absolute() {
        return String::new();
    }
    match std::env::current_dir() {
        Ok(dir) => format!(
            " (relative to the working directory {}; paths in a config are looked up from where moelab runs)",
            dir.display()
        ),
        Err(_) => " (relative to the working directory)".into(),
    }
}

/// A dataset trained for another vocabulary than the config asks for would silently mismatch.
fn check_tokenizer_matches(cfg: &DataConfig, dataset: &Dataset) -> Result<()> {
    let info = &dataset.manifest().tokenizer;
    if cfg.tokenizer.is_none() && cfg.sources.is_some() {
        if let Some(trained) = info.trained_vocab {
            if trained != cfg.tokenizer_vocab {
                return Err(DataError::config(
                    "data.tokenizer_vocab",
                    format!(
                        "{} was prepared with a {trained}-token BPE, the config asks for {}; point data.dataset \
                         at a new folder (or delete {}) to prepare it again",
                        cfg.dataset.display(),
                        cfg.tokenizer_vocab,
                        cfg.dataset.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Whether `dir` holds a dataset manifest (it may still be corrupt).
pub fn has_manifest(dir: &Path) -> bool {
    dir.join(manifest::MANIFEST_FILE).is_file()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A missing relative data.sources names the key and the working directory it was looked
    /// up in, before any preparation starts.
    #[test]
    fn missing_relative_sources_name_the_key_and_the_working_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = DataConfig::new(tmp.path().join("prepared"), 16);
        cfg.sources = Some("no-such-folder/sample".into());
        let err = ensure_prepared(&cfg).unwrap_err().to_string();
        let cwd = std::env::current_dir().unwrap();
        assert!(
            err.contains("`data.sources`")
                && err.contains("no-such-folder/sample")
                && err.contains(&cwd.display().to_string()),
            "{err}"
        );
        assert!(!tmp.path().join("prepared").exists(), "nothing was written");
        // An absolute path needs no working directory.
        cfg.sources = Some(tmp.path().join("absent"));
        let err = ensure_prepared(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("`data.sources`") && !err.contains("working directory"),
            "{err}"
        );
    }
}
