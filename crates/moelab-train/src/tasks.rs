//! In-loop task evaluation (as OLMo-core's in-loop evaluator and lm-evaluation-harness do):
//! `[[eval.tasks]]` JSONL files of `{"prompt", "answer"}` (short answers) or `{"prompt",
//! "choices", "label"}` (multiple choice), scored at every evaluation by
//! - `bpb`: bits per UTF-8 byte of the correct continuation (the answer, or the labelled choice)
//!   given the prompt, summed over examples (DataDecide's most predictive small-scale metric);
//! - `accuracy` (multiple choice): the share of examples whose labelled choice has the highest
//!   log-likelihood;
//! - `exact_match` (short answers): the share whose greedy continuation, up to its first newline
//!   and trimmed, equals the trimmed answer.
//!
//! Each example is scored as one unpadded sequence (prompt tokens then continuation tokens, the
//! prompt cut from the left to fit `model.max_seq_len`), so the scores do not depend on batching.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use moelab_model::{ForwardOptions, MoeTransformer};
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// `[eval]`: what an evaluation scores besides the per-domain validation loss.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Task files scored at every evaluation.
    #[serde(default)]
    pub tasks: Vec<TaskConfig>,
}

/// One `[[eval.tasks]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Name in eval/, metrics.jsonl (`task/<name>/<metric>`) and the ablation comparison.
    pub name: String,
    /// JSONL file, one example per line (relative to the working directory).
    pub path: PathBuf,
    /// Examples scored at most (the first ones of the file).
    #[serde(default = "default_max_examples")]
    pub max_examples: usize,
    /// Tokens generated at most for a short answer's exact match.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
}

impl EvalConfig {
    /// True when no task is configured (the section is then left out of saved configs).
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

fn default_max_examples() -> usize {
    64
}

fn default_max_new_tokens() -> usize {
    12
}

/// One example of a task file.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// A short answer, scored by bits per byte and greedy exact match.
    Answer {
        /// The context.
        prompt: String,
        /// The correct continuation.
        answer: String,
    },
    /// Multiple choice, scored by bits per byte of the labelled choice and accuracy.
    Choice {
        /// The context.
        prompt: String,
        /// The candidate continuations.
        choices: Vec<String>,
        /// Index of the correct one.
        label: usize,
    },
}

impl Example {
    fn prompt(&self) -> &str {
        match self {
            Example::Answer { prompt, .. } | Example::Choice { prompt, .. } => prompt,
        }
    }
}

/// A line of a task file as written (both shapes; which one it is is checked after).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExampleLine {
    prompt: String,
    #[serde(default)]
    answer: Option<String>,
    #[serde(default)]
    choices: Option<Vec<String>>,
    #[serde(default)]
    label: Option<usize>,
}

/// A loaded task.
#[derive(Debug, Clone)]
pub struct Task {
    /// Its name.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
    /// Examples, at most `max_examples`.
    pub examples: Vec<Example>,
    /// Generation limit for exact match.
    pub max_new_tokens: usize,
}

