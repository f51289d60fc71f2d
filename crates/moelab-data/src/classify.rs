//! Document classifiers for selection inside a domain (the study's "scaffolds": math documents a
//! code classifier scores f(x) >= tau). fastText-style: hashed word unigrams and bigrams plus
//! character n-grams of each word (with `<` `>` boundaries), a linear model (logistic
//! regression on L2-normalised binary features) trained by SGD with a seeded order.
//!
//! - [`train_classifier`] reads positive and negative documents (folders or JSONL), holds out
//!   every tenth document (by a hash of its position) and reports held-out accuracy, precision
//!   and recall.
//! - [`score_dataset`] scores every document of a prepared dataset into one side file per shard,
//!   `<dataset>/scores/<name>/<tokens_file>.scores` (header + one f32 per document), skipping
//!   shards already scored with the same model (resumable).
//! - [`train_doc_scores`] reads them back in stream order for the mixture's selection.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::blend::Permutation;
use crate::dataset::Dataset;
use crate::hash::sha256_file;
use crate::input::{self, Fields, Format, Limits, RecordReader, Skip};
use crate::manifest::{ShardEntry, Split, TokenDtype};
use crate::walk::{Entry, Walker};
use crate::{DataError, Result};
use moelab_io::rng::mix64;

const MODEL_MAGIC: &[u8; 8] = b"MLCLSv01";
const SCORES_MAGIC: &[u8; 8] = b"MLSCOR01";
/// Folder of a dataset that holds the score side files, one sub-folder per score name.
pub const SCORES_DIR: &str = "scores";
/// Characters of a document used for its features (the start decides the kind of document).
const MAX_CHARS: usize = 20_000;

/// Feature hashing and training settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassifierOptions {
    /// log2 of the number of hash buckets (weights).
    pub buckets_log2: u32,
    /// Shortest character n-gram.
    pub char_min: u32,
    /// Longest character n-gram.
    pub char_max: u32,
    /// Passes over the training documents.
    pub epochs: u32,
    /// Initial SGD learning rate (decays linearly to 0).
    pub lr: f64,
    /// Seed of the training order and of nothing else.
    pub seed: u64,
}

impl Default for ClassifierOptions {
    fn default() -> Self {
        ClassifierOptions {
            buckets_log2: 18,
            char_min: 3,
            char_max: 5,
            epochs: 10,
            lr: 0.5,
            seed: 1,
        }
    }
}

/// A trained linear classifier over hashed n-gram features.
#[derive(Debug, Clone, PartialEq)]
pub struct Classifier {
    buckets_log2: u32,
    char_min: u32,
    char_max: u32,
    bias: f32,
    weights: Vec<f32>,
}

