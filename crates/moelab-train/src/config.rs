//! The run config: TOML with unknown keys refused, `--set` overrides, validation before any work.

use std::path::{Path, PathBuf};

use moelab_model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// A whole run: `[run]` and `[model]` (later issues add `[data]`, `[train]`, `[checkpoint]`,
/// `[log]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity and placement of the run.
    pub run: RunConfig,
    /// The network.
    pub model: ModelConfig,
}

/// `[run]`: what the run is called, its seed and where it writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Name of the run (and of its folder under `out_dir`).
    pub name: String,
    /// Seed of initialisation, data order and routing noise.
    #[serde(default)]
    pub seed: u64,
    /// Folder that holds run folders.
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs")
}

impl Config {
    /// Reads `path`, applies `overrides` (`key.path=value`, value in TOML syntax or a bare
    /// string), and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config_error = |message: String| TrainError::Config {
            path: path.to_path_buf(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| config_error(e.to_string()))?;
        for spec in overrides {
            apply_override(&mut table, spec)?;
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                config_error(format!("key `{key}`: {}", e.inner()))
            })?;
        config.model.validate()?;
        Ok(config)
    }

    /// The resolved config as TOML, as saved in the run folder.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# config not serialisable: {e}\n"))
    }
}

/// Sets `key.path=value` in `table`, creating tables along the path.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), TrainError> {
    let fail = |reason: &str| TrainError::Override {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| fail("expected key.path=value"))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(fail("empty key segment"));
    }
    // TOML literal if it parses as one (numbers, booleans, arrays, quoted strings), else a string.
    let value = format!("v = {}", raw.trim())
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let (last, parents) = parts.split_last().ok_or_else(|| fail("empty key"))?;
    let mut current = table;
    for part in parents {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| fail(&format!("`{part}` is not a table")))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const TEXT: &str = r#"
[run]
name = "t"
[model]
vocab_size = 64
d_model = 32
n_layers = 2
n_heads = 4
max_seq_len = 16
[model.moe]
n_experts = 4
top_k = 2
expert_ff = 16
"#;

    fn load(text: &str, overrides: &[&str]) -> Result<Config, String> {
        let dir = std::env::temp_dir().join(format!("moelab-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{:x}.toml", text.len() * 31 + overrides.len()));
        std::fs::write(&path, text).unwrap();
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::load(&path, &overrides).map_err(|e| e.to_string())
    }

    #[test]
    fn overrides_apply_with_toml_types() {
        let cfg = load(
            TEXT,
            &["model.moe.top_k=1", "run.name=other", "model.qk_norm=true"],
        )
        .unwrap();
        assert_eq!(cfg.model.moe.top_k, 1);
        assert_eq!(cfg.run.name, "other");
        assert!(cfg.model.qk_norm);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let err = load(&TEXT.replace("expert_ff", "expert_width"), &[]).unwrap_err();
        assert!(
            err.contains("model.moe") && err.contains("expert_width"),
            "{err}"
        );
        let err = load(TEXT, &["model.moe.topk=1"]).unwrap_err();
        assert!(err.contains("model.moe") && err.contains("topk"), "{err}");
        let err = load(&format!("{TEXT}\n[trian]\nsteps = 1\n"), &[]).unwrap_err();
        assert!(err.contains("trian"), "{err}");
    }

    #[test]
    fn impossible_shapes_are_named() {
        let err = load(TEXT, &["model.moe.top_k=5"]).unwrap_err();
        assert!(err.contains("model.moe.top_k"), "{err}");
        let err = load(TEXT, &["model.n_heads=5"]).unwrap_err();
        assert!(err.contains("model.n_heads"), "{err}");
        let err = load(TEXT, &["model.moe.top_k"]).unwrap_err();
        assert!(err.contains("key.path=value"), "{err}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let cfg = load(TEXT, &[]).unwrap();
        let again: Config = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(cfg, again);
    }
}