/// Reads and checks one task file; errors name the file, the line and what is wrong.
pub fn load_task(cfg: &TaskConfig) -> Result<Task, TrainError> {
    let text = std::fs::read_to_string(&cfg.path).map_err(TrainError::io(&cfg.path))?;
    let bad = |line: usize, reason: String| {
        TrainError::Argument(format!(
            "task `{}` ({}:{line}): {reason}",
            cfg.name,
            cfg.path.display()
        ))
    };
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if examples.len() == cfg.max_examples {
            break;
        }
        let raw: ExampleLine = serde_json::from_str(line).map_err(|e| {
            bad(
                i + 1,
                format!(
                    "{e}; expected {{\"prompt\", \"answer\"}} or {{\"prompt\", \"choices\", \"label\"}}"
                ),
            )
        })?;
        // An empty prompt leaves nothing to condition on: the first answer token would be
        // scored from no context at all (or, with one answer token, not at all: 0 bits).
        if raw.prompt.trim().is_empty() {
            return Err(bad(
                i + 1,
                "`prompt` is empty; every example needs a prompt to condition the answer on".into(),
            ));
        }
        let example = match (raw.answer, raw.choices, raw.label) {
            (Some(answer), None, None) => {
                if answer.trim().is_empty() {
                    return Err(bad(i + 1, "`answer` is empty".into()));
                }
                Example::Answer {
                    prompt: raw.prompt,
                    answer,
                }
            }
            (None, Some(choices), Some(label)) => {
                if choices.len() < 2 {
                    return Err(bad(i + 1, "`choices` needs at least two entries".into()));
                }
                if label >= choices.len() {
                    return Err(bad(
                        i + 1,
                        format!(
                            "`label` {label} is not an index of the {} choices",
                            choices.len()
                        ),
                    ));
                }
                if choices.iter().any(String::is_empty) {
                    return Err(bad(i + 1, "a choice is empty".into()));
                }
                Example::Choice {
                    prompt: raw.prompt,
                    choices,
                    label,
                }
            }
            _ => {
                return Err(bad(
                    i + 1,
                    "give either `answer`, or `choices` with `label`".into(),
                ))
            }
        };
        examples.push(example);
    }
    if examples.is_empty() {
        return Err(TrainError::Argument(format!(
            "task `{}`: {} holds no examples",
            cfg.name,
            cfg.path.display()
        )));
    }
    Ok(Task {
        name: cfg.name.clone(),
        path: cfg.path.clone(),
        examples,
        max_new_tokens: cfg.max_new_tokens,
    })
}

/// Loads every task of `[eval]`, refusing duplicate names.
pub fn load_tasks(cfg: &EvalConfig) -> Result<Vec<Task>, TrainError> {
    let mut tasks: Vec<Task> = Vec::with_capacity(cfg.tasks.len());
    for (i, t) in cfg.tasks.iter().enumerate() {
        if t.name.is_empty() || t.name.contains(['/', ' ']) {
            return Err(TrainError::Argument(format!(
                "eval.tasks[{i}].name `{}` must be non-empty, without `/` or spaces",
                t.name
            )));
        }
        if tasks.iter().any(|x| x.name == t.name) {
            return Err(TrainError::Argument(format!(
                "eval.tasks[{i}].name `{}` is used by an earlier task",
                t.name
            )));
        }
        moelab_data::check_exists(&format!("eval.tasks[{i}].path"), &t.path)?;
        tasks.push(load_task(t)?);
    }
    Ok(tasks)
}

/// Text to token ids and back.
pub trait Codec {
    /// Token ids of `text` (no special tokens).
    fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError>;
    /// Text of `ids`.
    fn decode(&self, ids: &[u32]) -> Result<String, TrainError>;
}

/// What scores continuations: a language model.
pub trait Scorer {
    /// Negative log-likelihood (nats) of `continuation` after `context`.
    fn continuation_nats(&self, context: &[u32], continuation: &[u32]) -> Result<f64, TrainError>;
    /// Up to `max_new` greedily chosen tokens after `context`.
    fn greedy(&self, context: &[u32], max_new: usize) -> Result<Vec<u32>, TrainError>;
}

/// Scores of one task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskScore {
    /// Task name.
    pub name: String,
    /// Examples scored.
    pub examples: usize,
    /// Bits per byte of the correct continuations.
    pub bpb: f64,
    /// Multiple-choice accuracy (None when the task has no multiple-choice examples).
    pub accuracy: Option<f64>,
    /// Greedy exact match (None when the task has no short-answer examples).
    pub exact_match: Option<f64>,
}

impl TaskScore {
    /// (metric, value) pairs that are defined.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        let mut m = vec![("bpb", self.bpb)];
        if let Some(a) = self.accuracy {
            m.push(("accuracy", a));
        }
        if let Some(e) = self.exact_match {
            m.push(("exact_match", e));
        }
        m
    }
}

