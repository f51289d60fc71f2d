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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::{AddedToken, Tokenizer};

use crate::input::{self, Fields, Format, ParsedDoc, RawRecord, RecordReader, Rejected};
use crate::manifest::{
    Counts, DomainEntry, InputStats, Manifest, PartInfo, ShardEntry, SourceEntry, Split,
    TokenDtype, TokenizerInfo, EOS_TOKEN, FORMAT_VERSION, MANIFEST_FILE, TOKENIZER_FILE,
};
use crate::shard::ShardWriter;
use crate::tokenize::{encode_document, text_pieces, train_bpe};
use crate::util::{sha256_hex, sha256_u64, Hasher};
use crate::walk::{Entry, SkippedLink};
use crate::{DataError, Result};

pub use crate::tokenize::PIECE_BYTES;

/// Which tokenizer `prepare` encodes with.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerChoice {
    /// An existing Hugging Face tokenizer.json, its special tokens kept (the end-of-document
    /// token, [`PrepareOptions::eos_token`], is added if it lacks it).
    File(PathBuf),
    /// Train a byte-level BPE of this vocabulary size on the corpus (or reuse the one an
    /// earlier prepare trained into the output folder).
    Train(usize),
}

/// One slice of a prepare split across machines: `index` of `count`, 0-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// This slice, `0..count`.
    pub index: usize,
    /// Number of slices.
    pub count: usize,
}

impl std::str::FromStr for Part {
    type Err = String;

    /// Parses `i/N`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}` is not a part: write i/N with 0 <= i < N, e.g. 0/8");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Part { index, count })
    }
}

/// Default cap on one shard's token file.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 1 << 30;

/// Everything `prepare` needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareOptions {
    /// Corpus folders (domain folders inside) or corpus files whose records name their domain.
    pub inputs: Vec<PathBuf>,
    /// Output dataset folder.
    pub out: PathBuf,
    /// Tokenizer to use or train.
    pub tokenizer: TokenizerChoice,
    /// Record fields holding text, domain and source.
    pub fields: Fields,
    /// Turn every skipped document (bad JSON, bad UTF-8, empty, ...) into an error.
    pub strict: bool,
    /// Share of each domain's documents held out for validation.
    pub validation_fraction: f64,
    /// Worker threads (None: rayon's default, one per core).
    pub threads: Option<usize>,
    /// Largest shard token file, in bytes.
    pub max_shard_bytes: u64,
    /// Prepare only this slice of the units (merge the parts with [`merge`]).
    pub part: Option<Part>,
    /// The token appended after every document: the tokenizer's own (e.g. `</s>`), or
    /// `<|endoftext|>` (added as a special token when the tokenizer lacks it).
    pub eos_token: String,
    /// When another prepare holds the output's lock: wait for it (true) or fail naming its
    /// PID (false, the CLI's choice).
    pub wait_for_lock: bool,
    /// Read links in corpus folders that resolve outside the input folder (skipped and
    /// reported by default).
    pub follow_outside_links: bool,
    /// Caps on one document and on a compressed file's expansion.
    pub limits: input::Limits,
    /// Validation tokens every (domain, source) gets at least, as far as it can spare them
    /// (at most a quarter of its tokens); 0 keeps the plain fraction. Not applied with `part`.
    pub min_validation_tokens: u64,
}

/// Default of [`PrepareOptions::min_validation_tokens`].
pub const DEFAULT_MIN_VALIDATION_TOKENS: u64 = 8192;

impl PrepareOptions {
    /// Options with the CLI's defaults for fields, strictness, split and shard size.
    pub fn new(inputs: Vec<PathBuf>, out: PathBuf, tokenizer: TokenizerChoice) -> Self {
        PrepareOptions {
            inputs,
            out,
            tokenizer,
            fields: Fields::default(),
            strict: false,
            validation_fraction: crate::config::DEFAULT_VALIDATION_FRACTION,
            threads: None,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            part: None,
            eos_token: EOS_TOKEN.into(),
            wait_for_lock: false,
            follow_outside_links: false,
            limits: input::Limits::default(),
            min_validation_tokens: DEFAULT_MIN_VALIDATION_TOKENS,
        }
    }
}

/// Progress of a running prepare, for bars and logs.
#[derive(Debug, Clone, PartialEq)]
pub enum PrepareEvent {
    /// Input files found, with their total size.
    Found {
        /// Files.
        files: usize,
        /// Bytes on disk.
        bytes: u64,
    },
    /// One input file was read (while training the tokenizer).
    FileRead {
        /// The file.
        path: PathBuf,
        /// Its size on disk.
        bytes: u64,
    },
    /// A tokenizer is being trained on these files.
    TrainingTokenizer {
        /// Files read for training.
        files: usize,
    },
    /// Units to encode and how many of them are reused from a previous run.
    Encoding {
        /// All units.
        units: usize,
        /// Units whose shards are already complete.
        reused: usize,
    },
    /// A unit's shards are written (or were reused).
    UnitDone {
        /// Unit name.
        unit: String,
        /// Input bytes of the unit.
        bytes: u64,
        /// Tokens written.
        tokens: u64,
        /// True when the shards from a previous run were kept.
        reused: bool,
    },
}

/// What `prepare` produced.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Units whose shards were written by this run.
    pub written_units: usize,
    /// Units whose shards from a previous run were kept.
    pub reused_units: usize,
    /// Files inside domain folders that were ignored (unsupported extension).
    pub ignored_files: Vec<PathBuf>,
    /// Symbolic links not followed (outside the input, loops, broken, second paths).
    pub skipped_links: Vec<SkippedLink>,
    /// Sources whose validation split stayed below [`PrepareOptions::min_validation_tokens`].
    pub short_validation: Vec<ShortValidation>,
}

/// A (domain, source) that could not spare the validation tokens asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ShortValidation {
    /// The domain.
    pub domain: String,
    /// The source inside it.
    pub source: String,
    /// Validation tokens it got.
    pub tokens: u64,
    /// Validation documents it got.
    pub documents: u64,
    /// All its documents, both splits.
    pub total_documents: u64,
    /// The tokens asked for (`--min-validation-tokens`).
    pub wanted: u64,
}

