//! The run config: TOML with unknown keys refused, `--set` overrides, validation before any work.

use std::path::{Path, PathBuf};

use moelab_data::DataConfig;
use moelab_model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::schedule::ScheduleKind;
use crate::tasks::EvalConfig;
use crate::TrainError;

/// A whole run: every section of the TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity and placement of the run.
    pub run: RunConfig,
    /// The network.
    pub model: ModelConfig,
    /// Corpus, tokenizer and mixture.
    pub data: DataConfig,
    /// Optimisation, evaluation and the NaN guard.
    pub train: TrainConfig,
    /// When checkpoints are written and which are kept.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Metric and router-log intervals.
    #[serde(default)]
    pub log: LogConfig,
    /// Task evaluation at every evaluation (`[[eval.tasks]]`).
    #[serde(default, skip_serializing_if = "EvalConfig::is_empty")]
    pub eval: EvalConfig,
    /// How the ranks of a distributed job share the model (`[dist]`).
    #[serde(default)]
    pub dist: DistConfig,
    /// The file and `--set` overrides this config was read from (not part of its value).
    #[serde(skip)]
    pub origin: ConfigOrigin,
}

/// Where a config came from: its file and the `--set` overrides applied on top, so that an error
/// found later (against the data, say) names the override or the file the user wrote, not a
/// run folder's copy.
#[derive(Debug, Clone, Default)]
pub struct ConfigOrigin {
    /// The config file.
    pub file: PathBuf,
    /// The overrides, `key.path=value`, in the order applied.
    pub overrides: Vec<String>,
}

impl PartialEq for ConfigOrigin {
    /// Two configs with the same values are equal wherever they were read from.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl ConfigOrigin {
    /// The error for an invalid value of the dotted `key`: it names the `--set` override that
    /// last set the key (or a table holding it), else the config file.
    pub fn key_error(&self, key: &str, reason: &str) -> TrainError {
        let message = format!("invalid config key `{key}`: {reason}");
        let touches = |spec: &&String| {
            let set = spec
                .split_once('=')
                .map_or(spec.as_str(), |(k, _)| k)
                .trim();
            set == key || key.starts_with(&format!("{set}.")) || set.starts_with(&format!("{key}."))
        };
        match self.overrides.iter().rev().find(touches) {
            Some(spec) => TrainError::Override {
                spec: spec.clone(),
                reason: message,
            },
            // A config not read from a file (a checkpoint's, an import's) has no file to name.
            None if self.file.as_os_str().is_empty() => TrainError::Argument(message),
            None => TrainError::Config {
                path: self.file.clone(),
                message,
            },
        }
    }

    /// [`ConfigOrigin::key_error`] for the key-naming errors of the model and data layers;
    /// other errors pass through.
    pub fn blame(&self, error: TrainError) -> TrainError {
        match error {
            TrainError::Model(moelab_model::ModelError::Config { key, reason })
            | TrainError::Data(moelab_data::DataError::Config { key, reason }) => {
                self.key_error(&key, &reason)
            }
            other => other,
        }
    }
}

/// `[dist]`: how the ranks of a job share the model. Data parallelism needs no key; these
/// are for expert parallelism and failure handling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Ranks per expert-parallel group (G): each holds `n_experts / G` experts of every MoE
    /// layer; G must divide the world size and `model.moe.n_experts` (1 = no expert parallelism).
    pub expert_parallel: usize,
    /// Seconds a rank may wait on the others in an MPI collective of the training loop before
    /// it ends with an error naming the collective (which ends the job).
    pub timeout_s: u64,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            expert_parallel: 1,
            timeout_s: 600,
        }
    }
}

