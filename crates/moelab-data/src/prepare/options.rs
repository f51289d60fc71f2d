//! What a prepare is asked for and what it reports: options, progress events, the report,
//! and the check of the options before anything is read.

use std::path::PathBuf;

use crate::input::{self, Fields};
use crate::manifest::{Manifest, EOS_TOKEN};
use crate::walk::SkippedLink;
use crate::{DataError, Result};

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
    /// Prepare only this slice of the units (merge the parts with [`merge`](super::merge)).
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

/// Most worker threads `prepare --threads` starts (far above any machine's useful count; a
/// typo such as 100000 would otherwise spawn threads for minutes).
pub const MAX_THREADS: usize = 1024;

pub(super) fn check_options(opts: &PrepareOptions) -> Result<()> {
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
