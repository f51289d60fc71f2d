//! `[data]`: which prepared dataset, how it is cut into sequences, and the mixture by domain.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{DataError, Result};

/// The `[data]` section of a run config (embedded by the train crate as its `data` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Prepared dataset folder (holds `manifest.json`).
    pub dataset: PathBuf,
    /// Raw corpus folder, prepared into `dataset` on first use when it has no manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<PathBuf>,
    /// A Hugging Face tokenizer.json to use instead of training one on `sources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the byte-level BPE trained on `sources` (when `tokenizer` is absent).
    #[serde(default = "default_tokenizer_vocab")]
    pub tokenizer_vocab: usize,
    /// Share of each domain's documents held out for validation when preparing on first use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_fraction: Option<f64>,
    /// Tokens per training sequence (each sequence reads seq_len + 1 tokens for its targets).
    pub seq_len: usize,
    /// Token budget of the run, for repetition accounting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
    /// Refuse to train if any domain source would be read more than this many epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_repetition: Option<f64>,
    /// Cap, in tokens, of each domain's fixed validation stream.
    #[serde(default = "default_validation_tokens")]
    pub validation_tokens: u64,
    /// Cross-domain order is shuffled in blocks of this many sequences.
    #[serde(default = "default_shuffle_block")]
    pub shuffle_block: usize,
    /// Token shares by domain; renormalised to sum 1; empty = proportional to training tokens.
    #[serde(default)]
    pub mixture: BTreeMap<String, f64>,
    /// Optional shares of sources inside a domain's budget (default: proportional to tokens).
    #[serde(default)]
    pub source_mixture: BTreeMap<String, BTreeMap<String, f64>>,
    /// Later stages: from `start_token` on, the domain shares become the stage's `mixture`.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
    /// Classifier selection per domain: a share of the domain's budget from documents scored
    /// at or above a threshold (`moelab data classify score`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub select: BTreeMap<String, SelectConfig>,
}

/// `[data.select.<domain>]`: take `share` of the domain's sequences from its training documents
/// whose score `scores` is at least `threshold`, the rest from the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    /// Score name (`moelab data classify score ... --name NAME`).
    pub scores: String,
    /// Documents scored at or above this are selected.
    pub threshold: f64,
    /// Share of the domain's sequences drawn from selected documents, in [0, 1].
    pub share: f64,
}

/// One entry of `[[data.stages]]`: a mixture that takes over from a token position on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// First training token (counted as sequences x seq_len) the stage applies to.
    pub start_token: u64,
    /// Token shares by domain for this stage (domains absent are removed).
    pub mixture: BTreeMap<String, f64>,
}

fn default_tokenizer_vocab() -> usize {
    4096
}

fn default_validation_tokens() -> u64 {
    16384
}

fn default_shuffle_block() -> usize {
    64
}

/// The validation share used when neither the CLI nor the config gives one.
pub const DEFAULT_VALIDATION_FRACTION: f64 = 0.01;

impl DataConfig {
    /// A config with defaults for everything but the dataset path and sequence length.
    pub fn new(dataset: impl Into<PathBuf>, seq_len: usize) -> Self {
        DataConfig {
            dataset: dataset.into(),
            sources: None,
            tokenizer: None,
            tokenizer_vocab: default_tokenizer_vocab(),
            validation_fraction: None,
            seq_len,
            total_tokens: None,
            max_repetition: None,
            validation_tokens: default_validation_tokens(),
            shuffle_block: default_shuffle_block(),
            mixture: BTreeMap::new(),
            source_mixture: BTreeMap::new(),
            stages: Vec::new(),
            select: BTreeMap::new(),
        }
    }