impl std::fmt::Display for ShortValidation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "domain `{}` (source `{}`) has {} validation tokens in {} of its {} documents, \
             fewer than the {} asked for (--min-validation-tokens): it cannot spare more than a \
             quarter of its tokens; add text to it or expect noisy validation losses",
            self.domain,
            self.source,
            self.tokens,
            self.documents,
            self.total_documents,
            self.wanted
        )
    }
}

/// A set of input files encoded together into its own shards.
struct Unit {
    /// Identity and order: the file's path, or the text folder's path with a trailing `/`.
    id: String,
    /// File-safe name: shard file stems and the record under `units/`.
    name: String,
    files: Vec<PathBuf>,
    /// Each file's identity: the input's label and the path below the input.
    rel: Vec<String>,
    format: Format,
    /// Folder units fix domain and source; file units read them from each record.
    fixed: Option<(String, String)>,
    /// Bytes on disk.
    bytes: u64,
}

/// The record a finished unit leaves under `units/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UnitRecord {
    key: String,
    id: String,
    name: String,
    /// Validation share (ppm) used for each `domain/source` the unit holds.
    validation_ppm: BTreeMap<String, u32>,
    inputs: Vec<InputStats>,
    shards: Vec<UnitShard>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UnitShard {
    domain: String,
    source: String,
    shard: ShardEntry,
}

/// The folder holding unit records.
const UNITS_DIR: &str = "units";
/// The folder holding shards.
const SHARDS_DIR: &str = "shards";
/// Marks a tokenizer.json trained by prepare (and for which vocabulary).
const TRAIN_STAMP_FILE: &str = "tokenizer.train.json";

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

/// Most worker threads `prepare --threads` starts (far above any machine's useful count; a
/// typo such as 100000 would otherwise spawn threads for minutes).
pub const MAX_THREADS: usize = 1024;

fn check_options(opts: &PrepareOptions) -> Result<()> {
    if let Some(threads) = opts.threads {
        if threads == 0 || threads > MAX_THREADS {
            return Err(DataError::Prepare(format!(
                "--threads {threads} is outside 1..={MAX_THREADS}; give at most the machine's cores \
                 (this one has {}), or leave it out for one per core",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            )));
        }
    }
    if opts.limits.max_document_bytes == 0 || opts.limits.max_expansion == 0 {
        return Err(DataError::Prepare(
            "--max-document-bytes and --max-expansion must be at least 1".into(),
        ));
    }
    if !(0.0..1.0).contains(&opts.validation_fraction) {
        return Err(DataError::Prepare(format!(
            "--validation-fraction must be in [0, 1), got {}",
            opts.validation_fraction
        )));
    }
    opts.fields.text.check("--text-field")?;
    opts.fields.domain.check("--domain-field")?;
    opts.fields.source.check("--source-field")?;
    if opts.eos_token.is_empty() {
        return Err(DataError::Prepare(
            "--eos-token is empty; name the tokenizer's end-of-document token (e.g. </s>)".into(),
        ));
    }
    if opts.max_shard_bytes < 4096 {
        return Err(DataError::Prepare(format!(
            "--max-shard-bytes {} is too small; use at least 4K (shards of a few hundred MB suit most file systems)",
            opts.max_shard_bytes
        )));
    }
    if let (Some(part), TokenizerChoice::Train(_)) = (opts.part, &opts.tokenizer) {
        return Err(DataError::Prepare(format!(
            "--part {}/{} needs --tokenizer FILE: every part must encode with the same tokenizer. Train one \
             first (e.g. `moelab prepare SAMPLE --out tok --train-tokenizer V`, then use tok/tokenizer.json)",
            part.index, part.count
        )));
    }
    Ok(())
}

/// The folder a prepare writes into: the output itself when it already holds a dataset, else
/// a hidden sibling renamed to the output on success, so a failed first prepare leaves no
/// folder that looks like a dataset. Either carries the marker and is locked while it exists.
struct WorkDir {
    dir: PathBuf,
    /// Where `dir` is renamed to at the end (None: working in place).
    rename_to: Option<PathBuf>,
    /// Held until the work is done (the lock file moves with a renamed folder).
    _lock: crate::dataset_dir::DatasetLock,
}

