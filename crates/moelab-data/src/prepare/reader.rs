//! The reader thread that streams the units' records in order, in bounded batches, and the
//! per-file counts and errors that encoding and tokenizer training share.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender};

use crate::input::{self, Fields, RawRecord, RecordReader};
use crate::manifest::InputStats;
use crate::DataError;

use super::units::Unit;

/// The error of a corpus with no usable document: what each file held and why it was skipped.
pub(super) fn no_documents(inputs: &[&InputStats], fields: &Fields) -> String {
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

/// What the reader thread sends: records, and where files and units end.
pub(super) enum Item {
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
pub(super) fn spawn_reader<'scope>(
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
pub(super) fn strict_error(path: &Path, line: u64, detail: &str) -> DataError {
    DataError::Input {
        path: path.to_path_buf(),
        line,
        reason: format!("{detail} (drop --strict to skip and count such documents)"),
    }
}

/// Per-file statistics being counted.
pub(super) fn fresh_stats(unit: &Unit, hash_of: &BTreeMap<&Path, &str>) -> Vec<InputStats> {
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
