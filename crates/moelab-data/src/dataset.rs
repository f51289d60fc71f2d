//! A prepared dataset opened for reading: memory-mapped shards checked against the manifest.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::batch::Batch;
use crate::hash::Hasher;
use crate::manifest::{Counts, Manifest, ShardEntry, Split, TokenDtype, MANIFEST_FILE};
use crate::{DataError, Result};

/// A read-only view of one shard's token file.
struct ShardTokens {
    /// The token file (named in errors).
    path: PathBuf,
    /// None for an empty file (zero-length files cannot be mapped everywhere).
    map: Option<Mmap>,
    tokens: u64,
}

/// The concatenation of some shards' tokens, readable at any token offset.
pub(crate) struct TokenStream {
    shards: Vec<ShardTokens>,
    /// Token offset at which each shard starts, plus the total at the end.
    starts: Vec<u64>,
    dtype: TokenDtype,
    /// Ids must be below this (the tokenizer's vocabulary size).
    vocab_size: u64,
    /// The dataset folder (named in the fix of an out-of-range id).
    dir: PathBuf,
}

impl TokenStream {
    /// Total tokens.
    pub(crate) fn len(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Appends tokens [start, start + len) to `out`; the caller keeps the range in bounds.
    pub(crate) fn copy_into(&self, start: u64, len: usize, out: &mut Vec<u32>) -> Result<()> {
        let end = start + len as u64;
        if end > self.len() {
            return Err(DataError::Argument(format!(
                "token range {start}..{end} beyond the stream's {} tokens",
                self.len()
            )));
        }
        // The shard holding `start`: the last one whose start offset is <= start.
        let mut shard = self
            .starts
            .partition_point(|&s| s <= start)
            .saturating_sub(1);
        let mut pos = start;
        while pos < end {
            let shard_start = self.starts[shard];
            let shard_end = self.starts[shard + 1];
            let take_end = end.min(shard_end);
            if take_end > pos {
                let bytes = self.shards[shard].map.as_deref().unwrap_or(&[]);
                let width = self.dtype.bytes();
                let lo = (pos - shard_start) as usize * width;
                let hi = (take_end - shard_start) as usize * width;
                let first = out.len();
                decode_into(self.dtype, &bytes[lo..hi], out);
                // A damaged shard or one written with another tokenizer: stop here, naming the
                // file and offset, rather than let the model fail on an id it cannot embed.
                if let Some(k) = out[first..]
                    .iter()
                    .position(|&id| u64::from(id) >= self.vocab_size)
                {
                    return Err(DataError::CorruptShard {
                        path: self.shards[shard].path.clone(),
                        reason: format!(
                            "token {} is id {}, outside the tokenizer's {} ids (the shard is damaged or was \
                             written with another tokenizer); `moelab data inspect {} --verify` checks every shard",
                            pos - shard_start + k as u64,
                            out[first + k],
                            self.vocab_size,
                            self.dir.display()
                        ),
                    });
                }
            }
            pos = take_end;
            shard += 1;
        }
        Ok(())
    }
}

/// Little-endian ids to u32; written as plain loops so the compiler vectorises them.
fn decode_into(dtype: TokenDtype, bytes: &[u8], out: &mut Vec<u32>) {
    match dtype {
        TokenDtype::U16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
        ),
        TokenDtype::U32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
    }
}

/// One source's training and validation streams.
pub(crate) struct SourceData {
    pub(crate) name: String,
    pub(crate) train: TokenStream,
    pub(crate) validation: TokenStream,
}

/// What evaluation scores of one domain's validation stream (see [`Dataset::validation_plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationPlan {
    /// Domain name.
    pub domain: String,
    /// Validation documents the domain has.
    pub documents: u64,
    /// Validation tokens the domain has (one EOS per document included).
    pub available: u64,
    /// Target tokens evaluation scores: whole sequences, at most `data.validation_tokens`.
    pub scored: u64,
    /// Why not even one sequence fits, with the fix (None: at least one does).
    pub shortfall: Option<String>,
}

