//! `prepare`: raw domain-tagged files -> tokenizer -> per (domain, source) token shards with a
//! document index, a deterministic validation split, and a manifest.
//!
//! Work is split into *units* (a domain/source folder, or one JSONL file with a domain field).
//! Each finished unit leaves a record under `units/`; a re-run reuses a unit whose inputs,
//! tokenizer and split are unchanged and whose shards are intact, so an interrupted prepare
//! resumes where it stopped.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::manifest::{
    Counts, DomainEntry, InputStats, Manifest, ShardEntry, SourceEntry, Split, TokenDtype,
    TokenizerInfo, EOS_TOKEN, FORMAT_VERSION, MANIFEST_FILE, TOKENIZER_FILE,
};
use crate::util::{sha256_hex, sha256_u64, Hasher};
use crate::{DataError, Result};

/// Which tokenizer `prepare` encodes with.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerChoice {
    /// An existing Hugging Face tokenizer.json (`<|endoftext|>` is added if it lacks it).
    File(PathBuf),
    /// Train a byte-level BPE of this vocabulary size on the corpus.
    Train(usize),
}

/// Everything `prepare` needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareOptions {
    /// Domain folders' parents, or JSONL files whose records name their domain.
    pub inputs: Vec<PathBuf>,
    /// Output dataset folder.
    pub out: PathBuf,
    /// Tokenizer to use or train.
    pub tokenizer: TokenizerChoice,
    /// JSONL field naming a record's domain (files given directly).
    pub domain_field: String,
    /// JSONL field holding a record's text.
    pub text_field: String,
    /// Turn every skipped document (bad JSON, bad UTF-8, empty) into an error.
    pub strict: bool,
    /// Share of each domain's documents held out for validation.
    pub validation_fraction: f64,
    /// Worker threads (None: rayon's default, one per core).
    pub threads: Option<usize>,
}