/// Scores `task` (see the module docs).
pub fn score_task(
    task: &Task,
    codec: &dyn Codec,
    scorer: &dyn Scorer,
) -> Result<TaskScore, TrainError> {
    let (mut nats, mut bytes) = (0f64, 0usize);
    let (mut mc, mut mc_right, mut short, mut short_right) = (0usize, 0usize, 0usize, 0usize);
    for example in &task.examples {
        if crate::interrupt::requested() {
            return Err(TrainError::Interrupted);
        }
        let context = codec.encode(example.prompt())?;
        match example {
            Example::Choice { choices, label, .. } => {
                let mut best: Option<(usize, f64)> = None;
                for (i, choice) in choices.iter().enumerate() {
                    let n = scorer.continuation_nats(&context, &codec.encode(choice)?)?;
                    if i == *label {
                        nats += n;
                        bytes += choice.len();
                    }
                    if best.is_none_or(|(_, b)| n < b) {
                        best = Some((i, n));
                    }
                }
                mc += 1;
                mc_right += usize::from(best.map(|(i, _)| i) == Some(*label));
            }
            Example::Answer { answer, .. } => {
                let tokens = codec.encode(answer)?;
                nats += scorer.continuation_nats(&context, &tokens)?;
                bytes += answer.len();
                let generated = codec.decode(&scorer.greedy(&context, task.max_new_tokens)?)?;
                let first_line = generated.split('\n').next().unwrap_or("");
                short += 1;
                short_right += usize::from(first_line.trim() == answer.trim());
            }
        }
    }
    let share = |right: usize, total: usize| (total > 0).then(|| right as f64 / total as f64);
    Ok(TaskScore {
        name: task.name.clone(),
        examples: task.examples.len(),
        bpb: bits_per_byte(nats, bytes.max(1) as u64),
        accuracy: share(mc_right, mc),
        exact_match: share(short_right, short),
    })
}

/// Bits per UTF-8 byte of text whose tokens cost `nats` in all: nats / ln 2 / bytes, a measure
/// that does not depend on the tokenizer (tasks and per-domain losses both report it).
pub fn bits_per_byte(nats: f64, bytes: u64) -> f64 {
    nats / std::f64::consts::LN_2 / bytes as f64
}

/// A Hugging Face tokenizer.json as a [`Codec`].
pub struct TokenizerCodec(tokenizers::Tokenizer);

impl TokenizerCodec {
    /// Loads `path`.
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        tokenizers::Tokenizer::from_file(path)
            .map(TokenizerCodec)
            .map_err(|e| TrainError::Argument(format!("tokenizer {}: {e}", path.display())))
    }
}

impl TokenizerCodec {
    /// UTF-8 bytes of text each token id stands for, indexed by id (special tokens: 0), so a
    /// stream of ids is measured in bytes without decoding it. Exact for byte-level BPE (the
    /// tokenizer `prepare` trains, and GPT-2/NeoX/OLMo's), where each character of a token's
    /// string is one byte; for other tokenizers, the length of the token decoded on its own.
    pub fn byte_lengths(&self) -> Vec<u32> {
        let tokenizer = &self.0;
        let special: std::collections::HashSet<u32> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let byte_level = matches!(
            tokenizer.get_decoder(),
            Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_))
        );
        (0..tokenizer.get_vocab_size(true) as u32)
            .map(|id| {
                if special.contains(&id) {
                    return 0;
                }
                let len = if byte_level {
                    tokenizer.id_to_token(id).map(|t| t.chars().count())
                } else {
                    tokenizer.decode(&[id], false).ok().map(|t| t.len())
                };
                len.unwrap_or(0) as u32
            })
            .collect()
    }
}

impl Codec for TokenizerCodec {
    fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        self.0
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TrainError::Argument(format!("tokenizing a task example: {e}")))
    }

    fn decode(&self, ids: &[u32]) -> Result<String, TrainError> {
        self.0
            .decode(ids, false)
            .map_err(|e| TrainError::Argument(format!("decoding generated tokens: {e}")))
    }
}

/// A model on a device as a [`Scorer`].
pub struct ModelScorer<'a> {
    /// The model.
    pub model: &'a MoeTransformer,
    /// Its device.
    pub device: &'a Device,
    /// Longest input (`model.max_seq_len`).
    pub max_len: usize,
    /// Stops generation.
    pub eos_id: u32,
}

impl ModelScorer<'_> {
    /// The last `max_len` tokens of `tokens` as a (1, t) tensor.
    fn input(&self, tokens: &[u32]) -> Result<Tensor, TrainError> {
        let start = tokens.len().saturating_sub(self.max_len);
        let tail = &tokens[start..];
        Ok(Tensor::from_slice(tail, (1, tail.len()), self.device)?)
    }
}