impl WorkDir {
    /// The work folder for `out`, locked (waiting for another prepare with `wait`); a folder
    /// moelab did not create is refused before anything is written.
    fn for_output(out: &Path, wait: bool) -> Result<WorkDir> {
        use crate::dataset_dir::{check_ours, is_empty_or_absent, lock, mark, MARKER_FILE};
        if out.exists() && !out.is_dir() {
            return Err(DataError::Prepare(format!(
                "--out {} is a file; give a folder for the dataset",
                out.display()
            )));
        }
        // Twice at most: a prepare that finished while we waited turns a fresh output into
        // a dataset to work in.
        for _ in 0..2 {
            check_ours(out, "--out")?;
            if !is_empty_or_absent(out) {
                let held = lock(out, wait)?;
                if !out.join(MARKER_FILE).is_file() {
                    mark(out)?;
                }
                return Ok(WorkDir {
                    dir: out.to_path_buf(),
                    rename_to: None,
                    _lock: held,
                });
            }
            let name = out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    DataError::Prepare(format!("--out {} has no folder name", out.display()))
                })?;
            let dir = out.with_file_name(format!(".{name}.partial"));
            check_ours(&dir, "the work folder of --out")?;
            std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
            let held = lock(&dir, wait)?;
            if !is_empty_or_absent(out) || !dir.is_dir() {
                // Another prepare finished (and renamed its work folder) meanwhile.
                continue;
            }
            if !dir.join(MARKER_FILE).is_file() {
                mark(&dir)?;
            }
            return Ok(WorkDir {
                dir,
                rename_to: Some(out.to_path_buf()),
                _lock: held,
            });
        }
        Err(DataError::Prepare(format!(
            "{} changed while waiting for its lock; run again",
            out.display()
        )))
    }

    /// Moves the finished dataset into place.
    fn finish(&self) -> Result<()> {
        let Some(out) = &self.rename_to else {
            return Ok(());
        };
        if out.is_dir() {
            // An empty folder the user made (checked when choosing the work folder).
            std::fs::remove_dir(out).map_err(|e| DataError::io(out, e))?;
        }
        std::fs::rename(&self.dir, out).map_err(|e| DataError::io(out, e))?;
        moelab_io::sync_dir(moelab_io::parent(out)).map_err(|e| DataError::io(out, e))
    }

    /// After a failure: a fresh work folder with no finished unit holding documents is
    /// removed; one with finished units is kept (hidden) so that a re-run resumes from it.
    fn abandon(&self) {
        if self.rename_to.is_none() {
            return;
        }
        let has_work = std::fs::read_dir(self.dir.join(UNITS_DIR))
            .map(|entries| {
                entries.flatten().any(|e| {
                    std::fs::read(e.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice::<UnitRecord>(&b).ok())
                        .is_some_and(|r| r.inputs.iter().any(|i| i.documents > 0))
                })
            })
            .unwrap_or(false);
        if !has_work {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
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
        .map(|f| crate::util::sha256_file(f))
        .collect::<Result<_>>()?;
    let mut hash_of: BTreeMap<&Path, &str> = BTreeMap::new();
    for (f, h) in files.iter().zip(&hashes) {
        hash_of.insert(f.as_path(), h);
    }
    let mut keys: Vec<String> = selected
        .iter()
        .map(|&u| unit_key(opts, &units[u], &info, dtype, &rates, &hash_of))
        .collect();
    let units_dir = dir.join(UNITS_DIR);
    std::fs::create_dir_all(&units_dir).map_err(|e| DataError::io(&units_dir, e))?;
    let mut records: Vec<Option<UnitRecord>> = selected
        .iter()
        .zip(&keys)
        .map(|(&u, key)| reusable(dir, &units[u], key, dtype, &rates))
        .collect();
    let reused = records.iter().filter(|r| r.is_some()).count();
    progress(&PrepareEvent::Encoding {
        units: selected.len(),
        reused,
    });
    for (record, &u) in records.iter().zip(selected) {
        if let Some(r) = record {
            progress(&PrepareEvent::UnitDone {
                unit: units[u].name.clone(),
                bytes: units[u].bytes,
                tokens: r.shards.iter().map(|s| s.shard.counts.tokens).sum(),
                reused: true,
            });
        }
    }

    // A second round re-encodes the units of sources whose validation split fell short of
    // --min-validation-tokens, at the share that brings them up to it.
    let mut redo: Vec<usize> = (0..records.len())
        .filter(|&i| records[i].is_none())
        .collect();
    let mut written = BTreeSet::new();
    for round in 0..2 {
        let todo: Vec<(usize, &Unit, &str)> = redo
            .iter()
            .map(|&i| (i, &units[selected[i]], keys[i].as_str()))
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
            keys[i] = unit_key(opts, &units[selected[i]], &info, dtype, &rates, &hash_of);
        }
    }
    let records: Vec<UnitRecord> = records.into_iter().flatten().collect();
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
    Ok((manifest, written.len()))
}