impl PrepareOptions {
    /// Options with the CLI's defaults for fields, strictness and split.
    pub fn new(inputs: Vec<PathBuf>, out: PathBuf, tokenizer: TokenizerChoice) -> Self {
        PrepareOptions {
            inputs,
            out,
            tokenizer,
            domain_field: "domain".into(),
            text_field: "text".into(),
            strict: false,
            validation_fraction: crate::config::DEFAULT_VALIDATION_FRACTION,
            threads: None,
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
    /// One input file was read and parsed.
    FileRead {
        /// The file.
        path: PathBuf,
        /// Its size on disk.
        bytes: u64,
    },
    /// A tokenizer is being trained on this many documents.
    TrainingTokenizer {
        /// Documents fed to the trainer.
        documents: usize,
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
}

/// One document read from the corpus.
struct Doc {
    domain: String,
    source: String,
    text: String,
    /// Content hash: decides the split.
    hash: u64,
}

/// A set of input files encoded together into its own shards.
struct Unit {
    name: String,
    files: Vec<PathBuf>,
    /// Folder units fix domain and source; file units read them from each record.
    fixed: Option<(String, String)>,
}

/// The record a finished unit leaves under `units/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UnitRecord {
    key: String,
    shards: Vec<UnitShard>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UnitShard {
    domain: String,
    source: String,
    shard: ShardEntry,
}

const TEXT_EXTENSIONS: [&str; 1] = [".txt"];
const JSONL_EXTENSIONS: [&str; 3] = [".jsonl", ".jsonl.gz", ".jsonl.zst"];

/// Runs prepare; `progress` is called from worker threads.
pub fn prepare(
    opts: &PrepareOptions,
    progress: &(dyn Fn(&PrepareEvent) + Sync),
) -> Result<PrepareReport> {
    if !(0.0..1.0).contains(&opts.validation_fraction) {
        return Err(DataError::Prepare(format!(
            "--validation-fraction must be in [0, 1), got {}",
            opts.validation_fraction
        )));
    }
    match opts.threads {
        Some(threads) => rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| DataError::Prepare(format!("cannot start {threads} threads: {e}")))?
            .install(|| run(opts, progress)),
        None => run(opts, progress),
    }
}

fn run(opts: &PrepareOptions, progress: &(dyn Fn(&PrepareEvent) + Sync)) -> Result<PrepareReport> {
    let (units, ignored_files) = discover(opts)?;
    let all_files: Vec<(usize, &PathBuf)> = units
        .iter()
        .enumerate()
        .flat_map(|(u, unit)| unit.files.iter().map(move |f| (u, f)))
        .collect();
    let sizes: Vec<u64> = all_files
        .iter()
        .map(|(_, f)| {
            std::fs::metadata(f)
                .map(|m| m.len())
                .map_err(|e| DataError::io(*f, e))
        })
        .collect::<Result<_>>()?;
    progress(&PrepareEvent::Found {
        files: all_files.len(),
        bytes: sizes.iter().sum(),
    });
    std::fs::create_dir_all(&opts.out).map_err(|e| DataError::io(&opts.out, e))?;

    // Read and parse every file in parallel; results keep the discovery order.
    let read: Vec<(InputStats, Vec<Doc>)> = all_files
        .par_iter()
        .map(|(u, path)| {
            let result = read_file(path, &units[*u], opts);
            if let Ok((stats, _)) = &result {
                progress(&PrepareEvent::FileRead {
                    path: (*path).clone(),
                    bytes: stats.bytes,
                });
            }
            result
        })
        .collect::<Result<_>>()?;
    let mut unit_docs: Vec<Vec<Doc>> = units.iter().map(|_| Vec::new()).collect();
    let mut unit_inputs: Vec<Vec<InputStats>> = units.iter().map(|_| Vec::new()).collect();
    let mut inputs = Vec::with_capacity(read.len());
    for ((u, _), (stats, docs)) in all_files.iter().zip(read) {
        unit_docs[*u].extend(docs);
        unit_inputs[*u].push(stats.clone());
        inputs.push(stats);
    }
    if unit_docs.iter().all(Vec::is_empty) {
        return Err(DataError::Prepare(no_documents(&inputs, opts)));
    }

    let (tokenizer, info) = load_or_train_tokenizer(opts, &unit_docs, &inputs, progress)?;
    let dtype = TokenDtype::for_vocab(info.vocab_size);
    let validation = validation_set(&unit_docs, opts.validation_fraction);

    // Unit keys: everything that decides a unit's shards.
    let keys: Vec<String> = units
        .iter()
        .zip(&unit_inputs)
        .zip(&unit_docs)
        .map(|((unit, stats), docs)| {
            let mut h = Hasher::new();
            h.update(format!("format {FORMAT_VERSION} {dtype:?} {}", unit.name).as_bytes());
            h.update(info.sha256.as_bytes());
            h.update(format!("{} {}", opts.text_field, opts.domain_field).as_bytes());
            for s in stats {
                h.update(format!("{} {} {}", s.path, s.bytes, s.sha256).as_bytes());
            }
            for d in docs {
                let valid = validation.contains(&d.hash);
                h.update(&d.hash.to_le_bytes());
                h.update(&[u8::from(valid)]);
            }
            h.hex()
        })
        .collect();
    let units_dir = opts.out.join("units");
    std::fs::create_dir_all(&units_dir).map_err(|e| DataError::io(&units_dir, e))?;
    let previous: Vec<Option<UnitRecord>> = units
        .iter()
        .zip(&keys)
        .map(|(unit, key)| reusable(&opts.out, &units_dir, unit, key, dtype))
        .collect();
    progress(&PrepareEvent::Encoding {
        units: units.len(),
        reused: previous.iter().filter(|p| p.is_some()).count(),
    });

    let records: Vec<(UnitRecord, bool)> = units
        .par_iter()
        .zip(unit_docs.par_iter())
        .zip(unit_inputs.par_iter())
        .zip(keys.par_iter().zip(previous.into_par_iter()))
        .map(|(((unit, docs), stats), (key, previous))| {
            let bytes = stats.iter().map(|s| s.bytes).sum();
            let (record, reused) = match previous {
                Some(record) => (record, true),
                None => {
                    let record = encode_unit(
                        opts,
                        unit,
                        docs,
                        key,
                        &tokenizer,
                        info.eos_id,
                        dtype,
                        &validation,
                    )?;
                    let path = units_dir.join(format!("{}.json", unit.name));
                    let text = serde_json::to_vec_pretty(&record).map_err(|e| {
                        DataError::Prepare(format!("cannot serialise unit record: {e}"))
                    })?;
                    write_file(&path, &text)?;
                    (record, false)
                }
            };
            progress(&PrepareEvent::UnitDone {
                unit: unit.name.clone(),
                bytes,
                tokens: record.shards.iter().map(|s| s.shard.counts.tokens).sum(),
                reused,
            });
            Ok((record, reused))
        })
        .collect::<Result<_>>()?;

    let reused_units = records.iter().filter(|(_, r)| *r).count();
    let manifest = build_manifest(info, dtype, opts.validation_fraction, records, inputs);
    manifest.save(&opts.out.join(MANIFEST_FILE))?;
    Ok(PrepareReport {
        manifest,
        written_units: units.len() - reused_units,
        reused_units,
        ignored_files,
    })
}

/// The error of a corpus with no usable document: what each file held and why it was skipped.
fn no_documents(inputs: &[InputStats], opts: &PrepareOptions) -> String {
    const SHOWN: usize = 20;
    let mut lines: Vec<String> = inputs
        .iter()
        .take(SHOWN)
        .map(|s| {
            format!(
                "{}: {} kept, {} malformed (bad JSON or no string `{}`/`{}` field), {} invalid UTF-8, {} empty",
                s.path, s.documents, s.malformed, opts.text_field, opts.domain_field, s.invalid_utf8, s.empty
            )
        })
        .collect();
    if inputs.len() > SHOWN {
        lines.push(format!("... and {} more files", inputs.len() - SHOWN));
    }
    let malformed: u64 = inputs.iter().map(|s| s.malformed).sum();
    let hint = if malformed > 0 {
        format!(
            "check --text-field (now `{}`) and --domain-field (now `{}`), or run with --strict to stop at the \
             first bad line with its file and line number",
            opts.text_field, opts.domain_field
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

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

fn has_ext(path: &Path, exts: &[&str]) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    exts.iter().any(|e| name.ends_with(e))
}

fn is_supported(path: &Path) -> bool {
    has_ext(path, &TEXT_EXTENSIONS) || has_ext(path, &JSONL_EXTENSIONS)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| DataError::io(dir, err)))
        .collect::<Result<_>>()?;
    entries.sort();
    Ok(entries)
}

/// Supported files under `dir`, recursively, sorted; others are reported as ignored.
fn files_under(dir: &Path, ignored: &mut Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in sorted_entries(dir)? {
        if entry.is_dir() {
            files.extend(files_under(&entry, ignored)?);
        } else if is_supported(&entry) {
            files.push(entry);
        } else {
            ignored.push(entry);
        }
    }
    Ok(files)
}

/// Turns the inputs into units: one per domain/source folder, one per JSONL file.
fn discover(opts: &PrepareOptions) -> Result<(Vec<Unit>, Vec<PathBuf>)> {
    if opts.inputs.is_empty() {
        return Err(DataError::Prepare("no inputs given".into()));
    }
    let mut units: BTreeMap<String, Unit> = BTreeMap::new();
    let mut ignored = Vec::new();
    for input in &opts.inputs {
        if input.is_dir() {
            // Files directly in the corpus root (README, PROVENANCE, scripts) are not data.
            for domain_dir in sorted_entries(input)?.into_iter().filter(|p| p.is_dir()) {
                let domain = file_name(&domain_dir);
                if !is_name(&domain) {
                    return Err(DataError::Prepare(format!(
                        "{}: a domain folder name may use only letters, digits, '_', '-' and '.'",
                        domain_dir.display()
                    )));
                }
                for entry in sorted_entries(&domain_dir)? {
                    let (source, files) = if entry.is_dir() {
                        (file_name(&entry), files_under(&entry, &mut ignored)?)
                    } else if is_supported(&entry) {
                        ("default".to_string(), vec![entry.clone()])
                    } else {
                        ignored.push(entry);
                        continue;
                    };
                    if !is_name(&source) {
                        return Err(DataError::Prepare(format!(
                            "{}: a source folder name may use only letters, digits, '_', '-' and '.'",
                            entry.display()
                        )));
                    }
                    let name = format!("d.{domain}.{source}");
                    let unit = units.entry(name.clone()).or_insert_with(|| Unit {
                        name,
                        files: Vec::new(),
                        fixed: Some((domain.clone(), source.clone())),
                    });
                    unit.files.extend(files);
                }
            }
        } else if input.is_file() && has_ext(input, &JSONL_EXTENSIONS) {
            let stem: String = file_name(input)
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let tag = &sha256_hex(input.to_string_lossy().as_bytes())[..8];
            let name = format!("f.{stem}.{tag}");
            units.insert(
                name.clone(),
                Unit {
                    name,
                    files: vec![input.clone()],
                    fixed: None,
                },
            );
        } else if input.is_file() {
            return Err(DataError::Prepare(format!(
                "{}: a file given directly must be JSONL (.jsonl, .jsonl.gz, .jsonl.zst) with a `{}` field; \
                 put plain text files in a domain folder instead",
                input.display(),
                opts.domain_field
            )));
        } else {
            return Err(DataError::io(
                input,
                std::io::Error::new(std::io::ErrorKind::NotFound, "input not found"),
            ));
        }
    }
    let units: Vec<Unit> = units
        .into_values()
        .filter(|u| !u.files.is_empty())
        .collect();
    if units.is_empty() {
        return Err(DataError::Prepare(
            "no input files found: give folders of domain folders (holding .txt, .jsonl, .jsonl.gz or \
             .jsonl.zst files) or JSONL files"
                .into(),
        ));
    }
    Ok((units, ignored))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads a file whole, decompressing by extension.
fn read_bytes(path: &Path) -> Result<(Vec<u8>, u64, String)> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let size = raw.len() as u64;
    let hash = sha256_hex(&raw);
    let name = file_name(path).to_lowercase();
    let bytes = if name.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| corrupt_input(path, e))?;
        out
    } else if name.ends_with(".zst") {
        zstd::stream::decode_all(&raw[..]).map_err(|e| corrupt_input(path, e))?
    } else {
        raw
    };
    Ok((bytes, size, hash))
}

