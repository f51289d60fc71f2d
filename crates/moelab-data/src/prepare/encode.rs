//! Encoding: what decides a unit's shards (its key, and whether a previous record can be
//! reused), and the encoder that parses and tokenizes records in parallel and writes them in
//! corpus order.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::hash::{sha256_u64, Hasher};
use crate::input::{self, ParsedDoc, RawRecord, Rejected};
use crate::manifest::{
    InputStats, Split, TokenDtype, TokenizerInfo, FORMAT_VERSION, TOKENIZER_FILE,
};
use crate::shard::ShardWriter;
use crate::tokenize::encode_document;
use crate::{DataError, Result};

use super::options::{PrepareEvent, PrepareOptions};
use super::reader::{fresh_stats, spawn_reader, strict_error, Item};
use super::units::{
    check_record_paths, save_record, Unit, UnitRecord, UnitShard, SHARDS_DIR, UNITS_DIR,
};
use super::validation::{is_validation, source_key, NextInLine, Rates, PPM};

/// Everything that decides a unit's shards.
pub(super) fn unit_key(
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
pub(super) fn reusable(
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

/// Encodes units into shards.
pub(super) struct Encoder<'a> {
    pub(super) opts: &'a PrepareOptions,
    pub(super) dir: &'a Path,
    pub(super) tokenizer: &'a Tokenizer,
    pub(super) eos_id: u32,
    pub(super) dtype: TokenDtype,
    pub(super) rates: &'a Rates,
    pub(super) hash_of: &'a BTreeMap<&'a Path, &'a str>,
    /// Per (domain, source), the training documents next in line for validation.
    pub(super) next_in_line: Mutex<BTreeMap<(String, String), NextInLine>>,
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
    pub(super) fn encode(
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
