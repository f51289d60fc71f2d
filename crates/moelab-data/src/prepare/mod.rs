//! `prepare`: corpus files -> tokenizer -> token shards per (domain, source, split) with a
//! document index, a validation split chosen by each document's content hash, and a manifest.
//!
//! Work is split into *units*: one input file (JSONL, Parquet), or the text files of one
//! folder. Documents stream through in bounded memory: a reader thread decompresses and splits
//! records, batches of them are parsed and tokenized in parallel (rayon) and written in their
//! original order, so the output does not depend on the thread count. Each finished unit
//! leaves a record under `units/`; a re-run reuses every unit whose files, tokenizer and
//! options are unchanged (an interrupted or incremental prepare only encodes what is new).
//!
//! A trained tokenizer and the per-domain validation shares are pinned in the dataset: adding
//! files later encodes only those files. `--part i/N` prepares a deterministic slice of the
//! units and [`merge`] joins the parts into the dataset a single prepare would have written.
//!
//! The stages live in their own files: `discover` (inputs -> units), `train_tokenizer`,
//! `validation` (the held-out shares), `encode` (with the `reader` thread), `assemble` (the
//! manifest) and `merge`; `units` and `work_dir` are the records and folder they share. This
//! file holds the public entry point and the run that strings the stages together.

mod assemble;
mod discover;
mod encode;
mod merge;
mod options;
mod reader;
mod train_tokenizer;
mod units;
mod validation;
mod work_dir;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::manifest::{InputStats, Manifest, PartInfo, TokenDtype, TokenizerInfo, MANIFEST_FILE};
use crate::{DataError, Result};

pub use crate::tokenize::PIECE_BYTES;
pub use merge::merge;
pub use options::{
    Part, PrepareEvent, PrepareOptions, PrepareReport, ShortValidation, TokenizerChoice,
    DEFAULT_MAX_SHARD_BYTES, DEFAULT_MIN_VALIDATION_TOKENS, MAX_THREADS,
};
pub use validation::MIN_VALIDATION_BYTES;

use assemble::{build_manifest, listing_hash, remove_unlisted};
use discover::{discover, part_slice};
use encode::{reusable, unit_key, Encoder};
use options::check_options;
use reader::no_documents;
use train_tokenizer::load_or_train_tokenizer;
use units::{Unit, UnitRecord, UNITS_DIR};
use validation::{short_validation, source_key, Rates};
use work_dir::WorkDir;

/// Runs prepare; `progress` is called from worker threads.
pub fn prepare(
    opts: &PrepareOptions,
    progress: &(dyn Fn(&PrepareEvent) + Sync),
) -> Result<PrepareReport> {
    check_options(opts)?;
    with_threads(opts.threads, || run(opts, progress))
}

fn with_threads<T: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    match threads {
        Some(threads) => rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| DataError::Prepare(format!("cannot start {threads} threads: {e}")))?
            .install(f),
        None => f(),
    }
}

fn run(opts: &PrepareOptions, progress: &(dyn Fn(&PrepareEvent) + Sync)) -> Result<PrepareReport> {
    let (units, ignored_files, skipped_links) = discover(opts)?;
    let selected: Vec<usize> = match opts.part {
        None => (0..units.len()).collect(),
        Some(part) => part_slice(&units, part),
    };
    progress(&PrepareEvent::Found {
        files: selected.iter().map(|&u| units[u].files.len()).sum(),
        bytes: selected.iter().map(|&u| units[u].bytes).sum(),
    });
    let work = WorkDir::for_output(&opts.out, opts.wait_for_lock)?;
    // The lock is ours: hidden temporary files in the folder are a killed run's leftovers.
    crate::dataset_dir::remove_leftovers(&work.dir)?;
    let result = run_in(opts, &work.dir, &units, &selected, progress);
    match result {
        Ok((manifest, written_units)) => {
            work.finish()?;
            Ok(PrepareReport {
                reused_units: selected.len() - written_units,
                short_validation: short_validation(&manifest, opts),
                manifest,
                written_units,
                ignored_files,
                skipped_links,
            })
        }
        Err(e) => {
            work.abandon();
            Err(e)
        }
    }
}