fn corrupt_input(path: &Path, e: std::io::Error) -> DataError {
    DataError::Input {
        path: path.to_path_buf(),
        line: 0,
        reason: format!("cannot decompress ({e}); the file is truncated or corrupt"),
    }
}

/// Parses one file into documents, counting (or, with `strict`, refusing) bad ones.
fn read_file(path: &Path, unit: &Unit, opts: &PrepareOptions) -> Result<(InputStats, Vec<Doc>)> {
    let (bytes, size, sha256) = read_bytes(path)?;
    let mut stats = InputStats {
        path: path.to_string_lossy().into_owned(),
        bytes: size,
        sha256,
        ..InputStats::default()
    };
    let mut docs = Vec::new();
    let problem = |line: u64, reason: String| DataError::Input {
        path: path.to_path_buf(),
        line,
        reason: format!("{reason} (drop --strict to skip and count such documents)"),
    };
    let mut push = |stats: &mut InputStats, domain: String, source: String, text: String| {
        stats.documents += 1;
        docs.push(Doc {
            hash: sha256_u64(text.as_bytes()),
            domain,
            source,
            text,
        });
    };
    if has_ext(path, &TEXT_EXTENSIONS) {
        let Some((domain, source)) = unit.fixed.clone() else {
            return Err(problem(0, "a text file needs a domain folder".into()));
        };
        match String::from_utf8(bytes) {
            Err(e) => {
                if opts.strict {
                    let valid = e.utf8_error().valid_up_to();
                    let line = 1 + e.as_bytes()[..valid]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count() as u64;
                    return Err(problem(line, "invalid UTF-8".into()));
                }
                stats.invalid_utf8 += 1;
            }
            Ok(text) if text.trim().is_empty() => {
                if opts.strict {
                    return Err(problem(1, "empty document".into()));
                }
                stats.empty += 1;
            }
            Ok(text) => push(&mut stats, domain, source, text),
        }
        return Ok((stats, docs));
    }
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i as u64 + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(line) = std::str::from_utf8(line) else {
            if opts.strict {
                return Err(problem(line_no, "invalid UTF-8".into()));
            }
            stats.invalid_utf8 += 1;
            continue;
        };
        let parsed = parse_record(line, unit, opts);
        match parsed {
            Err(reason) => {
                if opts.strict {
                    return Err(problem(line_no, reason));
                }
                stats.malformed += 1;
            }
            Ok((_, _, text)) if text.trim().is_empty() => {
                if opts.strict {
                    return Err(problem(line_no, "empty document".into()));
                }
                stats.empty += 1;
            }
            Ok((domain, source, text)) => push(&mut stats, domain, source, text),
        }
    }
    Ok((stats, docs))
}