impl DistConfig {
    /// Checks the layout against the job's `world_size` ranks and `n_experts` experts; the
    /// error names both numbers and the keys. Called before any work once the world is known.
    pub fn check_layout(&self, world_size: usize, n_experts: usize) -> Result<(), String> {
        let g = self.expert_parallel;
        if g == 0 {
            return Err(
                "dist.expert_parallel must be at least 1 (1 = every rank holds every expert)"
                    .into(),
            );
        }
        if !n_experts.is_multiple_of(g) {
            return Err(format!(
                "dist.expert_parallel = {g} does not divide model.moe.n_experts = {n_experts}; choose a divisor of {n_experts}"
            ));
        }
        if world_size > 0 && !world_size.is_multiple_of(g) {
            return Err(format!(
                "dist.expert_parallel = {g} does not divide the world size of {world_size} ranks; launch a multiple of {g} ranks or choose a divisor of {world_size}"
            ));
        }
        Ok(())
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// The host CPU (bit-identical runs for a fixed thread count).
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Compute precision of the forward and backward passes. Master weights, gradients and the
/// AdamW state are f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in f32 (the CPU default; bit-identical runs).
    #[default]
    F32,
    /// Activations and matmuls in bf16; the router, logits and losses in f32.
    Bf16,
}

impl Precision {
    /// The name used in configs.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The activation dtype.
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// `[train]`: the optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps in the run.
    pub steps: u64,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Compute precision: "f32" or "bf16" (mixed precision over f32 master weights).
    #[serde(default)]
    pub precision: Precision,
    /// Tokens per optimizer step over all ranks; gradient accumulation makes up the difference.
    /// Default: one micro-batch.
    #[serde(default)]
    pub global_batch_tokens: Option<u64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of the peak.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// Schedule after warm-up.
    #[serde(default = "default_schedule")]
    pub schedule: ScheduleKind,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// WSD: fraction of steps spent decaying.
    #[serde(default = "default_decay_fraction")]
    pub decay_fraction: f64,
    /// Decoupled weight decay.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Parameters whose name contains any of these get no weight decay.
    #[serde(default = "default_no_decay")]
    pub no_decay: Vec<String>,
    /// AdamW first-moment decay.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// AdamW second-moment decay.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// AdamW denominator floor.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Global gradient-norm clip; absent disables clipping.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: Option<f64>,
    /// Evaluate every N steps (and always at the end); 0 = only at the end.
    #[serde(default)]
    pub eval_interval: u64,
    /// Auxiliary-loss-free balancing: b_i += rate * sign(mean load - load_i) each step (only
    /// with `model.moe.expert_bias = true`).
    #[serde(default = "default_expert_bias_rate")]
    pub expert_bias_rate: f64,
    /// ZeRO-1: each rank keeps the AdamW moments of its 1/world share of the parameters only
    /// (gradients reduce-scattered, weights all-gathered); checkpoints are the same either way.
    #[serde(default)]
    pub shard_optimizer: bool,
    /// Consecutive non-finite steps after which the run stops with an error.
    #[serde(default = "default_max_nonfinite")]
    pub max_nonfinite_steps: u32,
    /// Testing the NaN guard: the loss of these steps (numbered like metrics, from 1) is replaced
    /// by NaN.
    #[serde(default)]
    pub debug_nan_steps: Vec<u64>,
}

/// `[checkpoint]`: when to save and what to keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every N steps (and always at the end and on SIGINT/SIGTERM); 0 = only those.
    pub interval: u64,
    /// Newest checkpoints kept; older ones are deleted unless they are milestones.
    pub keep_last: usize,
    /// Steps whose checkpoints are kept forever (router-saturation analysis needs early ones).
    pub milestones: Vec<u64>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            interval: 0,
            keep_last: 3,
            milestones: Vec::new(),
        }
    }
}

/// `[log]`: how often metrics and router logs are written, and whether TensorBoard files are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Write a metrics.jsonl line every N steps.
    pub interval: u64,
    /// Flush router-activation counts to router/ every N steps.
    pub router_interval: u64,
    /// Also write the logged scalars as TensorBoard event files in the run's tensorboard/.
    pub tensorboard: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            interval: 10,
            router_interval: 50,
            tensorboard: false,
        }
    }
}

fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_schedule() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn default_decay_fraction() -> f64 {
    0.2
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_no_decay() -> Vec<String> {
    ["norm", "embed", "bias"].map(String::from).to_vec()
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}
fn default_expert_bias_rate() -> f64 {
    1e-3
}
fn default_max_nonfinite() -> u32 {
    3
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
    /// Where the model runs.
    #[serde(default)]
    pub device: DeviceKind,
    /// CPU threads (0 = all cores); fixed threads give bit-identical CPU runs.
    #[serde(default)]
    pub threads: usize,
    /// On CUDA, the fused kernels or the composed ops for every op that has both (MoE routing,
    /// flash attention); unset: each op's default (`moelab_kernels::FusedOp::default_fused`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernels: Option<KernelsChoice>,
}

/// `run.kernels`: which implementation the ops with a fused CUDA kernel and a composed path use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelsChoice {
    /// Every fused kernel.
    Fused,
    /// Every composed path.
    Composed,
}