/// A prepared dataset: manifest, tokenizer and memory-mapped shards.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    domains: Vec<String>,
    sources: Vec<Vec<SourceData>>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("dir", &self.dir)
            .field("domains", &self.domains)
            .finish_non_exhaustive()
    }
}

impl Dataset {
    /// Opens a prepared dataset; every shard's size and document index are checked against
    /// the manifest (use [`Dataset::verify`] for the full content-hash check).
    pub fn open(dir: &Path) -> Result<Dataset> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest = Manifest::load(&manifest_path)?;
        let tokenizer = dir.join(&manifest.tokenizer.file);
        if !tokenizer.is_file() {
            return Err(DataError::Manifest {
                path: manifest_path,
                reason: format!("its tokenizer {} is missing", tokenizer.display()),
            });
        }
        let mut sources = Vec::with_capacity(manifest.domains.len());
        for domain in &manifest.domains {
            let mut list = Vec::with_capacity(domain.sources.len());
            for source in &domain.sources {
                let vocab = manifest.tokenizer.vocab_size;
                let train = open_stream(dir, manifest.dtype, vocab, &source.shards, Split::Train)?;
                let validation = open_stream(
                    dir,
                    manifest.dtype,
                    vocab,
                    &source.shards,
                    Split::Validation,
                )?;
                if train.len() != source.train.tokens
                    || validation.len() != source.validation.tokens
                {
                    return Err(DataError::Manifest {
                        path: manifest_path,
                        reason: format!(
                            "{}/{}: shard token counts do not add up to the source's counts",
                            domain.name, source.name
                        ),
                    });
                }
                list.push(SourceData {
                    name: source.name.clone(),
                    train,
                    validation,
                });
            }
            sources.push(list);
        }
        let domains = manifest.domains.iter().map(|d| d.name.clone()).collect();
        Ok(Dataset {
            dir: dir.to_path_buf(),
            manifest,
            domains,
            sources,
        })
    }

    /// Full check of every shard against the manifest (what `moelab data inspect --verify`
    /// runs): the tokenizer's and every file's sha256, sizes, every id below the vocabulary
    /// size, and a document index whose every document ends with `<|endoftext|>`. The error
    /// names the first bad file and the token and document offset of the first bad id.
    pub fn verify(&self) -> Result<()> {
        let tokenizer = self.tokenizer_path();
        let hash = crate::hash::sha256_file(&tokenizer)?;
        if hash != self.manifest.tokenizer.sha256 {
            return Err(DataError::Manifest {
                path: self.dir.join(MANIFEST_FILE),
                reason: format!(
                    "{} has sha256 {hash}, the manifest says {}: the tokenizer was replaced after \
                     `moelab prepare` wrote the shards; restore it or re-run `moelab prepare` into a new folder",
                    tokenizer.display(),
                    self.manifest.tokenizer.sha256
                ),
            });
        }
        for domain in &self.manifest.domains {
            for source in &domain.sources {
                for shard in &source.shards {
                    verify_shard(&self.dir, &self.manifest, shard)?;
                }
            }
        }
        Ok(())
    }

    /// Domain names, sorted; a domain id is an index into this list.
    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    /// The id of a domain by name.
    pub fn domain_id(&self, name: &str) -> Option<usize> {
        self.domains.iter().position(|d| d == name)
    }

    /// Source names of a domain, sorted; a source id is an index into this list.
    pub fn sources(&self, domain: usize) -> Vec<String> {
        self.sources
            .get(domain)
            .map(|s| s.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Number of token ids (the model's vocab_size must be at least this).
    pub fn vocab_size(&self) -> usize {
        self.manifest.tokenizer.vocab_size
    }

    /// The end-of-document token id.
    pub fn eos_id(&self) -> u32 {
        self.manifest.tokenizer.eos_id
    }

    /// The dataset's tokenizer.json.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tokenizer.file)
    }

    /// The dataset folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Training counts of one source.
    pub fn train_counts(&self, domain: usize, source: usize) -> Counts {
        self.manifest
            .domains
            .get(domain)
            .and_then(|d| d.sources.get(source))
            .map(|s| s.train)
            .unwrap_or_default()
    }

    /// Validation counts of a whole domain.
    pub fn validation_counts(&self, domain: usize) -> Counts {
        let mut total = Counts::default();
        if let Some(d) = self.manifest.domains.get(domain) {
            for s in &d.sources {
                total.add(s.validation);
            }
        }
        total
    }

    /// Whole validation sequences (chunks of seq_len + 1 tokens) each source of `domain` holds.
    fn source_chunks(&self, domain: usize, seq_len: usize) -> Vec<u64> {
        let chunk = seq_len as u64 + 1;
        self.sources.get(domain).map_or_else(Vec::new, |sources| {
            sources.iter().map(|s| s.validation.len() / chunk).collect()
        })
    }

    /// How many validation sequences evaluation takes from each source of `domain`: at most
    /// `max_tokens / seq_len` in all, shared in proportion to the whole sequences each source
    /// holds (largest remainder, ties to the earlier source), so that every source of a domain
    /// counts in its loss and not only the first ones by name.
    fn source_quotas(&self, domain: usize, seq_len: usize, max_tokens: u64) -> Vec<u64> {
        let held = self.source_chunks(domain, seq_len);
        let total: u64 = held.iter().sum();
        let wanted = (max_tokens / seq_len.max(1) as u64).min(total);
        proportional_quotas(&held, wanted)
    }

    pub(crate) fn source_data(&self, domain: usize, source: usize) -> Option<&SourceData> {
        self.sources.get(domain).and_then(|s| s.get(source))
    }

    pub(crate) fn source_count(&self, domain: usize) -> usize {
        self.sources.get(domain).map_or(0, Vec::len)
    }

    /// Checks, without reading any token, that the run's `data.validation_tokens` leaves room
    /// for one validation sequence, so a run can refuse a config before step 1 instead of
    /// failing at its first evaluation.
    ///
    /// Call it with the run's `data.seq_len`, `data.validation_tokens` and micro-batch size
    /// once the dataset is open. The error (a [`DataError::Config`] for key
    /// `data.validation_tokens`) gives the fix: raise it to at least seq_len. A domain whose
    /// own validation split is too short is not an error here (the user set no key for it):
    /// [`Dataset::validation_plan`] reports it, and evaluation leaves its loss unmeasured.
    pub fn check_validation(
        &self,
        seq_len: usize,
        validation_tokens: u64,
        micro_batch: usize,
    ) -> Result<()> {
        if seq_len == 0 || micro_batch == 0 {
            return Err(DataError::Argument(format!(
                "validation needs seq_len >= 1 and a micro-batch >= 1, got seq_len {seq_len} and micro-batch {micro_batch}"
            )));
        }
        if validation_tokens < seq_len as u64 {
            return Err(DataError::config(
                "data.validation_tokens",
                too_few_validation_tokens(validation_tokens, seq_len, &self.domains.join(", ")),
            ));
        }
        Ok(())
    }

    /// What evaluation will score of each domain's validation stream with `data.seq_len =
    /// seq_len` and `data.validation_tokens = validation_tokens`, in domain order (counts only;
    /// no token is read).
    pub fn validation_plan(&self, seq_len: usize, validation_tokens: u64) -> Vec<ValidationPlan> {
        let seq = seq_len.max(1) as u64;
        (0..self.domains.len())
            .map(|d| {
                let counts = self.validation_counts(d);
                // As validation_batches cuts it: whole chunks of seq_len + 1 inside each
                // source, shared over the sources, up to the cap.
                let sequences: u64 = self
                    .source_quotas(d, seq_len, validation_tokens)
                    .iter()
                    .sum();
                ValidationPlan {
                    domain: self.domains[d].clone(),
                    documents: counts.documents,
                    available: counts.tokens,
                    scored: sequences * seq,
                    shortfall: self.validation_shortfall(d, seq_len),
                }
            })
            .collect()
    }

    /// Why `domain`'s validation stream would hold no sequence, with the fix (None: it is fine).
    fn validation_shortfall(&self, domain: usize, seq_len: usize) -> Option<String> {
        let name = self.domains.get(domain)?;
        let chunk = seq_len as u64 + 1;
        let counts = self.validation_counts(domain);
        if self.source_chunks(domain, seq_len).iter().all(|&c| c == 0) {
            let what = if counts.documents == 0 {
                "no validation documents".to_string()
            } else {
                format!(
                    "{} validation tokens in {} documents, and no source holds one sequence of seq_len + 1 = {chunk}",
                    counts.tokens, counts.documents
                )
            };
            return Some(format!(
                "domain `{name}` has {what}; re-run `moelab prepare` with a larger --validation-fraction \
                 (it was {}) or add documents to the domain, or lower data.seq_len",
                self.manifest.validation_fraction
            ));
        }
        None
    }

    /// The fixed validation stream of one domain, as batches of up to `batch_sequences`
    /// sequences of seq_len (+1 for targets); identical across ablations whatever the mixture.
    ///
    /// Each source's validation documents (in prepare order) are cut into chunks of seq_len + 1
    /// tokens; the stream takes at most `max_tokens / seq_len` chunks, shared over the sources
    /// in proportion to the chunks each holds (a domain's loss weighs every source, not only
    /// the first ones by name), source after source in name order. It is an error (the one
    /// [`Dataset::check_validation`] gives up front) if no source holds one chunk.
    pub fn validation_batches(
        &self,
        domain: usize,
        seq_len: usize,
        max_tokens: u64,
        batch_sequences: usize,
    ) -> Result<Vec<Batch>> {
        let Some(sources) = self.sources.get(domain) else {
            return Err(DataError::Argument(format!(
                "domain id {domain} out of range (the dataset has {} domains)",
                self.domains.len()
            )));
        };
        if seq_len == 0 || batch_sequences == 0 {
            return Err(DataError::Argument(
                "validation_batches needs seq_len >= 1 and batch_sequences >= 1".into(),
            ));
        }
        if max_tokens < seq_len as u64 {
            return Err(DataError::config(
                "data.validation_tokens",
                too_few_validation_tokens(max_tokens, seq_len, &self.domains[domain]),
            ));
        }
        if let Some(shortfall) = self.validation_shortfall(domain, seq_len) {
            return Err(DataError::config("data.validation_tokens", shortfall));
        }
        let chunk = seq_len as u64 + 1;
        // Every sequence lies inside one source, so its source id is exact.
        let sequences: Vec<(usize, u64)> = self
            .source_quotas(domain, seq_len, max_tokens)
            .into_iter()
            .enumerate()
            .flat_map(|(source, n)| (0..n).map(move |k| (source, k * chunk)))
            .collect();
        let mut batches = Vec::new();
        let mut buf = Vec::with_capacity(chunk as usize);
        for group in sequences.chunks(batch_sequences) {
            let mut batch = Batch::with_capacity(group.len(), seq_len);
            for &(source, start) in group {
                buf.clear();
                sources[source]
                    .validation
                    .copy_into(start, chunk as usize, &mut buf)?;
                batch.push(&buf, domain as u32, source as u32);
            }
            batches.push(batch);
        }
        Ok(batches)
    }
}

/// `wanted` (at most the sum of `held`) shared over the entries of `held` in proportion to
/// them: each gets the floor of its exact share, and the leftover goes one by one to the largest
/// remainders (the earlier entry first on a tie). No entry gets more than it holds.
fn proportional_quotas(held: &[u64], wanted: u64) -> Vec<u64> {
    let total: u64 = held.iter().sum();
    if total == 0 {
        return vec![0; held.len()];
    }
    let exact = |h: u64| u128::from(wanted) * u128::from(h);
    let mut quotas: Vec<u64> = held
        .iter()
        .map(|&h| (exact(h) / u128::from(total)) as u64)
        .collect();
    let mut order: Vec<usize> = (0..held.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(exact(held[i]) % u128::from(total)));
    let mut left = wanted - quotas.iter().sum::<u64>();
    for i in order.into_iter().cycle().take(2 * held.len()) {
        if left == 0 {
            break;
        }
        if quotas[i] < held[i] {
            quotas[i] += 1;
            left -= 1;
        }
    }
    quotas
}

/// The error of a validation cap below one sequence, for the named domain(s).
fn too_few_validation_tokens(validation_tokens: u64, seq_len: usize, domains: &str) -> String {
    format!(
        "{validation_tokens} is below data.seq_len = {seq_len}, so no validation sequence fits (domains: \
         {domains}); raise data.validation_tokens to at least {seq_len}"
    )
}

fn open_stream(
    dir: &Path,
    dtype: TokenDtype,
    vocab_size: usize,
    shards: &[ShardEntry],
    split: Split,
) -> Result<TokenStream> {
    let mut maps = Vec::new();
    let mut starts = vec![0u64];
    for shard in shards.iter().filter(|s| s.split == split) {
        let tokens = open_shard(dir, dtype, shard)?;
        let end = starts.last().copied().unwrap_or(0) + tokens.tokens;
        starts.push(end);
        maps.push(tokens);
    }
    Ok(TokenStream {
        shards: maps,
        starts,
        dtype,
        vocab_size: vocab_size as u64,
        dir: dir.to_path_buf(),
    })
}

fn open_shard(dir: &Path, dtype: TokenDtype, shard: &ShardEntry) -> Result<ShardTokens> {
    let tokens_path = dir.join(&shard.tokens_file);
    let docs_path = dir.join(&shard.docs_file);
    let expected = shard.counts.tokens * dtype.bytes() as u64;
    let map = map_file(&tokens_path, expected)?;
    // Opening stays cheap for any number of shards: the index's size and its last entry here,
    // every entry in `verify`.
    let docs_bytes = std::fs::metadata(&docs_path)
        .map_err(|e| DataError::io(&docs_path, e))?
        .len();
    if docs_bytes != shard.counts.documents * 8 {
        return Err(DataError::CorruptShard {
            path: docs_path,
            reason: format!(
                "{docs_bytes} bytes, the manifest says {} documents ({} bytes)",
                shard.counts.documents,
                shard.counts.documents * 8
            ),
        });
    }
    if docs_bytes > 0 {
        let mut last = [0u8; 8];
        let mut file = File::open(&docs_path).map_err(|e| DataError::io(&docs_path, e))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(docs_bytes - 8))
            .and_then(|_| std::io::Read::read_exact(&mut file, &mut last))
            .map_err(|e| DataError::io(&docs_path, e))?;
        let end = u64::from_le_bytes(last);
        if end != shard.counts.tokens {
            return Err(DataError::CorruptShard {
                path: docs_path,
                reason: format!(
                    "documents end at {end}, the shard has {} tokens",
                    shard.counts.tokens
                ),
            });
        }
    }
    Ok(ShardTokens {
        path: tokens_path,
        map,
        tokens: shard.counts.tokens,
    })
}