/// (domain, source, text) of a JSONL record, or why it cannot be used.
fn parse_record(
    line: &str,
    unit: &Unit,
    opts: &PrepareOptions,
) -> std::result::Result<(String, String, String), String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("malformed JSON ({e})"))?;
    let field = |name: &str| value.get(name).and_then(|v| v.as_str());
    let text = field(&opts.text_field)
        .ok_or_else(|| format!("no string field `{}`", opts.text_field))?
        .to_string();
    let (domain, source) = match &unit.fixed {
        Some((d, s)) => (d.clone(), s.clone()),
        None => {
            let domain = field(&opts.domain_field)
                .ok_or_else(|| format!("no string field `{}`", opts.domain_field))?;
            let source = match value.get("source") {
                None | Some(serde_json::Value::Null) => "default",
                Some(v) => v.as_str().ok_or("field `source` is not a string")?,
            };
            for (what, name) in [("domain", domain), ("source", source)] {
                if !is_name(name) {
                    return Err(format!(
                        "{what} `{name}` may use only letters, digits, '_', '-' and '.'"
                    ));
                }
            }
            (domain.to_string(), source.to_string())
        }
    };
    Ok((domain, source, text))
}

/// Loads the given tokenizer (adding EOS if absent) or trains one, saves it into the output,
/// and describes it.
fn load_or_train_tokenizer(
    opts: &PrepareOptions,
    unit_docs: &[Vec<Doc>],
    inputs: &[InputStats],
    progress: &(dyn Fn(&PrepareEvent) + Sync),
) -> Result<(Tokenizer, TokenizerInfo)> {
    let out_path = opts.out.join(TOKENIZER_FILE);
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
            // Training is the slowest step; reuse the previous run's tokenizer when it was
            // trained on the same files for the same vocabulary.
            let stamp_path = opts.out.join("tokenizer.train.json");
            let mut h = Hasher::new();
            h.update(format!("bpe {vocab} {} {}", opts.text_field, opts.domain_field).as_bytes());
            for s in inputs {
                h.update(s.sha256.as_bytes());
            }
            let stamp = h.hex();
            let previous = std::fs::read_to_string(&stamp_path).ok();
            let reuse = previous.as_deref() == Some(stamp.as_str()) && out_path.is_file();
            let tokenizer = if reuse {
                Tokenizer::from_file(&out_path).map_err(|e| tok_err(&out_path, &e))?
            } else {
                // The trainer gets the same pieces the encoder does: word counts are the same
                // (pieces end at pre-token boundaries) and its memory per call stays bounded.
                let texts: Vec<&str> = unit_docs
                    .iter()
                    .flatten()
                    .flat_map(|d| text_pieces(&d.text, PIECE_BYTES))
                    .collect();
                progress(&PrepareEvent::TrainingTokenizer {
                    documents: unit_docs.iter().map(Vec::len).sum(),
                });
                let t = train_bpe(*vocab, &texts).map_err(|e| tok_err(&out_path, &e))?;
                let _ = std::fs::remove_file(&stamp_path);
                t
            };
            if !reuse {
                let text = tokenizer
                    .to_string(false)
                    .map_err(|e| tok_err(&out_path, &e))?;
                write_file(&out_path, text.as_bytes())?;
                write_file(&stamp_path, stamp.as_bytes())?;
            }
            (tokenizer, Some(*vocab))
        }
    };
    if tokenizer.token_to_id(EOS_TOKEN).is_none() {
        tokenizer
            .add_special_tokens([AddedToken::from(EOS_TOKEN, true)])
            .map_err(|e| tok_err(&out_path, &e))?;
    }
    let eos_id = tokenizer
        .token_to_id(EOS_TOKEN)
        .ok_or_else(|| tok_err(&out_path, &"cannot add the <|endoftext|> token"))?;
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
            eos_token: EOS_TOKEN.into(),
            trained_vocab,
        },
    ))
}