/// Units of part `part`: largest first, each to the part with the fewest bytes so far (ties
/// to the lowest part), a deterministic and balanced slice; returned in unit order.
fn part_slice(units: &[Unit], part: Part) -> Vec<usize> {
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

/// What every part of one prepare must agree on: the inputs and the options.
fn listing_hash(opts: &PrepareOptions, units: &[Unit], info: &TokenizerInfo) -> String {
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

/// Scale of the validation shares: parts per million.
const PPM: u64 = 1_000_000;

/// Text a domain's validation split gets at least in expectation (about 4-5k tokens: a stable
/// loss estimate even for small corpora), as long as that stays within a quarter of the domain.
pub const MIN_VALIDATION_BYTES: u64 = 16 * 1024;

/// Most a small domain's validation share is raised to.
const MAX_RAISED_PPM: u32 = 250_000;

/// A generous text bytes per token, so that the first guess at a source's share usually
/// already yields `--min-validation-tokens` (byte-level BPEs give 2.5-4.5).
const BYTES_PER_TOKEN_GUESS: u64 = 5;

/// The key of a (domain, source) in the validation shares (names never hold '/').
fn source_key(domain: &str, source: &str) -> String {
    format!("{domain}/{source}")
}

/// Per-(domain, source) validation shares: a first guess that is a pure function of the input
/// listing (so every part of a prepare agrees), raised where a first pass fell short of
/// `--min-validation-tokens`, and pinned for sources an earlier prepare into the folder
/// already split.
struct Rates {
    fraction_ppm: u32,
    /// By `domain/source` (or `domain`, as manifests before per-source shares have it).
    pinned: BTreeMap<String, u32>,
    /// Estimated text bytes of each (domain, source)'s folder files.
    folder_bytes: BTreeMap<(String, String), u64>,
    /// Estimated text bytes of the files whose records name their domain (any could hold any).
    mixed_bytes: u64,
    /// Text a source's validation split should get in expectation.
    target_bytes: u64,
    /// Shares raised after the first pass, by `domain/source`.
    raised: BTreeMap<String, u32>,
}

/// The training documents of one (domain, source) next in line for validation: those with the
/// lowest hash residues, just enough to cover the minimum (bounded memory).
#[derive(Default)]
struct NextInLine {
    /// (hash residue, tokens), a max-heap on the residue.
    heap: std::collections::BinaryHeap<(u32, u64)>,
    tokens: u64,
}

impl NextInLine {
    /// Adds a training document; drops the highest residues no longer needed to reach `want`.
    fn push(&mut self, residue: u32, tokens: u64, want: u64) {
        self.heap.push((residue, tokens));
        self.tokens += tokens;
        while let Some(&(_, top)) = self.heap.peek() {
            if self.heap.len() < 2 || self.tokens - top < want {
                break;
            }
            self.heap.pop();
            self.tokens -= top;
        }
    }
}

impl Rates {
    fn new(opts: &PrepareOptions, units: &[Unit], previous: Option<&Manifest>) -> Rates {
        let mut folder_bytes = BTreeMap::new();
        let mut mixed_bytes = 0;
        for u in units {
            // Compressed files hold about three times their size in text.
            let text_bytes: u64 = u
                .files
                .iter()
                .map(|f| {
                    let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
                    if input::is_compressed(f) {
                        size * 3
                    } else {
                        size
                    }
                })
                .sum();
            match &u.fixed {
                Some(key) => *folder_bytes.entry(key.clone()).or_default() += text_bytes,
                None => mixed_bytes += text_bytes,
            }
        }
        let pinned = match previous {
            Some(m) if opts.part.is_none() && m.validation_fraction == opts.validation_fraction => {
                m.validation_ppm.clone()
            }
            _ => BTreeMap::new(),
        };
        Rates {
            fraction_ppm: (opts.validation_fraction * PPM as f64).round() as u32,
            pinned,
            folder_bytes,
            mixed_bytes,
            target_bytes: MIN_VALIDATION_BYTES.max(
                opts.min_validation_tokens
                    .saturating_mul(BYTES_PER_TOKEN_GUESS),
            ),
            raised: BTreeMap::new(),
        }
    }

    /// The validation share of `source` in `domain`, in ppm.
    fn ppm(&self, domain: &str, source: &str) -> u32 {
        let key = source_key(domain, source);
        let set = self.pinned.get(&key).or_else(|| self.raised.get(&key));
        if let Some(&p) = set.or_else(|| self.pinned.get(domain)) {
            return p;
        }
        if self.fraction_ppm == 0 {
            return 0;
        }
        let folder = self
            .folder_bytes
            .get(&(domain.to_string(), source.to_string()));
        let bytes = folder.copied().unwrap_or(0) + self.mixed_bytes;
        let raised = self
            .target_bytes
            .saturating_mul(PPM)
            .checked_div(bytes)
            .map_or(MAX_RAISED_PPM, |p| p.min(u64::from(MAX_RAISED_PPM)) as u32);
        self.fraction_ppm.max(raised)
    }

    /// Raised shares, by `domain/source`, for the sources of `records` whose validation split
    /// holds fewer than `want` tokens: the smallest threshold that brings each up to `want`,
    /// taking at most a quarter of its tokens (but one document when it has two or more).
    /// Pinned sources and a disabled split (fraction 0) are left alone.
    fn top_up(
        &self,
        want: u64,
        records: &[Option<UnitRecord>],
        mut next: BTreeMap<(String, String), NextInLine>,
    ) -> BTreeMap<String, u32> {
        let mut counts: BTreeMap<(String, String), (Counts, Counts)> = BTreeMap::new();
        for s in records.iter().flatten().flat_map(|r| &r.shards) {
            let c = counts
                .entry((s.domain.clone(), s.source.clone()))
                .or_default();
            match s.shard.split {
                Split::Validation => c.0.add(s.shard.counts),
                Split::Train => c.1.add(s.shard.counts),
            }
        }
        let mut raised = BTreeMap::new();
        for ((domain, source), (val, train)) in counts {
            let key = source_key(&domain, &source);
            let pinned = self.pinned.contains_key(&key) || self.pinned.contains_key(&domain);
            if val.tokens >= want || pinned || self.fraction_ppm == 0 {
                continue;
            }
            let Some(line) = next.remove(&(domain.clone(), source.clone())) else {
                continue;
            };
            let spare = (val.tokens + train.tokens) / 4;
            let several = val.documents + train.documents >= 2;
            let (mut tokens, mut documents, mut threshold) = (val.tokens, val.documents, None);
            for (residue, t) in line.heap.into_sorted_vec() {
                if tokens >= want || (tokens + t > spare && !(documents == 0 && several)) {
                    break;
                }
                tokens += t;
                documents += 1;
                threshold = Some(residue + 1);
            }
            if let Some(t) = threshold.filter(|&t| t > self.ppm(&domain, &source)) {
                raised.insert(key, t);
            }
        }
        raised
    }
}

/// The (domain, source)s of `manifest` whose validation split is below the minimum asked for
/// (none when the minimum does not apply: no validation split, or one part of a prepare).
fn short_validation(manifest: &Manifest, opts: &PrepareOptions) -> Vec<ShortValidation> {
    let want = opts.min_validation_tokens;
    if want == 0 || opts.validation_fraction == 0.0 || opts.part.is_some() {
        return Vec::new();
    }
    let mut short = Vec::new();
    for d in &manifest.domains {
        for s in &d.sources {
            if s.validation.tokens < want {
                short.push(ShortValidation {
                    domain: d.name.clone(),
                    source: s.name.clone(),
                    tokens: s.validation.tokens,
                    documents: s.validation.documents,
                    total_documents: s.validation.documents + s.train.documents,
                    wanted: want,
                });
            }
        }
    }
    short
}

/// Whether a document with content hash `hash` is held out at share `ppm`.
fn is_validation(hash: u64, ppm: u32) -> bool {
    hash % PPM < u64::from(ppm)
}

/// Everything that decides a unit's shards.
fn unit_key(
    opts: &PrepareOptions,
    unit: &Unit,
    info: &TokenizerInfo,
    dtype: TokenDtype,
    rates: &Rates,
    hash_of: &BTreeMap<&Path, &str>,
) -> String {
    let mut h = Hasher::new();
    h.update(
        format!(
            "format {FORMAT_VERSION} {dtype:?} {} {:?}",
            unit.id, unit.fixed
        )
        .as_bytes(),
    );
    h.update(format!("{} eos {}", info.sha256, info.eos_id).as_bytes());
    let fields = match unit.fixed {
        Some(_) => opts.fields.text.0.clone(),
        None => format!("{:?}", opts.fields),
    };
    h.update(
        format!(
            "{fields} {} {} max-doc {}",
            opts.max_shard_bytes, rates.fraction_ppm, opts.limits.max_document_bytes
        )
        .as_bytes(),
    );
    if let Some((domain, source)) = &unit.fixed {
        h.update(format!("ppm {}", rates.ppm(domain, source)).as_bytes());
    }
    for (f, rel) in unit.files.iter().zip(&unit.rel) {
        let hash = hash_of.get(f.as_path()).copied().unwrap_or("");
        h.update(format!("{rel} {hash}").as_bytes());
    }
    h.hex()
}

/// A unit's previous record, if its key and validation shares match and its shards are all
/// present at full size.
fn reusable(
    dir: &Path,
    unit: &Unit,
    key: &str,
    dtype: TokenDtype,
    rates: &Rates,
) -> Option<UnitRecord> {
    let text = std::fs::read(dir.join(UNITS_DIR).join(format!("{}.json", unit.name))).ok()?;
    let record: UnitRecord = serde_json::from_slice(&text).ok()?;
    if record.key != key || record.id != unit.id || record.name != unit.name {
        return None;
    }
    check_record_paths(&record).ok()?;
    let stale = |(key, &p): (&String, &u32)| match key.split_once('/') {
        Some((d, s)) => rates.ppm(d, s) != p,
        None => true,
    };
    if record.validation_ppm.iter().any(stale) {
        return None;
    }
    let intact = record.shards.iter().all(|s| {
        let size = |f: &str| std::fs::metadata(dir.join(f)).map(|m| m.len()).ok();
        size(&s.shard.tokens_file) == Some(s.shard.counts.tokens * dtype.bytes() as u64)
            && size(&s.shard.docs_file) == Some(s.shard.counts.documents * 8)
    });
    intact.then_some(record)
}

/// The error of a corpus with no usable document: what each file held and why it was skipped.
fn no_documents(inputs: &[&InputStats], fields: &Fields) -> String {
    const SHOWN: usize = 20;
    let mut lines: Vec<String> = inputs
        .iter()
        .take(SHOWN)
        .map(|s| {
            format!(
                "{}: 0 kept, skipped: {}",
                s.path,
                s.skipped.describe(fields)
            )
        })
        .collect();
    if inputs.len() > SHOWN {
        lines.push(format!("... and {} more files", inputs.len() - SHOWN));
    }
    let fieldless: u64 = inputs
        .iter()
        .map(|s| s.skipped.no_text + s.skipped.no_domain + s.skipped.malformed_json)
        .sum();
    let hint = if fieldless > 0 {
        format!(
            "check --text-field (now `{}`), --domain-field (now `{}`) and --source-field (now `{}`; nested \
             fields are dotted paths such as `metadata.domain`), or run with --strict to stop at the first \
             bad record with its file and line number",
            fields.text.0, fields.domain.0, fields.source.0
        )
    } else {
        "run with --strict to stop at the first bad document with its file and line number".into()
    };
    format!(
        "no documents found in the {} input files; per file:\n  {}\n{hint}",
        inputs.len(),
        lines.join("\n  ")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| DataError::io(dir, err)))
        .collect::<Result<_>>()?;
    entries.sort();
    Ok(entries)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
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
fn discover(opts: &PrepareOptions) -> Result<(Vec<Unit>, Vec<PathBuf>, Vec<SkippedLink>)> {
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

/// What the reader thread sends: records, and where files and units end.
enum Item {
    Record {
        unit: usize,
        file: usize,
        line: u64,
        raw: RawRecord,
    },
    FileEnd {
        unit: usize,
        file: usize,
    },
    UnitEnd {
        unit: usize,
    },
    Failed(DataError),
}

/// Raw bytes per batch handed to the parallel parse and encode (memory: about three batches).
const BATCH_BYTES: usize = 8 << 20;
/// Records per batch at most.
const BATCH_RECORDS: usize = 4096;

/// Reads `units` in order on a thread of `scope`, sending batches of records (the channel holds
/// one batch, so the reader stays at most two batches ahead).
fn spawn_reader<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    units: Vec<&'scope Unit>,
    fields: &'scope Fields,
    limits: &'scope input::Limits,
) -> Receiver<Vec<Item>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Item>>(1);
    scope.spawn(move || {
        let send = |tx: &SyncSender<Vec<Item>>, batch: &mut Vec<Item>| {
            tx.send(std::mem::take(batch)).is_ok()
        };
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for (u, unit) in units.iter().enumerate() {
            for (f, path) in unit.files.iter().enumerate() {
                let mut reader = match RecordReader::open(
                    path,
                    unit.format,
                    fields,
                    unit.fixed.is_some(),
                    limits,
                ) {
                    Ok(r) => r,
                    Err(e) => {
                        batch.push(Item::Failed(e));
                        let _ = send(&tx, &mut batch);
                        return;
                    }
                };
                loop {
                    match reader.next_record() {
                        Ok(Some((line, raw))) => {
                            bytes += raw.len();
                            batch.push(Item::Record {
                                unit: u,
                                file: f,
                                line,
                                raw,
                            });
                            if bytes >= BATCH_BYTES || batch.len() >= BATCH_RECORDS {
                                bytes = 0;
                                if !send(&tx, &mut batch) {
                                    return;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            batch.push(Item::Failed(e));
                            let _ = send(&tx, &mut batch);
                            return;
                        }
                    }
                }
                batch.push(Item::FileEnd { unit: u, file: f });
            }
            batch.push(Item::UnitEnd { unit: u });
        }
        if !batch.is_empty() {
            let _ = send(&tx, &mut batch);
        }
    });
    rx
}

/// A skipped record under `--strict`: the error naming file and line.
fn strict_error(path: &Path, line: u64, detail: &str) -> DataError {
    DataError::Input {
        path: path.to_path_buf(),
        line,
        reason: format!("{detail} (drop --strict to skip and count such documents)"),
    }
}

/// Per-file statistics being counted.
fn fresh_stats(unit: &Unit, hash_of: &BTreeMap<&Path, &str>) -> Vec<InputStats> {
    unit.files
        .iter()
        .map(|f| InputStats {
            path: f.to_string_lossy().into_owned(),
            bytes: std::fs::metadata(f).map(|m| m.len()).unwrap_or(0),
            sha256: hash_of.get(f.as_path()).copied().unwrap_or("").to_string(),
            ..InputStats::default()
        })
        .collect()
}

/// Encodes units into shards.
struct Encoder<'a> {
    opts: &'a PrepareOptions,
    dir: &'a Path,
    tokenizer: &'a Tokenizer,
    eos_id: u32,
    dtype: TokenDtype,
    rates: &'a Rates,
    hash_of: &'a BTreeMap<&'a Path, &'a str>,
    /// Per (domain, source), the training documents next in line for validation.
    next_in_line: Mutex<BTreeMap<(String, String), NextInLine>>,
}

/// A record after the parallel step.
enum Encoded {
    Doc {
        domain: String,
        source: String,
        hash: u64,
        ids: Vec<u32>,
    },
    Skipped(Rejected),
    Failed(DataError),
}

/// One item after the parallel step.
enum Step {
    Record {
        unit: usize,
        file: usize,
        line: u64,
        encoded: Encoded,
    },
    UnitEnd {
        unit: usize,
    },
    Failed(DataError),
    Nothing,
}

/// The shards of the unit being written.
struct OpenUnit {
    writers: BTreeMap<(String, String, Split), ShardWriter>,
    inputs: Vec<InputStats>,
    validation_ppm: BTreeMap<String, u32>,
}

impl Encoder<'_> {
    /// Encodes `todo` (index in the caller's list, unit, key); returns the records in order.
    fn encode(
        &self,
        todo: &[(usize, &Unit, &str)],
        progress: &(dyn Fn(&PrepareEvent) + Sync),
    ) -> Result<Vec<(usize, UnitRecord)>> {
        if todo.is_empty() {
            return Ok(Vec::new());
        }
        let units: Vec<&Unit> = todo.iter().map(|(_, u, _)| *u).collect();
        let new_state = |unit: usize| OpenUnit {
            writers: BTreeMap::new(),
            inputs: fresh_stats(units[unit], self.hash_of),
            validation_ppm: BTreeMap::new(),
        };
        std::thread::scope(|scope| {
            let rx = spawn_reader(scope, units.clone(), &self.opts.fields, &self.opts.limits);
            let mut done = Vec::new();
            let mut open: Option<OpenUnit> = None;
            for batch in rx {
                // Parse and tokenize in parallel; `collect` keeps the corpus order.
                let steps: Vec<Step> = batch
                    .into_par_iter()
                    .map(|item| match item {
                        Item::Record {
                            unit,
                            file,
                            line,
                            raw,
                        } => Step::Record {
                            unit,
                            file,
                            line,
                            encoded: self.encode_record(raw, units[unit]),
                        },
                        Item::FileEnd { .. } => Step::Nothing,
                        Item::UnitEnd { unit } => Step::UnitEnd { unit },
                        Item::Failed(e) => Step::Failed(e),
                    })
                    .collect();
                for step in steps {
                    match step {
                        Step::Record {
                            unit,
                            file,
                            line,
                            encoded,
                        } => {
                            let state = open.get_or_insert_with(|| new_state(unit));
                            self.write(state, units[unit], todo[unit].2, file, line, encoded)?;
                        }
                        Step::UnitEnd { unit } => {
                            let state = open.take().unwrap_or_else(|| new_state(unit));
                            let record = self.finish_unit(units[unit], todo[unit].2, state)?;
                            progress(&PrepareEvent::UnitDone {
                                unit: record.name.clone(),
                                bytes: units[unit].bytes,
                                tokens: record.shards.iter().map(|s| s.shard.counts.tokens).sum(),
                                reused: false,
                            });
                            done.push((todo[unit].0, record));
                        }
                        Step::Failed(e) => return Err(e),
                        Step::Nothing => {}
                    }
                }
            }
            if done.len() != todo.len() {
                return Err(DataError::Prepare(
                    "the corpus reader stopped before the end of the inputs".into(),
                ));
            }
            Ok(done)
        })
    }

    /// Parse, hash and tokenize one record (runs in parallel).
    fn encode_record(&self, raw: RawRecord, unit: &Unit) -> Encoded {
        match input::parse(raw, &self.opts.fields, unit.fixed.as_ref()) {
            Err(rejected) => Encoded::Skipped(rejected),
            Ok(ParsedDoc {
                domain,
                source,
                text,
            }) => {
                let hash = sha256_u64(text.as_bytes());
                match encode_document(self.tokenizer, &text, self.eos_id) {
                    Ok(ids) => Encoded::Doc {
                        domain,
                        source,
                        hash,
                        ids,
                    },
                    Err(e) => Encoded::Failed(DataError::Tokenizer {
                        path: self.dir.join(TOKENIZER_FILE),
                        reason: format!("cannot encode a document of {domain}/{source}: {e}"),
                    }),
                }
            }
        }
    }

    /// Counts or writes one encoded record (in corpus order).
    fn write(
        &self,
        state: &mut OpenUnit,
        unit: &Unit,
        key: &str,
        file: usize,
        line: u64,
        encoded: Encoded,
    ) -> Result<()> {
        let stats = &mut state.inputs[file];
        match encoded {
            Encoded::Failed(e) => Err(e),
            Encoded::Skipped(rejected) => {
                if self.opts.strict {
                    let line = rejected.line.unwrap_or(line);
                    return Err(strict_error(&unit.files[file], line, &rejected.detail));
                }
                stats.skipped.count(rejected.skip);
                Ok(())
            }
            Encoded::Doc {
                domain,
                source,
                hash,
                ids,
            } => {
                stats.documents += 1;
                let ppm = self.rates.ppm(&domain, &source);
                state
                    .validation_ppm
                    .insert(source_key(&domain, &source), ppm);
                let split = if is_validation(hash, ppm) {
                    Split::Validation
                } else {
                    let want = self.opts.min_validation_tokens;
                    if want > 0 {
                        let mut next = self.next_in_line.lock().unwrap_or_else(|e| e.into_inner());
                        let line = next.entry((domain.clone(), source.clone())).or_default();
                        line.push((hash % PPM) as u32, ids.len() as u64, want);
                    }
                    Split::Train
                };
                let writer = state
                    .writers
                    .entry((domain.clone(), source.clone(), split))
                    .or_insert_with(|| {
                        let split_name = match split {
                            Split::Train => "train",
                            Split::Validation => "valid",
                        };
                        ShardWriter::new(
                            self.dir,
                            format!(
                                "{SHARDS_DIR}/{domain}/{source}/{}.{}.{split_name}",
                                unit.name,
                                &key[..8]
                            ),
                            split,
                            self.dtype,
                            self.opts.max_shard_bytes,
                        )
                    });
                writer.push(&ids)
            }
        }
    }

    /// Completes a unit's shards and saves its record.
    fn finish_unit(&self, unit: &Unit, key: &str, state: OpenUnit) -> Result<UnitRecord> {
        let mut shards = Vec::new();
        for ((domain, source, _), writer) in state.writers {
            for shard in writer.finish()? {
                shards.push(UnitShard {
                    domain: domain.clone(),
                    source: source.clone(),
                    shard,
                });
            }
        }
        let record = UnitRecord {
            key: key.to_string(),
            id: unit.id.clone(),
            name: unit.name.clone(),
            validation_ppm: state.validation_ppm,
            inputs: state.inputs,
            shards,
        };
        save_record(self.dir, &record)?;
        Ok(record)
    }
}

fn save_record(dir: &Path, record: &UnitRecord) -> Result<()> {
    let path = dir.join(UNITS_DIR).join(format!("{}.json", record.name));
    let text = serde_json::to_vec_pretty(record)
        .map_err(|e| DataError::Prepare(format!("cannot serialise unit record: {e}")))?;
    write_file(&path, &text)
}

/// Writes a whole file atomically (the one helper every moelab crate shares).
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    moelab_io::write_atomic(path, bytes).map_err(|e| DataError::io(path, e))
}