impl RunConfig {
    /// Makes `run.kernels` the process-wide choice of moelab-kernels (the CPU is unaffected).
    pub fn apply_kernels(&self) {
        moelab_kernels::set_kernel_choice(match self.kernels {
            None => moelab_kernels::KernelChoice::PerOp,
            Some(KernelsChoice::Fused) => moelab_kernels::KernelChoice::Fused,
            Some(KernelsChoice::Composed) => moelab_kernels::KernelChoice::Composed,
        });
    }
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs")
}

/// The most CPU threads a run may ask for: far above any machine's cores, far below what
/// would exhaust the process table (each thread is an OS thread with its own stack).
pub const MAX_THREADS: usize = 1024;

/// `run.name` is one plain folder name inside `run.out_dir`: not empty, not `.` or `..`, no
/// path separator, so a run never lands outside `run.out_dir` or in another run's folder.
fn check_run_name(name: &str) -> Result<(), (&'static str, String)> {
    let mut parts = std::path::Path::new(name).components();
    let one_normal = matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    );
    let plain = one_normal && !name.contains(['/', '\\']);
    if plain {
        return Ok(());
    }
    Err((
        "run.name",
        format!("{name:?} is not a single plain folder name (no `/`, not empty, not `.` or `..`)"),
    ))
}