/// The prepare itself, in the work folder; returns the manifest and the units written.
fn run_in(
    opts: &PrepareOptions,
    dir: &Path,
    units: &[Unit],
    selected: &[usize],
    progress: &(dyn Fn(&PrepareEvent) + Sync),
) -> Result<(Manifest, usize)> {
    let previous = Manifest::load(&dir.join(MANIFEST_FILE)).ok();
    let (tokenizer, info) = load_or_train_tokenizer(opts, dir, units, progress)?;
    let dtype = TokenDtype::for_vocab(info.vocab_size);
    let mut rates = Rates::new(opts, units, previous.as_ref());

    // File hashes decide what changed; every selected file is read once for them.
    let files: Vec<&PathBuf> = selected.iter().flat_map(|&u| &units[u].files).collect();
    let hashes: Vec<String> = files
        .par_iter()
        .map(|f| crate::hash::sha256_file(f))
        .collect::<Result<_>>()?;
    let mut hash_of: BTreeMap<&Path, &str> = BTreeMap::new();
    for (f, h) in files.iter().zip(&hashes) {
        hash_of.insert(f.as_path(), h);
    }
    let mut keys: Vec<String> = selected
        .iter()
        .map(|&u| unit_key(opts, &units[u], &info, dtype, &rates, &hash_of))
        .collect();
    let chosen: Vec<&Unit> = selected.iter().map(|&u| &units[u]).collect();
    let mut records = reused_records(dir, &chosen, &keys, dtype, &rates, progress)?;

    // A second round re-encodes the units of sources whose validation split fell short of
    // --min-validation-tokens, at the share that brings them up to it.
    let mut redo: Vec<usize> = (0..records.len())
        .filter(|&i| records[i].is_none())
        .collect();
    let mut written = BTreeSet::new();
    for round in 0..2 {
        let todo: Vec<(usize, &Unit, &str)> = redo
            .iter()
            .map(|&i| (i, chosen[i], keys[i].as_str()))
            .collect();
        let encoder = Encoder {
            opts,
            dir,
            tokenizer: &tokenizer,
            eos_id: info.eos_id,
            dtype,
            rates: &rates,
            hash_of: &hash_of,
            next_in_line: Mutex::default(),
        };
        for (i, record) in encoder.encode(&todo, progress)? {
            records[i] = Some(record);
            written.insert(i);
        }
        let next = encoder
            .next_in_line
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        if round > 0 || opts.part.is_some() || opts.min_validation_tokens == 0 {
            break;
        }
        rates.raised = rates.top_up(opts.min_validation_tokens, &records, next);
        redo = (0..records.len())
            .filter(|&i| {
                records[i].as_ref().is_some_and(|r| {
                    r.shards
                        .iter()
                        .any(|s| rates.raised.contains_key(&source_key(&s.domain, &s.source)))
                })
            })
            .collect();
        if redo.is_empty() {
            break;
        }
        for &i in &redo {
            keys[i] = unit_key(opts, chosen[i], &info, dtype, &rates, &hash_of);
        }
    }
    let records: Vec<UnitRecord> = records.into_iter().flatten().collect();
    let manifest = save_manifest(opts, dir, units, info, dtype, records)?;
    Ok((manifest, written.len()))
}

/// The records of `units` (the selected ones, with their `keys`) a previous run left intact,
/// reported as reused; None for each unit still to encode.
fn reused_records(
    dir: &Path,
    units: &[&Unit],
    keys: &[String],
    dtype: TokenDtype,
    rates: &Rates,
    progress: &(dyn Fn(&PrepareEvent) + Sync),
) -> Result<Vec<Option<UnitRecord>>> {
    let units_dir = dir.join(UNITS_DIR);
    std::fs::create_dir_all(&units_dir).map_err(|e| DataError::io(&units_dir, e))?;
    let records: Vec<Option<UnitRecord>> = units
        .iter()
        .zip(keys)
        .map(|(unit, key)| reusable(dir, unit, key, dtype, rates))
        .collect();
    let reused = records.iter().filter(|r| r.is_some()).count();
    progress(&PrepareEvent::Encoding {
        units: units.len(),
        reused,
    });
    for (record, unit) in records.iter().zip(units) {
        if let Some(r) = record {
            progress(&PrepareEvent::UnitDone {
                unit: unit.name.clone(),
                bytes: unit.bytes,
                tokens: r.shards.iter().map(|s| s.shard.counts.tokens).sum(),
                reused: true,
            });
        }
    }
    Ok(records)
}

/// Saves the manifest of `records` (a part's with what every part must agree on), then
/// removes the shards and unit records it no longer lists. `units` are all the units.
fn save_manifest(
    opts: &PrepareOptions,
    dir: &Path,
    units: &[Unit],
    info: TokenizerInfo,
    dtype: TokenDtype,
    records: Vec<UnitRecord>,
) -> Result<Manifest> {
    let inputs: Vec<&InputStats> = records.iter().flat_map(|r| &r.inputs).collect();
    // A part may hold no document (or no unit) while the corpus has plenty: merge checks.
    if opts.part.is_none() && inputs.iter().all(|s| s.documents == 0) {
        return Err(DataError::Prepare(no_documents(&inputs, &opts.fields)));
    }
    let part = opts.part.map(|p| PartInfo {
        index: p.index,
        count: p.count,
        listing: listing_hash(opts, units, &info),
        units: records.iter().map(|r| r.name.clone()).collect(),
    });
    let names: BTreeSet<String> = records.iter().map(|r| r.name.clone()).collect();
    let manifest = build_manifest(info, dtype, opts, records, part);
    manifest.save(&dir.join(MANIFEST_FILE))?;
    remove_unlisted(dir, &manifest, &names)?;
    Ok(manifest)
}