/// The texts of `units` as pieces for the tokenizer trainer (records parsed in parallel batch
/// by batch), counting kept and skipped records per file into `stats`; the first `--strict`
/// problem or read error is left in `error`.
fn training_texts<'a>(
    rx: Receiver<Vec<Item>>,
    units: &'a [&'a Unit],
    opts: &'a PrepareOptions,
    error: &'a Mutex<Option<DataError>>,
    stats: &'a Mutex<Vec<Vec<InputStats>>>,
    progress: &'a (dyn Fn(&PrepareEvent) + Sync),
) -> impl Iterator<Item = String> + Send + 'a {
    rx.into_iter()
        .take_while(move |_| error.lock().map(|e| e.is_none()).unwrap_or(false))
        .flat_map(move |batch| {
            type Parsed = std::result::Result<
                (usize, usize, std::result::Result<String, Rejected>),
                DataError,
            >;
            let parsed: Vec<Option<Parsed>> = batch
                .into_par_iter()
                .map(|item| match item {
                    Item::Record {
                        unit,
                        file,
                        line,
                        raw,
                    } => match input::parse(raw, &opts.fields, units[unit].fixed.as_ref()) {
                        Ok(doc) => Some(Ok((unit, file, Ok(doc.text)))),
                        Err(r) if opts.strict => Some(Err(strict_error(
                            &units[unit].files[file],
                            r.line.unwrap_or(line),
                            &r.detail,
                        ))),
                        Err(r) => Some(Ok((unit, file, Err(r)))),
                    },
                    Item::FileEnd { unit, file } => {
                        let path = &units[unit].files[file];
                        progress(&PrepareEvent::FileRead {
                            path: path.clone(),
                            bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
                        });
                        None
                    }
                    Item::UnitEnd { .. } => None,
                    Item::Failed(e) => Some(Err(e)),
                })
                .collect();
            let mut pieces = Vec::new();
            let Ok(mut stats) = stats.lock() else {
                return pieces;
            };
            for p in parsed.into_iter().flatten() {
                match p {
                    Ok((unit, file, Ok(text))) => {
                        stats[unit][file].documents += 1;
                        pieces.extend(text_pieces(&text, PIECE_BYTES).map(str::to_string));
                    }
                    Ok((unit, file, Err(rejected))) => {
                        stats[unit][file].skipped.count(rejected.skip)
                    }
                    Err(e) => {
                        if let Ok(mut slot) = error.lock() {
                            slot.get_or_insert(e);
                        }
                        break;
                    }
                }
            }
            pieces
        })
}