/// FNV-1a, a fixed hash (the model file depends on it).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0x1f;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Classifier {
    fn new(opts: &ClassifierOptions) -> Self {
        Classifier {
            buckets_log2: opts.buckets_log2,
            char_min: opts.char_min,
            char_max: opts.char_max,
            bias: 0.0,
            weights: vec![0.0; 1usize << opts.buckets_log2],
        }
    }

    /// Distinct feature buckets of `text`: words, word bigrams, character n-grams of words.
    pub fn features(&self, text: &str) -> Vec<u32> {
        let end = text
            .char_indices()
            .nth(MAX_CHARS)
            .map_or(text.len(), |(i, _)| i);
        let words: Vec<&str> = text[..end].split_whitespace().collect();
        let mask = (1u64 << self.buckets_log2) - 1;
        let mut out = Vec::with_capacity(words.len() * 6);
        for (i, w) in words.iter().enumerate() {
            out.push((fnv1a(&[b"w", w.as_bytes()]) & mask) as u32);
            if let Some(next) = words.get(i + 1) {
                out.push((fnv1a(&[b"b", w.as_bytes(), next.as_bytes()]) & mask) as u32);
            }
            let chars: Vec<char> = std::iter::once('<')
                .chain(w.chars())
                .chain(std::iter::once('>'))
                .collect();
            for n in self.char_min as usize..=self.char_max as usize {
                for gram in chars.windows(n) {
                    let s: String = gram.iter().collect();
                    out.push((fnv1a(&[b"c", s.as_bytes()]) & mask) as u32);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn logit(&self, features: &[u32]) -> f64 {
        if features.is_empty() {
            return f64::from(self.bias);
        }
        let norm = 1.0 / (features.len() as f64).sqrt();
        let sum: f64 = features
            .iter()
            .map(|&f| f64::from(self.weights[f as usize]))
            .sum();
        f64::from(self.bias) + sum * norm
    }

    /// Probability that `text` is a positive (e.g. code-like) document.
    pub fn score(&self, text: &str) -> f32 {
        sigmoid(self.logit(&self.features(text))) as f32
    }

    /// Writes the model (magic, settings, bias, weights; little-endian) atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::with_capacity(24 + 4 * self.weights.len());
        bytes.extend_from_slice(MODEL_MAGIC);
        for v in [self.buckets_log2, self.char_min, self.char_max] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&self.bias.to_le_bytes());
        for w in &self.weights {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        moelab_io::write_atomic(path, &bytes).map_err(|e| DataError::io(path, e))
    }

    /// Reads a model written by [`Classifier::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let bad = |reason: &str| DataError::Input {
            path: path.to_path_buf(),
            line: 0,
            reason: format!(
                "not a moelab classifier ({reason}); train one with `moelab data classify train`"
            ),
        };
        if bytes.len() < 24 || &bytes[..8] != MODEL_MAGIC {
            return Err(bad("wrong header"));
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let (buckets_log2, char_min, char_max) = (u32_at(8), u32_at(12), u32_at(16));
        if !(1..=28).contains(&buckets_log2) || char_min == 0 || char_max < char_min {
            return Err(bad("bad settings"));
        }
        let n = 1usize << buckets_log2;
        if bytes.len() != 24 + 4 * n {
            return Err(bad("truncated"));
        }
        let f32_at =
            |i: usize| f32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Ok(Classifier {
            buckets_log2,
            char_min,
            char_max,
            bias: f32_at(20),
            weights: (0..n).map(|k| f32_at(24 + 4 * k)).collect(),
        })
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Held-out quality of a trained classifier (threshold 0.5, positive = the `--positive` class).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    /// Training documents of each class.
    pub train_positive: usize,
    /// Training documents of the negative class.
    pub train_negative: usize,
    /// Held-out documents of the positive class.
    pub heldout_positive: usize,
    /// Held-out documents of the negative class.
    pub heldout_negative: usize,
    /// Share of held-out documents classified right.
    pub accuracy: f64,
    /// Of the held-out documents called positive, the share that are.
    pub precision: f64,
    /// Of the held-out positives, the share called positive.
    pub recall: f64,
    /// The settings used.
    pub options: ClassifierOptions,
}

/// Whether document `i` of class `class` is held out (every tenth, by a fixed hash).
fn held_out(class: u64, i: usize) -> bool {
    mix64(mix64(0x0004_e1d0_u64 ^ class) ^ i as u64).is_multiple_of(10)
}

/// Trains on `positives` against `negatives` (documents as text), holding out a tenth of each.
pub fn train_classifier(
    positives: &[String],
    negatives: &[String],
    opts: &ClassifierOptions,
) -> Result<(Classifier, TrainReport)> {
    if positives.is_empty() || negatives.is_empty() {
        return Err(DataError::Argument(format!(
            "training a classifier needs documents of both classes ({} positive, {} negative)",
            positives.len(),
            negatives.len()
        )));
    }
    if !(8..=28).contains(&opts.buckets_log2) || opts.char_min == 0 || opts.char_max < opts.char_min
    {
        return Err(DataError::Argument(
            "classifier options: buckets_log2 in 8..=28 and 1 <= char_min <= char_max".into(),
        ));
    }
    if opts.epochs == 0 {
        // Zero passes would save the untrained model and report its held-out scores as if
        // it had learned something.
        return Err(DataError::Argument(
            "--epochs must be at least 1 (passes over the training documents)".into(),
        ));
    }
    let mut model = Classifier::new(opts);
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (class, docs) in [(1u64, positives), (0, negatives)] {
        for (i, text) in docs.iter().enumerate() {
            let item = (model.features(text), class == 1);
            if held_out(class, i) {
                test.push(item);
            } else {
                train.push(item);
            }
        }
    }
    if train.is_empty() {
        return Err(DataError::Argument(
            "no training documents left after the held-out split".into(),
        ));
    }
    let total = u64::from(opts.epochs) * train.len() as u64;
    let mut seen = 0u64;
    for epoch in 0..opts.epochs {
        let order = Permutation::new(train.len() as u64, mix64(opts.seed) ^ u64::from(epoch));
        for k in 0..train.len() as u64 {
            let (features, label) = &train[order.apply(k) as usize];
            let lr = opts.lr * (1.0 - seen as f64 / total as f64);
            seen += 1;
            let p = sigmoid(model.logit(features));
            let grad = p - if *label { 1.0 } else { 0.0 };
            let norm = 1.0 / (features.len().max(1) as f64).sqrt();
            let step = (lr * grad * norm) as f32;
            for &f in features {
                model.weights[f as usize] -= step;
            }
            model.bias -= (lr * grad) as f32;
        }
    }
    let (mut tp, mut fp, mut tn, mut fneg) = (0usize, 0usize, 0usize, 0usize);
    for (features, label) in &test {
        match (sigmoid(model.logit(features)) >= 0.5, *label) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fneg += 1,
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let heldout_positive = tp + fneg;
    let report = TrainReport {
        train_positive: positives.len() - heldout_positive,
        train_negative: negatives.len() - (tn + fp),
        heldout_positive,
        heldout_negative: tn + fp,
        accuracy: ratio(tp + tn, test.len()),
        precision: ratio(tp, tp + fp),
        recall: ratio(tp, heldout_positive),
        options: *opts,
    };
    Ok((model, report))
}

/// Documents of `path`: a `.jsonl` file (optionally `.gz`/`.zst`) of `{"text": ...}` lines, a
/// `.txt` file (one document), or a folder of such files (recursively, sorted by path), read
/// within the default [`Limits`]; documents longer than the cap are left out.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    Ok(read_documents_within(path, &Limits::default())?.documents)
}

/// What [`read_documents_within`] read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Documents {
    /// The documents, in file order.
    pub documents: Vec<String>,
    /// Documents left out for being longer than `limits.max_document_bytes`.
    pub too_long: u64,
}

/// [`read_documents`] with explicit caps: each line or text file is read in bounded pieces and
/// a longer one is counted, not held; a compressed file that expands past `limits` is refused.
/// Links in folders follow the corpus rules of `prepare` (none outside `path`, no loops, each
/// file once).
pub fn read_documents_within(path: &Path, limits: &Limits) -> Result<Documents> {
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    if files.is_empty() {
        return Err(DataError::Input {
            path: path.to_path_buf(),
            line: 0,
            reason: "no .jsonl, .jsonl.gz, .jsonl.zst or .txt files".into(),
        });
    }
    let fields = Fields::default();
    // Any domain: the classifier reads only the text.
    let fixed = (String::from("x"), String::from("x"));
    let mut out = Documents::default();
    for file in files {
        let name = file.to_string_lossy().into_owned();
        let format = if name.ends_with(".txt") {
            Format::Text
        } else {
            Format::Jsonl
        };
        let mut reader = RecordReader::open(&file, format, &fields, true, limits)?;
        while let Some((line, raw)) = reader.next_record()? {
            match input::parse(raw, &fields, Some(&fixed)) {
                Ok(doc) => out.documents.push(doc.text),
                Err(r) if r.skip == Skip::TooLong => out.too_long += 1,
                Err(r) if r.skip == Skip::Empty => {}
                Err(r) => {
                    return Err(DataError::Input {
                        path: file.clone(),
                        line: r.line.unwrap_or(line),
                        reason: r.detail,
                    })
                }
            }
        }
    }
    Ok(out)
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_file() {
        if supported(path) {
            out.push(path.to_path_buf());
        }
        return Ok(());
    }
    let mut walker = Walker::new(false);
    walker.enter_root(path)?;
    collect_tree(&mut walker, path, out)
}

fn supported(p: &Path) -> bool {
    let n = p.to_string_lossy();
    [".jsonl", ".jsonl.gz", ".jsonl.zst", ".txt"]
        .iter()
        .any(|e| n.ends_with(e))
}

fn collect_tree(walker: &mut Walker, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in walker.entries(dir)? {
        match entry {
            Entry::Dir(sub) => collect_tree(walker, &sub, out)?,
            Entry::File(file) if supported(&file) => out.push(file),
            Entry::File(_) => {}
        }
    }
    Ok(())
}

/// Checks a score name (it names a folder).
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(DataError::Argument(format!(
            "score name `{name}`: use ASCII letters, digits, `_` and `-` (it names the folder {SCORES_DIR}/<name>/)"
        )));
    }
    Ok(())
}