/// Longest text handed to the tokenizer in one call. The Hugging Face tokenizer keeps about
/// 100-200 bytes of bookkeeping per input byte while it works on a text, so a 50 MB document
/// encoded whole peaked at 6.6 GB; documents up to this size are encoded whole, exactly as
/// before, longer ones in pieces of about this size.
pub const PIECE_BYTES: usize = 1 << 20;

/// Cuts `text` into pieces of at most `max` bytes (one piece when it fits).
///
/// A cut goes just before a whitespace run that follows a non-whitespace character, as late as
/// possible (a space preferred over other whitespace within the last half). GPT-2 style
/// pre-tokenizers (byte-level BPE, ours included) never join text across such a point, so the
/// ids are the same as for the whole text; a space rather than a newline keeps that true for
/// tokenizers that add a prefix space to each input. Only text with no whitespace at all in a
/// window (no such point exists) is cut at a character boundary, which can split one word.
pub(crate) fn text_pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let max = max.max(8);
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() <= max {
            return Some(std::mem::take(&mut rest));
        }
        let cut = piece_end(rest, max);
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Where the first piece of `text` (longer than `max`) ends; see [`text_pieces`].
fn piece_end(text: &str, max: usize) -> usize {
    let bytes = text.as_bytes();
    let mut whitespace = None;
    for p in (1..=max).rev() {
        // ASCII whitespace bytes are always character boundaries.
        if bytes[p].is_ascii_whitespace()
            && text[..p]
                .chars()
                .next_back()
                .is_some_and(|c| !c.is_whitespace())
        {
            if bytes[p] == b' ' {
                return p;
            }
            whitespace.get_or_insert(p);
        }
        // A space is worth a shorter piece, but not one below half the size.
        if p <= max / 2 {
            if let Some(p) = whitespace {
                return p;
            }
        }
    }
    whitespace.unwrap_or_else(|| {
        let mut p = max;
        while !text.is_char_boundary(p) {
            p -= 1;
        }
        p
    })
}