impl Scorer for ModelScorer<'_> {
    fn continuation_nats(&self, context: &[u32], continuation: &[u32]) -> Result<f64, TrainError> {
        if continuation.is_empty() {
            return Ok(0.0);
        }
        // Inputs predict the next token: the sequence minus its last token, targets shifted by one.
        let mut all: Vec<u32> = context.to_vec();
        all.extend_from_slice(continuation);
        let keep = (self.max_len + 1).min(all.len());
        let all = &all[all.len() - keep..];
        if all.len() < 2 {
            return Ok(0.0);
        }
        let n = all.len() - 1;
        let input = Tensor::from_slice(&all[..n], (1, n), self.device)?;
        let target = Tensor::from_slice(&all[1..], (1, n), self.device)?;
        let out = self
            .model
            .forward(&input, Some(&target), ForwardOptions::default())?;
        let losses = out
            .token_losses
            .ok_or_else(|| TrainError::Argument("the model returned no token losses".into()))?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        // The continuation's tokens are the last ones of the targets (a continuation longer than
        // the window is scored on the part that fits).
        let scored = continuation.len().min(n);
        Ok(losses[n - scored..].iter().sum())
    }

    fn greedy(&self, context: &[u32], max_new: usize) -> Result<Vec<u32>, TrainError> {
        let mut tokens = context.to_vec();
        let mut generated = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            if tokens.is_empty() {
                break;
            }
            let out = self
                .model
                .forward(&self.input(&tokens)?, None, ForwardOptions::default())?;
            let logits = out.logits()?;
            let next = logits
                .squeeze(0)?
                .get(logits.dim(1)? - 1)?
                .argmax(D::Minus1)?
                .to_dtype(DType::U32)?
                .to_scalar::<u32>()?;
            if next == self.eos_id {
                break;
            }
            generated.push(next);
            tokens.push(next);
        }
        Ok(generated)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// One token per byte.
    struct Bytes;

    impl Codec for Bytes {
        fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String, TrainError> {
            Ok(ids.iter().map(|&b| b as u8 as char).collect())
        }
    }

    /// A hand-made model: each token costs 1 nat, except `b'x'`, which costs 3, and it always
    /// generates "42\n".
    struct Hand;

    impl Scorer for Hand {
        fn continuation_nats(&self, _: &[u32], continuation: &[u32]) -> Result<f64, TrainError> {
            Ok(continuation
                .iter()
                .map(|&t| if t == u32::from(b'x') { 3.0 } else { 1.0 })
                .sum())
        }
        fn greedy(&self, _: &[u32], max_new: usize) -> Result<Vec<u32>, TrainError> {
            Ok(b"42\nfoo"
                .iter()
                .take(max_new)
                .map(|&b| u32::from(b))
                .collect())
        }
    }

    fn write_task(name: &str, lines: &[&str]) -> TaskConfig {
        let dir = std::env::temp_dir().join(format!("moelab-tasks-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("task.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        TaskConfig {
            name: name.into(),
            path,
            max_examples: 10,
            max_new_tokens: 8,
        }
    }

    #[test]
    fn bits_per_byte_and_accuracy_on_a_hand_made_task() {
        let cfg = write_task(
            "hand",
            &[
                // Labelled "ab" (2 nats) beats "xx" (6 nats): right.
                r#"{"prompt": "Q1", "choices": ["ab", "xx"], "label": 0}"#,
                // Labelled "xa" (4 nats) loses to "bc" (2 nats): wrong.
                r#"{"prompt": "Q2", "choices": ["bc", "xa"], "label": 1}"#,
                "",
                // Greedy "42" (cut at the newline) matches " 42 " trimmed; 4 bytes, 4 nats.
                r#"{"prompt": "Q3", "answer": " 42 "}"#,
                // "7" does not match; 1 byte, 1 nat.
                r#"{"prompt": "Q4", "answer": "7"}"#,
            ],
        );
        let task = load_task(&cfg).unwrap();
        assert_eq!(task.examples.len(), 4);
        let score = score_task(&task, &Bytes, &Hand).unwrap();
        // Correct continuations: "ab" 2 nats / 2 bytes, "xa" 4 / 2, " 42 " 4 / 4, "7" 1 / 1:
        // 11 nats over 9 bytes.
        let expected = 11.0 / std::f64::consts::LN_2 / 9.0;
        assert!((score.bpb - expected).abs() < 1e-12, "{score:?}");
        assert_eq!(score.accuracy, Some(0.5));
        assert_eq!(score.exact_match, Some(0.5));
        assert_eq!(score.examples, 4);
        assert_eq!(
            score.metrics().iter().map(|m| m.0).collect::<Vec<_>>(),
            ["bpb", "accuracy", "exact_match"]
        );
    }

    #[test]
    fn byte_lengths_of_a_byte_level_bpe_add_up_to_the_text_bytes() {
        use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::{AddedToken, TokenizerBuilder};
        let dir = std::env::temp_dir().join(format!("moelab-bytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = dir.join("corpus.txt");
        std::fs::write(
            &corpus,
            "café au lait, naïve 日本語 text; the cat sat\n".repeat(20),
        )
        .unwrap();
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(300)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
            .build();
        let mut tokenizer = TokenizerBuilder::<
            BPE,
            tokenizers::NormalizerWrapper,
            ByteLevel,
            ByteLevel,
            ByteLevel,
        >::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .unwrap();
        tokenizer
            .train_from_files(&mut trainer, vec![corpus.display().to_string()])
            .unwrap();
        let path = dir.join("tokenizer.json");
        tokenizer.save(&path, false).unwrap();

        let codec = TokenizerCodec::open(&path).unwrap();
        let lengths = codec.byte_lengths();
        // Multi-byte characters split across tokens still add up: each token counts its bytes.
        for text in ["café au lait", "日本語 naïve ümlaut ẞ", "the cat sat 🐈"] {
            let ids = codec.encode(text).unwrap();
            let bytes: u64 = ids.iter().map(|&i| u64::from(lengths[i as usize])).sum();
            assert_eq!(bytes, text.len() as u64, "{text}: {ids:?}");
        }
        let eos = codec.encode("<|endoftext|>").unwrap();
        assert_eq!(eos.len(), 1);
        assert_eq!(lengths[eos[0] as usize], 0, "a special token is no text");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bits_per_byte_by_hand() {
        // 10 nats over 8 bytes: 10 / ln 2 = 14.4269504 bits, / 8 = 1.8033688 bits per byte.
        assert!((bits_per_byte(10.0, 8) - 1.803_368_801_111_204).abs() < 1e-12);
    }

    #[test]
    fn bad_task_lines_are_refused_naming_file_and_line() {
        let cases = [
            (
                r#"{"prompt": "a", "choices": ["x", "y"], "label": 2}"#,
                "label",
            ),
            (r#"{"prompt": "a", "choices": ["x"], "label": 0}"#, "two"),
            (r#"{"prompt": "a"}"#, "either"),
            (r#"{"prompt": "a", "answer": "b", "label": 0}"#, "either"),
            (r#"{"prompt": "a", "anwser": "b"}"#, "anwser"),
            (r#"{"prompt": "", "answer": "b"}"#, "`prompt` is empty"),
            (
                r#"{"prompt": " ", "choices": ["x", "y"], "label": 0}"#,
                "`prompt` is empty",
            ),
            ("not json", "expected"),
        ];
        for (i, (line, needle)) in cases.iter().enumerate() {
            let cfg = write_task(
                &format!("bad{i}"),
                &[r#"{"prompt": "ok", "answer": "1"}"#, line],
            );
            let err = load_task(&cfg).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("task.jsonl:2"),
                "{needle}: {err}"
            );
        }
        // A missing relative path names its key and the working directory.
        let mut missing = write_task("missing", &[r#"{"prompt": "a", "answer": "b"}"#]);
        missing.path = "no-such-dir/task.jsonl".into();
        let err = load_tasks(&EvalConfig {
            tasks: vec![missing],
        })
        .unwrap_err()
        .to_string();
        let cwd = std::env::current_dir().unwrap();
        assert!(
            err.contains("`eval.tasks[0].path`") && err.contains(&cwd.display().to_string()),
            "{err}"
        );
        let dup = EvalConfig {
            tasks: vec![write_task("d", &[r#"{"prompt": "a", "answer": "b"}"#]); 2],
        };
        assert!(load_tasks(&dup)
            .unwrap_err()
            .to_string()
            .contains("earlier task"));
    }
}