/// The side file of one shard's scores.
fn side_file(dataset: &Path, name: &str, shard: &ShardEntry) -> PathBuf {
    dataset
        .join(SCORES_DIR)
        .join(name)
        .join(format!("{}.scores", shard.tokens_file))
}

/// Reads a side file, checking it belongs to `shard` (its token hash and document count).
fn read_side_file(path: &Path, shard: &ShardEntry) -> Result<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bad = |reason: String| DataError::Input {
        path: path.to_path_buf(),
        line: 0,
        reason,
    };
    if bytes.len() < 144 || &bytes[..8] != SCORES_MAGIC {
        return Err(bad("not a moelab score file".into()));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[8..16]);
    let docs = u64::from_le_bytes(n);
    let sha = String::from_utf8_lossy(&bytes[16..80]).into_owned();
    let model = String::from_utf8_lossy(&bytes[80..144]).into_owned();
    if sha != shard.tokens_sha256 || docs != shard.counts.documents {
        return Err(bad(format!(
            "scores another version of the shard {} (re-run `moelab data classify score`)",
            shard.tokens_file
        )));
    }
    if bytes.len() as u64 != 144 + 4 * docs {
        return Err(bad("truncated".into()));
    }
    let scores = bytes[144..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((model, scores))
}

/// Document end offsets (tokens, within the shard) of a shard's index file.
fn doc_ends(dataset: &Path, shard: &ShardEntry) -> Result<Vec<u64>> {
    let path = dataset.join(&shard.docs_file);
    let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// What [`score_dataset`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreReport {
    /// The score name.
    pub name: String,
    /// Shards scored now.
    pub shards_scored: usize,
    /// Shards already scored with this model, left as they were.
    pub shards_kept: usize,
    /// Documents with a score.
    pub documents: u64,
    /// Per domain/source: (documents, documents scored >= 0.5, mean score).
    pub sources: Vec<SourceScores>,
}