/// A GPT-2 style byte-level BPE with `<|endoftext|>` as its only special token.
pub fn train_bpe(vocab_size: usize, texts: &[&str]) -> std::result::Result<Tokenizer, String> {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, false, true)));
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| format!("training failed: {e}"))?;
    Ok(tokenizer)
}

/// Text a domain's validation split gets at least (about 4-5k tokens: a stable loss estimate
/// even for small corpora), as long as that stays within a quarter of the domain.
pub const MIN_VALIDATION_BYTES: usize = 16 * 1024;

/// Hashes of the validation documents: those with hash % 1e6 below fraction * 1e6, then more in
/// hash order until the domain has [`MIN_VALIDATION_BYTES`] (never past a quarter of its
/// text), at least one document when it has two, and never every document.
fn validation_set(unit_docs: &[Vec<Doc>], fraction: f64) -> std::collections::HashSet<u64> {
    const SCALE: u64 = 1_000_000;
    let threshold = (fraction * SCALE as f64).round() as u64;
    let mut by_domain: BTreeMap<&str, BTreeMap<u64, usize>> = BTreeMap::new();
    for doc in unit_docs.iter().flatten() {
        *by_domain
            .entry(doc.domain.as_str())
            .or_default()
            .entry(doc.hash)
            .or_default() += doc.text.len();
    }
    let mut set = std::collections::HashSet::new();
    if fraction <= 0.0 {
        return set;
    }
    for docs in by_domain.values() {
        let mut order: Vec<(u64, usize)> = docs.iter().map(|(h, n)| (*h, *n)).collect();
        order.sort_unstable_by_key(|(h, _)| (h % SCALE, *h));
        let total: usize = order.iter().map(|(_, n)| n).sum();
        let mut chosen = 0usize;
        let mut bytes = 0usize;
        for (i, (h, n)) in order.iter().enumerate() {
            let by_hash = h % SCALE < threshold;
            let by_floor = bytes < MIN_VALIDATION_BYTES && 4 * (bytes + n) <= total;
            if by_hash || by_floor || i == 0 {
                chosen = i + 1;
                bytes += n;
            } else {
                break;
            }
        }
        if chosen == order.len() && order.len() >= 2 {
            chosen -= 1;
        }
        if order.len() < 2 {
            chosen = 0;
        }
        set.extend(order[..chosen].iter().map(|(h, _)| *h));
    }
    set
}

/// A unit's previous record, if its key matches and its shards are all present at full size.
fn reusable(
    out: &Path,
    units_dir: &Path,
    unit: &Unit,
    key: &str,
    dtype: TokenDtype,
) -> Option<UnitRecord> {
    let text = std::fs::read(units_dir.join(format!("{}.json", unit.name))).ok()?;
    let record: UnitRecord = serde_json::from_slice(&text).ok()?;
    if record.key != key {
        return None;
    }
    let intact = record.shards.iter().all(|s| {
        let size = |f: &str| std::fs::metadata(out.join(f)).map(|m| m.len()).ok();
        size(&s.shard.tokens_file) == Some(s.shard.counts.tokens * dtype.bytes() as u64)
            && size(&s.shard.docs_file) == Some(s.shard.counts.documents * 8)
    });
    intact.then_some(record)
}