/// Loads the given tokenizer (adding EOS if absent), or reuses the one an earlier prepare
/// trained into the folder, or trains one on every unit; saves it and describes it.
fn load_or_train_tokenizer(
    opts: &PrepareOptions,
    dir: &Path,
    units: &[Unit],
    progress: &(dyn Fn(&PrepareEvent) + Sync),
) -> Result<(Tokenizer, TokenizerInfo)> {
    let out_path = dir.join(TOKENIZER_FILE);
    let tok_err = |path: &Path, e: &dyn std::fmt::Display| DataError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let (mut tokenizer, trained_vocab) = match &opts.tokenizer {
        TokenizerChoice::File(path) => {
            let mut t = Tokenizer::from_file(path).map_err(|e| tok_err(path, &e))?;
            t.with_truncation(None).map_err(|e| tok_err(path, &e))?;
            t.with_padding(None);
            (t, None)
        }
        TokenizerChoice::Train(vocab) => {
            if *vocab < 260 {
                return Err(DataError::Prepare(format!(
                    "--train-tokenizer {vocab} is too small: a byte-level BPE needs 256 byte tokens + \
                     <|endoftext|>; use at least 260"
                )));
            }
            let stamp_path = dir.join(TRAIN_STAMP_FILE);
            let stamp = format!("bpe {vocab}");
            let previous = std::fs::read_to_string(&stamp_path).ok();
            let tokenizer = match previous {
                // Pinned: the dataset keeps its tokenizer, so new inputs leave old shards alone.
                Some(p) if p == stamp && out_path.is_file() => {
                    Tokenizer::from_file(&out_path).map_err(|e| tok_err(&out_path, &e))?
                }
                Some(p) if out_path.is_file() && p.starts_with("bpe ") => {
                    return Err(DataError::Prepare(format!(
                        "{} holds a tokenizer trained for {} ids, not {vocab}; prepare into a new folder to \
                         train another (its shards would all change)",
                        dir.display(),
                        p.trim_start_matches("bpe ")
                    )));
                }
                _ => {
                    let t = train_on(opts, units, *vocab, progress)?;
                    let text = t.to_string(false).map_err(|e| tok_err(&out_path, &e))?;
                    write_file(&out_path, text.as_bytes())?;
                    write_file(&stamp_path, stamp.as_bytes())?;
                    t
                }
            };
            (tokenizer, Some(*vocab))
        }
    };
    let eos = opts.eos_token.as_str();
    if tokenizer.token_to_id(eos).is_none() {
        tokenizer
            .add_special_tokens([AddedToken::from(eos, true)])
            .map_err(|e| tok_err(&out_path, &e))?;
    }
    let eos_id = tokenizer.token_to_id(eos).ok_or_else(|| {
        tok_err(
            &out_path,
            &format!("cannot add the end-of-document token {eos}"),
        )
    })?;
    if matches!(opts.tokenizer, TokenizerChoice::File(_)) {
        let text = tokenizer
            .to_string(false)
            .map_err(|e| tok_err(&out_path, &e))?;
        let unchanged = std::fs::read(&out_path)
            .ok()
            .is_some_and(|b| b == text.as_bytes());
        if !unchanged {
            write_file(&out_path, text.as_bytes())?;
        }
        let _ = std::fs::remove_file(dir.join(TRAIN_STAMP_FILE));
    }
    let bytes = std::fs::read(&out_path).map_err(|e| DataError::io(&out_path, e))?;
    // Ids can exceed the model's vocabulary only if they exceed this.
    let vocab_size = tokenizer.get_vocab_size(true).max(eos_id as usize + 1);
    Ok((
        tokenizer,
        TokenizerInfo {
            file: TOKENIZER_FILE.into(),
            sha256: sha256_hex(&bytes),
            vocab_size,
            eos_id,
            eos_token: opts.eos_token.clone(),
            trained_vocab,
        },
    ))
}