impl Config {
    /// Reads `path`, applies `overrides` (`key.path=value`, value in TOML syntax or a bare
    /// string), and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
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
        let origin = ConfigOrigin {
            file: path.to_path_buf(),
            overrides: overrides.to_vec(),
        };
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                match origin.key_error(&key, "") {
                    TrainError::Override { spec, .. } => TrainError::Override {
                        spec,
                        reason: format!("key `{key}`: {}", e.inner()),
                    },
                    _ => config_error(format!("key `{key}`: {}", e.inner())),
                }
            })?;
        config
            .model
            .validate()
            .map_err(|e| origin.blame(e.into()))?;
        config.data.validate().map_err(|e| origin.blame(e.into()))?;
        config
            .validate()
            .map_err(|(key, reason)| origin.key_error(key, &reason))?;
        config.origin = origin;
        // Every command gets its config here, and the kernel choice is process-wide.
        config.run.apply_kernels();
        Ok(config)
    }

    /// Sequences per optimizer step over all ranks.
    pub fn global_sequences(&self) -> usize {
        let seq_len = self.data.seq_len as u64;
        match self.train.global_batch_tokens {
            Some(tokens) => (tokens / seq_len.max(1)) as usize,
            None => self.train.micro_batch,
        }
    }

    /// Micro-batches accumulated per optimizer step (one rank).
    pub fn accumulation_steps(&self) -> usize {
        self.global_sequences() / self.train.micro_batch.max(1)
    }

    /// Cross-section checks; the error is (dotted key, reason).
    fn validate(&self) -> Result<(), (&'static str, String)> {
        check_run_name(&self.run.name)?;
        if self.run.threads > MAX_THREADS {
            return Err((
                "run.threads",
                format!(
                    "{} is more than the {MAX_THREADS} threads moelab allows (0 = all cores)",
                    self.run.threads
                ),
            ));
        }
        let train = &self.train;
        if train.steps == 0 {
            return Err(("train.steps", "must be at least 1".into()));
        }
        if train.micro_batch == 0 {
            return Err(("train.micro_batch", "must be at least 1".into()));
        }
        if self.data.seq_len > self.model.max_seq_len {
            return Err((
                "data.seq_len",
                format!(
                    "{} exceeds model.max_seq_len = {}",
                    self.data.seq_len, self.model.max_seq_len
                ),
            ));
        }
        let micro_tokens = (train.micro_batch * self.data.seq_len) as u64;
        if let Some(tokens) = train.global_batch_tokens {
            if tokens == 0 || tokens % micro_tokens != 0 {
                return Err((
                    "train.global_batch_tokens",
                    format!("{tokens} is not a positive multiple of micro_batch x seq_len = {micro_tokens}"),
                ));
            }
        }
        if !(train.lr > 0.0 && train.lr.is_finite()) {
            return Err(("train.lr", format!("must be positive, got {}", train.lr)));
        }
        if !(0.0..=1.0).contains(&train.min_lr_ratio) {
            return Err(("train.min_lr_ratio", "must be in [0, 1]".into()));
        }
        if !(0.0..=1.0).contains(&train.decay_fraction) {
            return Err(("train.decay_fraction", "must be in [0, 1]".into()));
        }
        if !(0.0..1.0).contains(&train.beta1) || !(0.0..1.0).contains(&train.beta2) {
            return Err(("train.beta1", "beta1 and beta2 must be in [0, 1)".into()));
        }
        // AdamW divides by sqrt(v) + eps: eps = 0 turns a parameter with no gradient yet into
        // 0 / 0 = NaN on the first step.
        if !(train.eps > 0.0 && train.eps.is_finite()) {
            return Err((
                "train.eps",
                format!(
                    "must be positive and finite (AdamW divides by sqrt(v) + eps; 1e-8 is usual), got {}",
                    train.eps
                ),
            ));
        }
        if !(train.weight_decay >= 0.0 && train.weight_decay.is_finite()) {
            return Err((
                "train.weight_decay",
                format!(
                    "must be >= 0 and finite (0 disables decay; a negative decay grows the weights), got {}",
                    train.weight_decay
                ),
            ));
        }
        if train.grad_clip.is_some_and(|c| c <= 0.0) {
            return Err((
                "train.grad_clip",
                "must be positive (omit it to disable clipping)".into(),
            ));
        }
        if train.max_nonfinite_steps == 0 {
            return Err(("train.max_nonfinite_steps", "must be at least 1".into()));
        }
        // The world size is not known yet (0 skips it); the trainer checks it at launch.
        self.dist
            .check_layout(0, self.model.moe.n_experts)
            .map_err(|reason| ("dist.expert_parallel", reason))?;
        if self.dist.timeout_s == 0 {
            return Err(("dist.timeout_s", "must be at least 1 second".into()));
        }
        if self.log.interval == 0 || self.log.router_interval == 0 {
            return Err((
                "log.interval",
                "log.interval and log.router_interval must be at least 1".into(),
            ));
        }
        Ok(())
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
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A small valid config (its dataset is never opened by the tests that use it).
    pub(crate) const TEXT: &str = r#"
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
[data]
dataset = "unused"
seq_len = 16
[data.mixture]
web = 1.0
[train]
steps = 10
micro_batch = 2
global_batch_tokens = 64
lr = 1e-3
"#;

    fn load(text: &str, overrides: &[&str]) -> Result<Config, String> {
        let dir = std::env::temp_dir().join(format!("moelab-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // One file per call: tests run in parallel threads, and a file rewritten while another
        // test reads it would read as empty.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{n}.toml"));
        std::fs::write(&path, text).unwrap();
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::load(&path, &overrides).map_err(|e| e.to_string())
    }

    /// run.name is one plain folder name, and run.threads is bounded; each refusal names the key.
    #[test]
    fn run_name_and_threads_are_refused_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("moelab-cfg-name-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, TEXT).unwrap();
        for name in ["\"\"", "\"../../x\"", "\".\"", "\"a/b\"", "\"/abs\""] {
            let err = Config::load(&path, &[format!("run.name={name}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("`run.name`"), "{name}: {err}");
        }
        Config::load(&path, &["run.name=\"ok-name.2\"".into()]).unwrap();
        let err = Config::load(&path, &["run.threads=100000".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`run.threads`") && err.contains("1024"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
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
    fn cross_section_constraints_are_named() {
        let err = load(TEXT, &["train.global_batch_tokens=48"]).unwrap_err();
        assert!(err.contains("train.global_batch_tokens"), "{err}");
        let err = load(TEXT, &["data.seq_len=32"]).unwrap_err();
        assert!(
            err.contains("data.seq_len") && err.contains("max_seq_len"),
            "{err}"
        );
        let cfg = load(TEXT, &[]).unwrap();
        assert_eq!((cfg.global_sequences(), cfg.accumulation_steps()), (4, 2));
    }

    /// eps = 0 would divide by zero in AdamW and a negative decay grows the weights: both are
    /// refused naming the key, as are NaN and infinity.
    #[test]
    fn optimizer_eps_and_weight_decay_are_refused_naming_the_key() {
        for eps in ["0", "0.0", "-1e-8", "nan", "inf"] {
            let err = load(TEXT, &[&format!("train.eps={eps}")]).unwrap_err();
            assert!(err.contains("`train.eps`"), "{eps}: {err}");
        }
        for wd in ["-0.1", "nan", "inf"] {
            let err = load(TEXT, &[&format!("train.weight_decay={wd}")]).unwrap_err();
            assert!(err.contains("`train.weight_decay`"), "{wd}: {err}");
        }
        let cfg = load(TEXT, &["train.eps=1e-6", "train.weight_decay=0"]).unwrap();
        assert_eq!((cfg.train.eps, cfg.train.weight_decay), (1e-6, 0.0));
    }

    /// An invalid value given with --set names the override, not the file it was applied to;
    /// one written in the file names the file.
    #[test]
    fn errors_from_set_values_name_the_override() {
        for (spec, key) in [
            ("train.eps=0", "train.eps"),
            ("model.vocab_size=0", "model.vocab_size"),
            ("data.seq_len=0", "data.seq_len"),
            ("train.steps=\"ten\"", "train.steps"),
        ] {
            let err = load(TEXT, &[spec]).unwrap_err();
            assert!(
                err.starts_with(&format!("--set {spec}:")) && err.contains(key),
                "{spec}: {err}"
            );
            assert!(!err.contains(".toml"), "{spec}: {err}");
        }
        let err = load(&TEXT.replace("lr = 1e-3", "lr = 0.0"), &["train.steps=3"]).unwrap_err();
        assert!(
            err.contains(".toml: ") && err.contains("`train.lr`") && !err.contains("--set"),
            "{err}"
        );
        // A later error found against the data names the override that set the key.
        let cfg = load(TEXT, &["model.vocab_size=70"]).unwrap();
        let err = cfg
            .origin
            .key_error("model.vocab_size", "too small")
            .to_string();
        assert!(err.starts_with("--set model.vocab_size=70: "), "{err}");
    }

    #[test]
    fn dist_layout_is_checked_naming_the_numbers() {
        let cfg = load(TEXT, &[]).unwrap();
        assert_eq!(cfg.dist, DistConfig::default());
        assert_eq!((cfg.dist.expert_parallel, cfg.dist.timeout_s), (1, 600));
        let cfg = load(TEXT, &["dist.expert_parallel=2", "dist.timeout_s=30"]).unwrap();
        assert_eq!((cfg.dist.expert_parallel, cfg.dist.timeout_s), (2, 30));
        cfg.dist.check_layout(4, 4).unwrap();
        let err = cfg.dist.check_layout(3, 4).unwrap_err();
        assert!(err.contains("= 2") && err.contains("3 ranks"), "{err}");
        let err = load(TEXT, &["dist.expert_parallel=3"]).unwrap_err();
        assert!(
            err.contains("dist.expert_parallel") && err.contains("n_experts = 4"),
            "{err}"
        );
        let err = load(TEXT, &["dist.expert_parallel=0"]).unwrap_err();
        assert!(err.contains("dist.expert_parallel"), "{err}");
        let err = load(TEXT, &["dist.timeout_s=0"]).unwrap_err();
        assert!(err.contains("dist.timeout_s"), "{err}");
        let err = load(TEXT, &["dist.expert_paralel=2"]).unwrap_err();
        assert!(err.contains("expert_paralel"), "{err}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let cfg = load(TEXT, &[]).unwrap();
        let again: Config = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(cfg, again);
    }
}

/// The config reference (docs/CONFIG.md) checked against the types: every key a run config can
/// hold is listed there with the default the types give it.
#[cfg(test)]
mod reference {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Only the required keys; map keys are placeholders (`<domain>`, `<source>`), one stage.
    const REQUIRED: &str = r#"
[run]
name = "REQUIRED"
[model]
vocab_size = 0
d_model = 0
n_layers = 0
n_heads = 0
max_seq_len = 0
[model.moe]
n_experts = 0
top_k = 0
expert_ff = 0
[data]
dataset = "REQUIRED"
seq_len = 0
[data.mixture]
"<domain>" = 0.0
[data.source_mixture."<domain>"]
"<source>" = 0.0
[data.select."<domain>"]
scores = "REQUIRED"
threshold = 0.0
share = 0.0
[[data.stages]]
start_token = 0
[data.stages.mixture]
"<domain>" = 0.0
[train]
steps = 0
micro_batch = 0
lr = 0.0
[[eval.tasks]]
name = "REQUIRED"
path = "REQUIRED"
"#;

    /// The field names the types accept in the table at `path` (e.g. `["model", "moe"]`), read
    /// from serde's refusal of an unknown key: the types are the source, not a hand-kept list.
    fn accepted(path: &[&str]) -> Vec<String> {
        let mut root: toml::Table = REQUIRED.parse().unwrap();
        let mut table = &mut root;
        for part in path {
            let entry = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = match entry {
                toml::Value::Table(t) => t,
                toml::Value::Array(items) => items[0].as_table_mut().unwrap(),
                other => panic!("{part} is {other:?}"),
            };
        }
        table.insert("__probe__".into(), toml::Value::Integer(0));
        let err = toml::from_str::<Config>(&toml::to_string(&root).unwrap())
            .unwrap_err()
            .to_string();
        let expected = err
            .split("expected")
            .nth(1)
            .unwrap_or_else(|| panic!("no field list in: {err}"));
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// The value at `path`, stepping into the first item of arrays.
    fn at<'a>(value: &'a serde_json::Value, path: &[String]) -> Option<&'a serde_json::Value> {
        path.iter().try_fold(value, |v, part| match v {
            serde_json::Value::Array(items) => items.first()?.get(part),
            v => v.get(part),
        })
    }

    /// Every key of the config as `(dotted key, default)`; required keys read `required`.
    fn keys() -> Vec<(String, String)> {
        let resolved = serde_json::to_value(toml::from_str::<Config>(REQUIRED).unwrap()).unwrap();
        let required = serde_json::to_value(REQUIRED.parse::<toml::Table>().unwrap()).unwrap();
        let mut out = Vec::new();
        let mut pending: Vec<Vec<String>> = vec![Vec::new()];
        while let Some(path) = pending.pop() {
            let fields = accepted(&path.iter().map(String::as_str).collect::<Vec<_>>());
            for field in fields {
                let mut key_path = path.clone();
                key_path.push(field);
                let dotted = key_path
                    .join(".")
                    .replace("stages.", "stages[].")
                    .replace("tasks.", "tasks[].");
                let value = at(&resolved, &key_path);
                let given = at(&required, &key_path);
                match value {
                    // A map keyed by the user's names: its placeholder entries are the keys.
                    Some(serde_json::Value::Object(map))
                        if map.keys().any(|k| k.starts_with('<')) =>
                    {
                        for (name, inner) in map {
                            match inner.as_object() {
                                Some(sources) => out.extend(sources.keys().map(|source| {
                                    (format!("{dotted}.{name}.{source}"), "required".into())
                                })),
                                None => out.push((format!("{dotted}.{name}"), "required".into())),
                            }
                        }
                    }
                    Some(serde_json::Value::Object(_)) => pending.push(key_path),
                    Some(serde_json::Value::Array(items))
                        if items.first().is_some_and(|i| i.is_object()) =>
                    {
                        pending.push(key_path)
                    }
                    _ if given.is_some() => out.push((dotted, "required".into())),
                    None | Some(serde_json::Value::Null) => out.push((dotted, "none".into())),
                    Some(v) => out.push((dotted, v.to_string())),
                }
            }
        }
        out.sort();
        out
    }

    fn reference() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/CONFIG.md");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn every_config_key_is_in_the_reference_with_its_default() {
        let text = reference();
        let mut missing = Vec::new();
        for (key, default) in keys() {
            let row = text
                .lines()
                .find(|l| l.starts_with(&format!("| `{key}` |")));
            match row {
                Some(row) => {
                    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                    if cells.get(2) != Some(&format!("`{default}`").as_str()) {
                        missing.push(format!("{key}: default `{default}`, reference: {row}"));
                    }
                    if cells.get(3).is_none_or(|meaning| meaning.is_empty()) {
                        missing.push(format!("{key}: no meaning in the reference"));
                    }
                }
                None => missing.push(format!("| `{key}` | `{default}` | |")),
            }
        }
        assert!(
            missing.is_empty(),
            "docs/CONFIG.md lacks or misstates these keys:\n{}",
            missing.join("\n")
        );
    }
}