/// Score summary of one source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceScores {
    /// Domain name.
    pub domain: String,
    /// Source name.
    pub source: String,
    /// Documents scored.
    pub documents: u64,
    /// Documents scored >= 0.5.
    pub above_half: u64,
    /// Mean score.
    pub mean: f64,
}

/// Scores every document (train and validation) of the dataset at `dir` with the model at
/// `model_path` into `dir/scores/<name>/`, one side file per shard, written atomically; shards
/// already scored by the same model file are kept, so an interrupted run resumes.
pub fn score_dataset(model_path: &Path, dir: &Path, name: &str) -> Result<ScoreReport> {
    check_name(name)?;
    let model = Classifier::load(model_path)?;
    let model_sha = sha256_file(model_path)?;
    let dataset = Dataset::open(dir)?;
    let tokenizer = tokenizers::Tokenizer::from_file(dataset.tokenizer_path()).map_err(|e| {
        DataError::Tokenizer {
            path: dataset.tokenizer_path(),
            reason: e.to_string(),
        }
    })?;
    let manifest = dataset.manifest().clone();
    let eos = manifest.tokenizer.eos_id;
    let mut report = ScoreReport {
        name: name.to_string(),
        shards_scored: 0,
        shards_kept: 0,
        documents: 0,
        sources: Vec::new(),
    };
    for domain in &manifest.domains {
        for source in &domain.sources {
            let mut all = Vec::new();
            for shard in &source.shards {
                let path = side_file(dir, name, shard);
                if let Ok((m, scores)) = read_side_file(&path, shard) {
                    if m == model_sha {
                        report.shards_kept += 1;
                        all.extend(scores);
                        continue;
                    }
                }
                let tokens_path = dir.join(&shard.tokens_file);
                let bytes =
                    std::fs::read(&tokens_path).map_err(|e| DataError::io(&tokens_path, e))?;
                let tokens: Vec<u32> = match manifest.dtype {
                    TokenDtype::U16 => bytes
                        .chunks_exact(2)
                        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                        .collect(),
                    TokenDtype::U32 => bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                };
                let ends = doc_ends(dir, shard)?;
                let mut scores = Vec::with_capacity(ends.len());
                let mut start = 0usize;
                for &end in &ends {
                    let end = (end as usize).min(tokens.len());
                    let mut doc = &tokens[start.min(end)..end];
                    if doc.last() == Some(&eos) {
                        doc = &doc[..doc.len() - 1];
                    }
                    let text = tokenizer
                        .decode(doc, false)
                        .map_err(|e| DataError::Tokenizer {
                            path: dataset.tokenizer_path(),
                            reason: format!("decoding a document of {}: {e}", shard.tokens_file),
                        })?;
                    scores.push(model.score(&text));
                    start = end;
                }
                let mut out = Vec::with_capacity(144 + 4 * scores.len());
                out.extend_from_slice(SCORES_MAGIC);
                out.extend_from_slice(&(scores.len() as u64).to_le_bytes());
                out.extend_from_slice(format!("{:<64}", shard.tokens_sha256).as_bytes());
                out.extend_from_slice(format!("{model_sha:<64}").as_bytes());
                for s in &scores {
                    out.extend_from_slice(&s.to_le_bytes());
                }
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
                }
                moelab_io::write_atomic(&path, &out).map_err(|e| DataError::io(&path, e))?;
                report.shards_scored += 1;
                all.extend(scores);
            }
            report.documents += all.len() as u64;
            report.sources.push(SourceScores {
                domain: domain.name.clone(),
                source: source.name.clone(),
                documents: all.len() as u64,
                above_half: all.iter().filter(|&&s| s >= 0.5).count() as u64,
                mean: if all.is_empty() {
                    0.0
                } else {
                    all.iter().map(|&s| f64::from(s)).sum::<f64>() / all.len() as f64
                },
            });
        }
    }
    Ok(report)
}

