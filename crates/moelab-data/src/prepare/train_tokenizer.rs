//! The tokenizer a prepare encodes with: a given tokenizer.json, or a byte-level BPE trained on
//! the corpus (streamed through the reader) and pinned in the dataset.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::Mutex;

use rayon::prelude::*;
use tokenizers::{AddedToken, Tokenizer};

use crate::hash::sha256_hex;
use crate::input::{self, Rejected};
use crate::manifest::{InputStats, TokenizerInfo, TOKENIZER_FILE};
use crate::tokenize::{text_pieces, train_bpe, PIECE_BYTES};
use crate::{DataError, Result};

use super::options::{PrepareEvent, PrepareOptions, TokenizerChoice};
use super::reader::{fresh_stats, no_documents, spawn_reader, strict_error, Item};
use super::units::{write_file, Unit};

/// Marks a tokenizer.json trained by prepare (and for which vocabulary).
const TRAIN_STAMP_FILE: &str = "tokenizer.train.json";

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
pub(super) fn load_or_train_tokenizer(
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