fn map_file(path: &Path, expected_bytes: u64) -> Result<Option<Mmap>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    if len != expected_bytes {
        return Err(DataError::CorruptShard {
            path: path.to_path_buf(),
            reason: format!(
                "{len} bytes, the manifest says {expected_bytes} (truncated or overwritten)"
            ),
        });
    }
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: shards are written once under a temp name and renamed into place; nothing in
    // moelab modifies them afterwards, and sizes were just checked against the manifest.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
    Ok(Some(map))
}

/// [`Dataset::verify`] of one shard: index, then one streamed pass over the tokens that
/// hashes them and finds the first bad id.
fn verify_shard(dir: &Path, manifest: &Manifest, shard: &ShardEntry) -> Result<()> {
    let docs_path = dir.join(&shard.docs_file);
    let index = std::fs::read(&docs_path).map_err(|e| DataError::io(&docs_path, e))?;
    // Sizes were checked when the dataset was opened; the order of every entry here.
    let ends: Vec<u64> = index
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let mut previous = 0u64;
    for (i, &end) in ends.iter().enumerate() {
        if end <= previous || end > shard.counts.tokens {
            return Err(DataError::CorruptShard {
                path: docs_path.clone(),
                reason: format!(
                    "document {i} ends at {end}, not after {previous} and within {} tokens",
                    shard.counts.tokens
                ),
            });
        }
        previous = end;
    }
    let got = crate::hash::sha256_hex(&index);
    if got != shard.docs_sha256 {
        return Err(DataError::CorruptShard {
            path: docs_path.clone(),
            reason: format!("sha256 {got}, the manifest says {}", shard.docs_sha256),
        });
    }

    let tokens_path = dir.join(&shard.tokens_file);
    let vocab = manifest.tokenizer.vocab_size as u64;
    let eos = manifest.tokenizer.eos_id;
    let width = manifest.dtype.bytes();
    let mut file = File::open(&tokens_path).map_err(|e| DataError::io(&tokens_path, e))?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; (1 << 20) * width];
    let mut ids = Vec::with_capacity(1 << 20);
    let mut token = 0u64;
    let mut document = 0usize;
    let mut problem: Option<String> = None;
    loop {
        let n = read_full(&mut file, &mut buf).map_err(|e| DataError::io(&tokens_path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        ids.clear();
        decode_into(manifest.dtype, &buf[..n - n % width], &mut ids);
        for &id in &ids {
            if problem.is_none() {
                if u64::from(id) >= vocab {
                    problem = Some(format!(
                        "token {token} (document {document}) is id {id}, outside the tokenizer's {vocab} ids: \
                         the shard is damaged or was written with another tokenizer"
                    ));
                } else if ends.get(document) == Some(&(token + 1)) && id != eos {
                    problem = Some(format!(
                        "document {document} ends at token {token} with id {id}, not {} = {eos}: \
                         the document index {} does not describe these tokens",
                        manifest.tokenizer.eos_token, shard.docs_file
                    ));
                }
            }
            if ends.get(document) == Some(&(token + 1)) {
                document += 1;
            }
            token += 1;
        }
    }
    let got = hasher.hex();
    let hash_note = if got == shard.tokens_sha256 {
        String::new()
    } else {
        format!("sha256 {got}, the manifest says {}", shard.tokens_sha256)
    };
    let reason = match (problem, hash_note.is_empty()) {
        (Some(problem), true) => problem,
        (Some(problem), false) => format!("{problem}; {hash_note}"),
        (None, false) => hash_note,
        (None, true) if token != shard.counts.tokens => {
            format!("{token} tokens, the manifest says {}", shard.counts.tokens)
        }
        (None, true) => return Ok(()),
    };
    Err(DataError::CorruptShard {
        path: tokens_path,
        reason,
    })
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match std::io::Read::read(file, &mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Hash of a dataset folder's identity used in stream fingerprints.
pub(crate) fn dataset_hash(dataset: &Dataset) -> String {
    let mut h = Hasher::new();
    h.update(dataset.manifest.content_hash().as_bytes());
    h.hex()
}

#[cfg(test)]
mod tests {
    use super::proportional_quotas;

    #[test]
    fn validation_sequences_are_shared_over_sources_in_proportion() {
        // 10 / 30 / 60 whole sequences held, 50 wanted: 5 / 15 / 30.
        assert_eq!(proportional_quotas(&[10, 30, 60], 50), vec![5, 15, 30]);
        // Equal remainders go to the earlier source first.
        assert_eq!(proportional_quotas(&[1, 1, 1], 2), vec![1, 1, 0]);
        assert_eq!(proportional_quotas(&[3, 3, 3], 7), vec![3, 2, 2]);
        // Never more than a source holds, all when all are wanted, none from an empty one.
        assert_eq!(proportional_quotas(&[2, 0, 100], 102), vec![2, 0, 100]);
        assert_eq!(proportional_quotas(&[0, 0], 0), vec![0, 0]);
        for wanted in 0..=40 {
            let q = proportional_quotas(&[7, 1, 13, 19], wanted);
            assert_eq!(q.iter().sum::<u64>(), wanted, "{q:?}");
            assert!(q.iter().zip([7, 1, 13, 19]).all(|(q, h)| *q <= h), "{q:?}");
        }
    }
}