/// The training documents of one source in stream order: each document's end offset in the
/// source's training token stream and its score under `name`.
pub(crate) fn train_doc_scores(
    dataset: &Dataset,
    domain: usize,
    source: usize,
    name: &str,
) -> Result<(Vec<u64>, Vec<f32>)> {
    check_name(name)?;
    let manifest = dataset.manifest();
    let entry = manifest
        .domains
        .get(domain)
        .and_then(|d| d.sources.get(source))
        .ok_or_else(|| DataError::Argument("source outside the dataset".into()))?;
    let (mut ends, mut scores) = (Vec::new(), Vec::new());
    let mut offset = 0u64;
    for shard in entry.shards.iter().filter(|s| s.split == Split::Train) {
        let path = side_file(dataset.dir(), name, shard);
        if !path.is_file() {
            return Err(DataError::Mixture(format!(
                "no scores `{name}` for {} ({} is missing): run `moelab data classify score MODEL {} --name {name}`",
                shard.tokens_file,
                path.display(),
                dataset.dir().display()
            )));
        }
        let (_, s) = read_side_file(&path, shard)?;
        ends.extend(
            doc_ends(dataset.dir(), shard)?
                .into_iter()
                .map(|e| e + offset),
        );
        scores.extend(s);
        offset += shard.counts.tokens;
    }
    Ok((ends, scores))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A separable toy set: "code" documents use code tokens, "prose" documents English words.
    fn toy(seed: u64, n: usize, code: bool) -> Vec<String> {
        let code_words = [
            "fn", "let", "mut", "x", "=", "{", "}", "();", "return", "for", "in", "0..n", "+=",
            "if", "==", "->",
        ];
        let prose_words = [
            "the", "river", "ran", "quietly", "past", "old", "houses", "and", "children", "sang",
            "while", "evening", "came", "over", "hills", "softly",
        ];
        let words = if code { &code_words } else { &prose_words };
        (0..n)
            .map(|i| {
                (0..30)
                    .map(|j| {
                        words[(mix64(seed ^ (i * 31 + j) as u64) % words.len() as u64) as usize]
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn separates_a_toy_set_and_reports_heldout_quality() {
        let (pos, neg) = (toy(1, 80, true), toy(2, 80, false));
        let opts = ClassifierOptions {
            buckets_log2: 12,
            ..ClassifierOptions::default()
        };
        let (model, report) = train_classifier(&pos, &neg, &opts).unwrap();
        assert_eq!(report.accuracy, 1.0, "{report:?}");
        assert_eq!((report.precision, report.recall), (1.0, 1.0));
        assert!(report.heldout_positive > 0 && report.heldout_negative > 0);
        assert_eq!(report.train_positive + report.heldout_positive, 80);
        assert!(model.score("let mut x = 0; for i in 0..n { x += i }") > 0.5);
        assert!(model.score("the children sang softly over the hills") < 0.5);
        // Deterministic, and a saved model scores the same after loading.
        let (again, _) = train_classifier(&pos, &neg, &opts).unwrap();
        assert_eq!(model, again);
        let dir = std::env::temp_dir().join(format!("moelab-classify-{}", std::process::id()));
        let path = dir.join("m.bin");
        model.save(&path).unwrap();
        assert_eq!(Classifier::load(&path).unwrap(), model);
        std::fs::write(&path, b"nonsense").unwrap();
        assert!(Classifier::load(&path)
            .unwrap_err()
            .to_string()
            .contains("not a moelab classifier"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(train_classifier(&pos, &[], &opts).is_err());
    }

    /// Zero epochs would write an untrained model: refused naming the flag.
    #[test]
    fn zero_epochs_are_refused_naming_the_flag() {
        let (pos, neg) = (toy(1, 20, true), toy(2, 20, false));
        let opts = ClassifierOptions {
            epochs: 0,
            buckets_log2: 12,
            ..ClassifierOptions::default()
        };
        let err = train_classifier(&pos, &neg, &opts).unwrap_err().to_string();
        assert!(err.contains("--epochs"), "{err}");
    }

    #[test]
    fn features_are_hashed_words_bigrams_and_char_ngrams() {
        let m = Classifier::new(&ClassifierOptions {
            buckets_log2: 20,
            ..ClassifierOptions::default()
        });
        // "ab": word, "<ab>" 3-grams "<ab", "ab>", 4-gram "<ab>": 4 distinct features.
        assert_eq!(m.features("ab").len(), 4);
        // "ab ab": the same plus the bigram "ab ab".
        assert_eq!(m.features("ab ab").len(), 5);
        assert!(m.features("").is_empty());
        assert!(check_name("code_like").is_ok() && check_name("a/b").is_err());
    }
}