    /// Reads only the `[data]` table of a full run config file (other tables are ignored).
    pub fn from_run_config_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        Self::from_run_config_str(&text)
    }

    /// Parses the `[data]` table out of a full run config text.
    pub fn from_run_config_str(text: &str) -> Result<Self> {
        let value: toml::Value = text
            .parse::<toml::Table>()
            .map(toml::Value::Table)
            .map_err(|e| DataError::config("data", format!("not valid TOML: {e}")))?;
        let data = value
            .get("data")
            .cloned()
            .ok_or_else(|| DataError::config("data", "the config has no [data] table"))?;
        let cfg: DataConfig = data
            .try_into()
            .map_err(|e: toml::de::Error| DataError::config("data", e.message().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks everything that does not need the dataset; errors name the dotted key.
    pub fn validate(&self) -> Result<()> {
        if self.seq_len == 0 {
            return Err(DataError::config("data.seq_len", "must be at least 1"));
        }
        if self.shuffle_block == 0 {
            return Err(DataError::config(
                "data.shuffle_block",
                "must be at least 1 (1 = no cross-domain shuffle)",
            ));
        }
        if self.tokenizer.is_none() && self.tokenizer_vocab < 260 {
            return Err(DataError::config(
                "data.tokenizer_vocab",
                format!(
                    "{} is too small: a byte-level BPE needs 256 byte tokens + <|endoftext|>; use at least 260",
                    self.tokenizer_vocab
                ),
            ));
        }
        if let Some(f) = self.validation_fraction {
            if !(0.0..1.0).contains(&f) {
                return Err(DataError::config(
                    "data.validation_fraction",
                    format!("must be in [0, 1), got {f}"),
                ));
            }
        }
        if let Some(max) = self.max_repetition {
            if !(max > 0.0 && max.is_finite()) {
                return Err(DataError::config(
                    "data.max_repetition",
                    format!("must be a positive number of epochs, got {max}"),
                ));
            }
        }
        if self.total_tokens == Some(0) {
            return Err(DataError::config(
                "data.total_tokens",
                "must be positive (omit it for no budget)",
            ));
        }
        check_weights("data.mixture", &self.mixture, true)?;
        for (domain, sel) in &self.select {
            if !(0.0..=1.0).contains(&sel.share) {
                return Err(DataError::config(
                    format!("data.select.{domain}.share"),
                    format!("must be in [0, 1], got {}", sel.share),
                ));
            }
            if !sel.threshold.is_finite() {
                return Err(DataError::config(
                    format!("data.select.{domain}.threshold"),
                    "must be a finite score",
                ));
            }
        }
        for (domain, sources) in &self.source_mixture {
            check_weights(&format!("data.source_mixture.{domain}"), sources, false)?;
        }
        let mut previous: Option<u64> = None;
        for (i, stage) in self.stages.iter().enumerate() {
            let key = format!("data.stages[{i}]");
            if stage.start_token == 0 {
                return Err(DataError::config(
                    format!("{key}.start_token"),
                    "must be positive (token 0 uses data.mixture)",
                ));
            }
            if previous.is_some_and(|p| stage.start_token <= p) {
                return Err(DataError::config(
                    format!("{key}.start_token"),
                    "stages must have strictly increasing start_token",
                ));
            }
            previous = Some(stage.start_token);
            check_weights(&format!("{key}.mixture"), &stage.mixture, false)?;
        }
        Ok(())
    }
}

/// Shares must be finite and non-negative with a positive sum (an empty table is allowed
/// only where it means "proportional to tokens").
fn check_weights(key: &str, weights: &BTreeMap<String, f64>, empty_ok: bool) -> Result<()> {
    for (name, w) in weights {
        if !w.is_finite() || *w < 0.0 {
            return Err(DataError::config(
                format!("{key}.{name}"),
                format!("weight must be a finite number >= 0, got {w}"),
            ));
        }
    }
    if weights.is_empty() && empty_ok {
        return Ok(());
    }
    if weights.values().sum::<f64>() <= 0.0 {
        return Err(DataError::config(
            key,
            "the weights sum to 0: give at least one positive share",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const EXAMPLE: &str = r#"
[run]
name = "x"
[data]
dataset = "data/prepared/sample"   # prepared dataset dir
sources = "data/sample"            # raw corpus
tokenizer_vocab = 4096
seq_len = 256
total_tokens = 2_000_000
max_repetition = 8.0
validation_tokens = 16384
shuffle_block = 64
[data.mixture]
web = 0.4
code = 0.2
code_text = 0.1
math = 0.2
math_text = 0.1
[data.source_mixture.math]
structured = 0.5
plain = 0.5
[[data.stages]]
start_token = 1_000_000
mixture = { web = 0.2, code = 0.2, code_text = 0.1, math = 0.4, math_text = 0.1 }
"#;

    #[test]
    fn example_parses_and_round_trips() {
        let cfg = DataConfig::from_run_config_str(EXAMPLE).unwrap();
        assert_eq!(cfg.seq_len, 256);
        assert_eq!(cfg.mixture.len(), 5);
        assert_eq!(cfg.source_mixture["math"]["plain"], 0.5);
        assert_eq!(cfg.stages[0].start_token, 1_000_000);
        let text = toml::to_string(&cfg).unwrap();
        let back: DataConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn errors_name_the_key() {
        let bad = EXAMPLE.replace("web = 0.4", "web = -0.4");
        let err = DataConfig::from_run_config_str(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.mixture.web"), "{err}");
        let bad = EXAMPLE.replace("seq_len = 256", "seq_len = 0");
        let err = DataConfig::from_run_config_str(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.seq_len"), "{err}");
        let bad = EXAMPLE.replace("shuffle_block = 64", "shuffle_blok = 64");
        let err = DataConfig::from_run_config_str(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shuffle_blok"), "{err}");
    }
}