/// Trains a BPE on every document of `units`, streamed.
fn train_on(
    opts: &PrepareOptions,
    units: &[Unit],
    vocab: usize,
    progress: &(dyn Fn(&PrepareEvent) + Sync),
) -> Result<Tokenizer> {
    progress(&PrepareEvent::TrainingTokenizer {
        files: units.iter().map(|u| u.files.len()).sum(),
    });
    let all: Vec<&Unit> = units.iter().collect();
    let error = Mutex::new(None);
    let no_hashes = BTreeMap::new();
    let stats = Mutex::new(
        units
            .iter()
            .map(|u| fresh_stats(u, &no_hashes))
            .collect::<Vec<_>>(),
    );
    let trained = std::thread::scope(|scope| {
        let rx = spawn_reader(scope, all.clone(), &opts.fields, &opts.limits);
        // The trainer gets the same pieces the encoder does: word counts are the same (pieces
        // end at pre-token boundaries) and its memory per call stays bounded.
        let texts = training_texts(rx, &all, opts, &error, &stats, progress);
        train_bpe(vocab, texts)
    });
    if let Some(e) = error.into_inner().ok().flatten() {
        return Err(e);
    }
    let stats: Vec<InputStats> = stats
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect();
    if stats.iter().all(|s| s.documents == 0) {
        let inputs: Vec<&InputStats> = stats.iter().collect();
        return Err(DataError::Prepare(no_documents(&inputs, &opts.fields)));
    }
    trained.map_err(|e| DataError::Tokenizer {
        path: opts.out.join(TOKENIZER_FILE),
        reason: e,
    })
}