#[allow(clippy::too_many_arguments)]
fn encode_unit(
    opts: &PrepareOptions,
    unit: &Unit,
    docs: &[Doc],
    key: &str,
    tokenizer: &Tokenizer,
    eos_id: u32,
    dtype: TokenDtype,
    validation: &std::collections::HashSet<u64>,
) -> Result<UnitRecord> {
    let encoded: Vec<Vec<u32>> = docs
        .par_iter()
        .map(|doc| {
            let encode = |piece: &&str| {
                tokenizer
                    .encode_fast(*piece, false)
                    .map(|enc| enc.get_ids().to_vec())
                    .map_err(|e| DataError::Tokenizer {
                        path: opts.out.join(TOKENIZER_FILE),
                        reason: format!(
                            "cannot encode a document of {}/{}: {e}",
                            doc.domain, doc.source
                        ),
                    })
            };
            // Piece by piece: the tokenizer's per-token bookkeeping (an Encoding, alignments
            // per byte) then lives for one piece per thread, not for the whole document.
            let pieces: Vec<&str> = text_pieces(&doc.text, PIECE_BYTES).collect();
            let mut ids = match pieces.as_slice() {
                [] => Vec::new(),
                [whole] => encode(whole)?,
                _ => pieces
                    .par_iter()
                    .map(encode)
                    .collect::<Result<Vec<_>>>()?
                    .concat(),
            };
            ids.push(eos_id);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    // Group documents by (domain, source, split), keeping their order.
    let mut groups: BTreeMap<(&str, &str, Split), Vec<&[u32]>> = BTreeMap::new();
    for (doc, ids) in docs.iter().zip(&encoded) {
        let split = if validation.contains(&doc.hash) {
            Split::Validation
        } else {
            Split::Train
        };
        groups
            .entry((doc.domain.as_str(), doc.source.as_str(), split))
            .or_default()
            .push(ids);
    }
    let mut shards = Vec::new();
    for ((domain, source, split), docs) in groups {
        let dir = format!("shards/{domain}/{source}");
        std::fs::create_dir_all(opts.out.join(&dir))
            .map_err(|e| DataError::io(opts.out.join(&dir), e))?;
        let split_name = match split {
            Split::Train => "train",
            Split::Validation => "valid",
        };
        let tokens_file = format!("{dir}/{}.{split_name}.tokens", unit.name);
        let docs_file = format!("{dir}/{}.{split_name}.docs", unit.name);
        let (tokens, tokens_sha256) = write_tokens(&opts.out.join(&tokens_file), &docs, dtype)?;
        let mut index = Vec::with_capacity(docs.len() * 8);
        let mut end = 0u64;
        for d in &docs {
            end += d.len() as u64;
            index.extend_from_slice(&end.to_le_bytes());
        }
        write_file(&opts.out.join(&docs_file), &index)?;
        shards.push(UnitShard {
            domain: domain.to_string(),
            source: source.to_string(),
            shard: ShardEntry {
                split,
                tokens_file,
                docs_file,
                counts: Counts {
                    documents: docs.len() as u64,
                    tokens,
                },
                tokens_sha256,
                docs_sha256: sha256_hex(&index),
            },
        });
    }
    Ok(UnitRecord {
        key: key.to_string(),
        shards,
    })
}

/// Writes documents' ids as little-endian `dtype`, atomically; returns their count and sha256.
fn write_tokens(path: &Path, docs: &[&[u32]], dtype: TokenDtype) -> Result<(u64, String)> {
    let mut hasher = Hasher::new();
    let mut n = 0u64;
    moelab_io::write_atomic_with(path, |writer| {
        let mut buf = Vec::with_capacity(1 << 16);
        for doc in docs {
            for chunk in doc.chunks(1 << 14) {
                buf.clear();
                match dtype {
                    TokenDtype::U16 => {
                        for &id in chunk {
                            // Ids fit: the dtype was chosen from the vocabulary size.
                            buf.extend_from_slice(&(id as u16).to_le_bytes());
                        }
                    }
                    TokenDtype::U32 => {
                        for &id in chunk {
                            buf.extend_from_slice(&id.to_le_bytes());
                        }
                    }
                }
                hasher.update(&buf);
                writer.write_all(&buf)?;
                n += chunk.len() as u64;
            }
        }
        Ok(())
    })
    .map_err(|e| DataError::io(path, e))?;
    Ok((n, hasher.hex()))
}

/// Writes a whole file atomically (the one helper every moelab crate shares).
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    moelab_io::write_atomic(path, bytes).map_err(|e| DataError::io(path, e))
}

fn build_manifest(
    tokenizer: TokenizerInfo,
    dtype: TokenDtype,
    validation_fraction: f64,
    records: Vec<(UnitRecord, bool)>,
    inputs: Vec<InputStats>,
) -> Manifest {
    let mut tree: BTreeMap<String, BTreeMap<String, Vec<ShardEntry>>> = BTreeMap::new();
    // Units are sorted by name, so each source's shards come in a fixed order.
    for (record, _) in records {
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
        domains,
        inputs,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::util::mix64;

    /// Text with the whitespace a cut must respect: runs of spaces, newlines, tabs, CRLF,
    /// non-ASCII letters and whitespace, punctuation and digits.
    fn awkward_text(words: usize) -> String {
        let parts = [
            "the",
            " ",
            "river",
            "  ",
            "stone",
            "\n",
            "\n\n",
            "x=1;",
            "\t",
            "déjà",
            "\u{3000}",
            "vu",
            "\r\n",
            "42",
            "   ",
            "(proof)",
            " ",
            "ünïcode",
            "\n ",
            "end.",
        ];
        let mut s = String::new();
        let mut state = 7u64;
        for _ in 0..words {
            state = mix64(state);
            s.push_str(parts[(state % parts.len() as u64) as usize]);
        }
        s
    }

    #[test]
    fn pieces_cover_the_text_within_the_size() {
        let text = awkward_text(3000);
        for max in [8, 50, 64, 200, 1000] {
            let pieces: Vec<&str> = text_pieces(&text, max).collect();
            assert_eq!(pieces.concat(), text, "max {max}");
            assert!(pieces.iter().all(|p| p.len() <= max && !p.is_empty()));
        }
        assert_eq!(text_pieces("short", 64).collect::<Vec<_>>(), ["short"]);
        assert_eq!(text_pieces("", 64).count(), 0);
        // No whitespace at all: cut at character boundaries.
        let dense = "é".repeat(100);
        let pieces: Vec<&str> = text_pieces(&dense, 11).collect();
        assert_eq!(pieces.concat(), dense);
        assert!(pieces.iter().all(|p| p.len() <= 11));
    }

    #[test]
    fn pieces_give_the_same_ids_as_the_whole_text() {
        let train = awkward_text(4000);
        let mut tokenizer = train_bpe(400, &[train.as_str()]).unwrap();
        let text = awkward_text(20_000);
        let whole = |t: &Tokenizer| {
            t.encode_fast(text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec()
        };
        let pieced = |t: &Tokenizer, max: usize| -> Vec<u32> {
            text_pieces(&text, max)
                .flat_map(|p| t.encode_fast(p, false).unwrap().get_ids().to_vec())
                .collect()
        };
        let expected = whole(&tokenizer);
        assert!(expected.len() > 1000);
        // (At 300 bytes and more no run of non-whitespace in this text fills a window.)
        for max in [300, 4096] {
            let got = pieced(&tokenizer, max);
            let first = (0..expected.len().min(got.len())).find(|&i| expected[i] != got[i]);
            assert_eq!(first, None, "max {max}: ids differ");
            assert_eq!(got.len(), expected.len(), "max {max}");
        }
        // A byte-level tokenizer that adds a prefix space to every input (GPT-2 style
        // configurations): pieces start with a space where one is available.
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(true, true, true)));
        let expected = whole(&tokenizer);
        let got = pieced(&tokenizer, 4096);
        let differing = expected.iter().zip(&got).filter(|(a, b)| a != b).count()
            + expected.len().abs_diff(got.len());
        assert_eq!(differing, 0);
        // The trainer sees the same words in pieces as whole.
        let whole_bpe = train_bpe(400, &[text.as_str()]).unwrap();
        let pieces: Vec<&str> = text_pieces(&text, 300).collect();
        let pieced_bpe = train_bpe(400, &pieces).unwrap();
        assert_eq!(
            whole_bpe.to_string(false).unwrap(),
            pieced_bpe.to_string(false).unwrap()
        );
    }
}