/// The manifest of `records` (in unit order): domains and sources sorted by name, each
/// source's shards in unit order.
fn build_manifest(
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

fn manifest_of(
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
fn remove_unlisted(dir: &Path, manifest: &Manifest, records: &BTreeSet<String>) -> Result<()> {
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

    // Everything the parts name is read and checked before anything is written.
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
    let result = (|| {
        let units_dir = work.dir.join(UNITS_DIR);
        std::fs::create_dir_all(&units_dir).map_err(|e| DataError::io(&units_dir, e))?;
        for (dir, record) in &records {
            for s in &record.shards {
                for f in [&s.shard.tokens_file, &s.shard.docs_file] {
                    link_or_copy(&dir.join(f), &work.dir.join(f))?;
                }
            }
            save_record(&work.dir, record)?;
        }
        link_or_copy(&tokenizer, &work.dir.join(&first.tokenizer.file))?;
        let manifest = manifest_of(
            first.tokenizer.clone(),
            first.dtype,
            first.validation_fraction,
            first.max_shard_bytes,
            records.into_iter().map(|r| r.1).collect(),
            None,
        );
        manifest.save(&work.dir.join(MANIFEST_FILE))?;
        Ok(manifest)
    })();
    match result {
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

/// Every shard path of a unit record is `shards/<domain>/<source>/<plain name>`.
fn check_record_paths(record: &UnitRecord) -> std::result::Result<(), String> {
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
    let got = crate::util::sha256_file(path)?;
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
