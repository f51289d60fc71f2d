//! Evaluation: loss per domain on the fixed validation streams, where the router sends each
//! domain's validation tokens, and the `[[eval.tasks]]` scores (see [`crate::tasks`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use moelab_data::{Dataset, ValidationPlan};
use moelab_model::{ForwardOptions, MoeTransformer};
use moelab_trace::compare::MIN_RELIABLE_VAL_TOKENS;
use moelab_trace::router_log::{write_chunk, RouterLog};
use serde::{Deserialize, Serialize};

use crate::dist::Collective;
use crate::dist::Single;
use crate::router_logger::RouterLogger;
use crate::run::load::{load_model, open_run_data};
use crate::run::RunDir;
use crate::tasks::{bits_per_byte, load_tasks, score_task, ModelScorer, TaskScore, TokenizerCodec};
use crate::{Config, TrainError};

/// Validation loss of one domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainEval {
    /// Domain name.
    pub domain: String,
    /// Mean cross-entropy per token (nats); NaN when the domain had no tokens (null in JSON).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Validation tokens scored.
    pub tokens: u64,
    /// Bits per UTF-8 byte of the scored target text: the summed token loss / ln 2 / its bytes;
    /// unlike `loss`, comparable across tokenizers. NaN when nothing was scored (null in JSON;
    /// also what an eval file written before it existed reads as).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub bpb: f64,
    /// UTF-8 bytes of the scored target text (special tokens count none).
    #[serde(default)]
    pub bytes: u64,
}

impl DomainEval {
    /// The evaluation of `domain` from its summed token loss (`nats`) over `tokens` target
    /// tokens that stand for `bytes` bytes of text.
    pub fn from_sums(domain: &str, nats: f64, tokens: u64, bytes: u64) -> Self {
        Self {
            domain: domain.to_string(),
            loss: if tokens > 0 {
                nats / tokens as f64
            } else {
                f64::NAN
            },
            tokens,
            bpb: if tokens > 0 && bytes > 0 {
                bits_per_byte(nats, bytes)
            } else {
                f64::NAN
            },
            bytes,
        }
    }
}

fn nan() -> f64 {
    f64::NAN
}

/// UTF-8 bytes of the text that `targets` stand for (`byte_lengths` from
/// [`TokenizerCodec::byte_lengths`]; an id outside it counts none).
pub fn target_bytes(targets: &[u32], byte_lengths: &[u32]) -> u64 {
    targets
        .iter()
        .map(|&t| u64::from(byte_lengths.get(t as usize).copied().unwrap_or(0)))
        .sum()
}

/// The validation tokens evaluation scores per domain, checked before a run or an evaluation
/// starts: a domain whose loss would rest on fewer than [`MIN_RELIABLE_VAL_TOKENS`] (the
/// threshold below which comparisons mark a loss) gets a warning, never an error.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationCheck {
    /// Per domain, in dataset order.
    pub domains: Vec<ValidationPlan>,
    /// `data.validation_tokens`: the cap per domain.
    pub cap: u64,
    /// `data.seq_len`.
    pub seq_len: usize,
}

impl ValidationCheck {
    /// What evaluating `dataset` with `cfg`'s seq_len and validation cap scores.
    pub fn new(dataset: &Dataset, cfg: &Config) -> Self {
        Self {
            domains: dataset.validation_plan(cfg.data.seq_len, cfg.data.validation_tokens),
            cap: cfg.data.validation_tokens,
            seq_len: cfg.data.seq_len,
        }
    }

    /// One line: the validation tokens each domain's loss rests on.
    pub fn line(&self) -> String {
        let per_domain: Vec<String> = self
            .domains
            .iter()
            .map(|p| format!("{} {}", p.domain, p.scored))
            .collect();
        format!(
            "validation tokens per domain (data.validation_tokens = {}): {}",
            self.cap,
            per_domain.join(", ")
        )
    }

    /// One warning per domain below [`MIN_RELIABLE_VAL_TOKENS`], naming it, its count and the fix.
    pub fn warnings(&self) -> Vec<String> {
        let min = MIN_RELIABLE_VAL_TOKENS;
        let seq = self.seq_len.max(1) as u64;
        self.domains
            .iter()
            .filter(|p| p.scored < min)
            .map(|p| match &p.shortfall {
                Some(why) => format!("{why}. Its validation loss is not measured (NaN)"),
                None if p.scored == self.cap / seq * seq => format!(
                    "domain `{}`: its validation loss rests on {} tokens, fewer than {min} \
                     (comparisons mark such losses), because data.validation_tokens = {} caps \
                     it; raise data.validation_tokens to {min}",
                    p.domain, p.scored, self.cap
                ),
                None => format!(
                    "domain `{}`: its validation loss rests on {} tokens ({} validation tokens \
                     in {} documents), fewer than {min} (comparisons mark such losses); re-run \
                     `moelab prepare` with --min-validation-tokens {min}, or add documents to \
                     the domain",
                    p.domain, p.scored, p.available, p.documents
                ),
            })
            .collect()
    }
}

/// One evaluation of a model.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Optimizer steps the model had taken.
    pub step: u64,
    /// Loss per domain, in dataset domain order.
    pub domains: Vec<DomainEval>,
    /// Router choices on the validation tokens, per (layer, domain, expert).
    pub router_log: RouterLog,
    /// Scores of the `[[eval.tasks]]`, in config order.
    pub tasks: Vec<TaskScore>,
}

/// The evaluation file `eval/step-N.json`, as written and as read back (by the ablation's
/// comparison): losses plus each domain's expert distribution per layer.
#[derive(Debug, Serialize, Deserialize)]
pub struct EvalFile {
    /// Optimizer steps the model had taken.
    pub step: u64,
    /// Loss per domain, in dataset domain order.
    pub domains: Vec<DomainEval>,
    /// layer -> domain -> share of the domain's tokens routed to each expert (sums to top_k).
    #[serde(default)]
    pub expert_share: BTreeMap<usize, BTreeMap<String, Vec<f64>>>,
    /// task -> metric -> value (absent before task evaluation existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tasks: BTreeMap<String, BTreeMap<String, f64>>,
}

impl EvalFile {
    /// Reads `path`; the error names the file.
    pub fn read(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
        serde_json::from_str(&text)
            .map_err(|e| TrainError::Argument(format!("{}: {e}", path.display())))
    }

    /// Validation loss per domain that had tokens.
    pub fn losses(&self) -> BTreeMap<String, f64> {
        self.domains
            .iter()
            .filter(|d| d.loss.is_finite())
            .map(|d| (d.domain.clone(), d.loss))
            .collect()
    }

    /// Validation bits per byte per domain that had tokens (none in files written before it).
    pub fn bits_per_byte(&self) -> BTreeMap<String, f64> {
        self.domains
            .iter()
            .filter(|d| d.bpb.is_finite())
            .map(|d| (d.domain.clone(), d.bpb))
            .collect()
    }

    /// Task scores as `task/metric` -> value.
    pub fn scores(&self) -> BTreeMap<String, f64> {
        self.tasks
            .iter()
            .flat_map(|(task, metrics)| {
                metrics
                    .iter()
                    .map(move |(metric, value)| (format!("{task}/{metric}"), *value))
            })
            .collect()
    }
}

/// serde writes a NaN loss as null; it reads back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl EvalReport {
    /// Share of domain `d`'s tokens that layer `layer_idx` (index among MoE layers) routes to each
    /// expert; sums to top_k.
    pub fn expert_share(&self, layer_idx: usize, domain: usize) -> Vec<f64> {
        let r = &self.router_log;
        let tokens = r.tokens[domain].max(1) as f64;
        (0..r.n_experts)
            .map(|e| r.count(layer_idx, domain, e) as f64 / tokens)
            .collect()
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        let mut expert_share = BTreeMap::new();
        for (i, &layer) in self.router_log.layers.iter().enumerate() {
            let per_domain = self
                .domains
                .iter()
                .enumerate()
                .filter(|(_, d)| d.tokens > 0)
                .map(|(d, eval)| (eval.domain.clone(), self.expert_share(i, d)))
                .collect();
            expert_share.insert(layer, per_domain);
        }
        let json = EvalFile {
            step: self.step,
            domains: self.domains.clone(),
            expert_share,
            tasks: self
                .tasks
                .iter()
                .map(|t| {
                    let metrics = t.metrics().into_iter();
                    (
                        t.name.clone(),
                        metrics.map(|(k, v)| (k.to_string(), v)).collect(),
                    )
                })
                .collect(),
        };
        serde_json::to_string_pretty(&json).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// Writes the run folder's `eval/step-N.json` and the router log as
    /// `eval/step-N/chunk-N.safetensors` (the counts first: the JSON marks a complete pair).
    pub fn write(&self, run_dir: &RunDir) -> Result<PathBuf, TrainError> {
        let eval_dir = run_dir.eval();
        std::fs::create_dir_all(&eval_dir).map_err(TrainError::io(&eval_dir))?;
        write_chunk(&run_dir.eval_router_log(self.step), &self.router_log)?;
        let path = run_dir.eval_json(self.step);
        moelab_io::write_atomic(&path, self.to_json().as_bytes()).map_err(TrainError::io(&path))?;
        Ok(path)
    }

    /// A short table: loss per domain and each domain's top experts in the last MoE layer.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "eval at step {}\n{:<14} {:>9} {:>7} {:>9}  top experts (last MoE layer: share of tokens)\n",
            self.step, "domain", "loss", "bpb", "tokens"
        );
        let last = self.router_log.layers.len().checked_sub(1);
        for (d, eval) in self.domains.iter().enumerate() {
            let mut line = format!(
                "{:<14} {:>9.4} {:>7.4} {:>9}",
                eval.domain, eval.loss, eval.bpb, eval.tokens
            );
            if let (Some(layer), true) = (last, eval.tokens > 0) {
                let mut share: Vec<(usize, f64)> = self
                    .expert_share(layer, d)
                    .into_iter()
                    .enumerate()
                    .collect();
                share.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let top: Vec<String> = share
                    .iter()
                    .take(3)
                    .map(|(e, s)| format!("e{e}:{s:.2}"))
                    .collect();
                line += &format!("  {}", top.join(" "));
            }
            out += &line;
            out.push('\n');
        }
        for t in &self.tasks {
            let metrics: Vec<String> = t
                .metrics()
                .iter()
                .map(|(m, v)| format!("{m} {v:.4}"))
                .collect();
            out += &format!(
                "task {:<9} {}  ({} examples)\n",
                t.name,
                metrics.join("  "),
                t.examples
            );
        }
        out
    }
}

/// Scores `model` on every domain's validation stream (at most `data.validation_tokens` each).
/// The batches are dealt round-robin over the ranks of `comm` and the sums reduced, so every
/// rank returns the report one process would.
pub fn evaluate(
    model: &MoeTransformer,
    dataset: &Dataset,
    cfg: &Config,
    step: u64,
    device: &Device,
    comm: &dyn Collective,
) -> Result<EvalReport, TrainError> {
    let moe_layers: Vec<usize> = (0..cfg.model.n_layers)
        .filter(|&l| cfg.model.is_moe_layer(l))
        .collect();
    let domains = dataset.domains().to_vec();
    let mut accumulator = RouterLogger::new(
        moe_layers,
        domains.clone(),
        cfg.model.moe.n_experts,
        cfg.model.moe.top_k,
        device,
    )?;
    let seq_len = cfg.data.seq_len;
    let codec = TokenizerCodec::open(&dataset.tokenizer_path())?;
    let byte_lengths = codec.byte_lengths();
    let plan = dataset.validation_plan(seq_len, cfg.data.validation_tokens);
    let mut results = Vec::with_capacity(domains.len());
    for (d, name) in domains.iter().enumerate() {
        // A domain without one whole sequence was warned about at the start; it stays unmeasured.
        let batches = match plan.get(d).is_some_and(|p| p.scored > 0) {
            true => dataset.validation_batches(
                d,
                seq_len,
                cfg.data.validation_tokens,
                cfg.train.micro_batch,
            )?,
            false => Vec::new(),
        };
        let (mut loss_sum, mut tokens, mut bytes) = (0f64, 0u64, 0u64);
        let (rank, world) = (comm.rank(), comm.world_size());
        let rounds = batches.len().div_ceil(world);
        // Under expert parallelism every rank must run every round's forward pass (the
        // exchanges pair up across ranks): one without a batch of its own runs the first batch
        // again and discards it.
        let spare = model
            .experts_sharded()
            .then(|| batches.first().cloned())
            .flatten();
        let mut batches = batches.into_iter().skip(rank).step_by(world);
        for _ in 0..rounds {
            // Evaluation can be long; a stop request (on any rank) is honoured between batches.
            if crate::dist::any(comm, crate::interrupt::requested()) {
                return Err(TrainError::Interrupted);
            }
            let Some(batch) = batches.next() else {
                if let Some(batch) = &spare {
                    let shape = (batch.n_sequences, batch.seq_len);
                    let input = Tensor::from_slice(&batch.tokens, shape, device)?;
                    model.forward(&input, None, ForwardOptions::default())?;
                }
                continue;
            };
            let shape = (batch.n_sequences, batch.seq_len);
            let input = Tensor::from_slice(&batch.tokens, shape, device)?;
            let target = Tensor::from_slice(&batch.targets, shape, device)?;
            let out = model.forward(&input, Some(&target), ForwardOptions::default())?;
            if let Some(losses) = &out.token_losses {
                loss_sum += losses
                    .to_dtype(candle_core::DType::F64)?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
            tokens += (batch.n_sequences * batch.seq_len) as u64;
            bytes += target_bytes(&batch.targets, &byte_lengths);
            accumulator.record(step, &out.routing, &batch.domain_ids, batch.seq_len)?;
        }
        let mut sums = [loss_sum, tokens as f64, bytes as f64];
        comm.all_reduce_f64(&mut sums);
        let (tokens, bytes) = (sums[1].round() as u64, sums[2].round() as u64);
        results.push(DomainEval::from_sums(name, sums[0], tokens, bytes));
    }
    let tasks = if cfg.eval.tasks.is_empty() {
        Vec::new()
    } else {
        let scorer = ModelScorer {
            model,
            device,
            max_len: cfg.model.max_seq_len,
            eos_id: dataset.eos_id(),
        };
        load_tasks(&cfg.eval)?
            .iter()
            .map(|task| score_task(task, &codec, &scorer))
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok(EvalReport {
        step,
        domains: results,
        router_log: crate::router_logger::reduce(comm, accumulator.snapshot(step)?),
        tasks,
    })
}

/// Evaluates a checkpoint on its run's validation streams.
pub fn evaluate_checkpoint(dir: &Path) -> Result<EvalReport, TrainError> {
    evaluate_checkpoint_with(dir, &mut |_| {})
}

/// [`evaluate_checkpoint`], first telling `on_check` the validation tokens per domain (to show
/// them, and their warnings, before the evaluation runs).
pub fn evaluate_checkpoint_with(
    dir: &Path,
    on_check: &mut dyn FnMut(&ValidationCheck),
) -> Result<EvalReport, TrainError> {
    let device = Device::Cpu;
    let (cfg, model, ckpt) = load_model(dir, &device)?;
    let dataset = open_run_data(&cfg, dir)?;
    on_check(&ValidationCheck::new(&dataset, &cfg));
    evaluate(&model, &dataset, &cfg, ckpt.state.step, &device, &Single)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn domain_bits_per_byte_by_hand() {
        // Four target ids standing for 3 + 1 + 4 + 0 (EOS) bytes; 10 nats in all.
        let byte_lengths = [0u32, 1, 3, 4];
        let bytes = target_bytes(&[2, 1, 3, 0, 9], &byte_lengths);
        assert_eq!(bytes, 8, "an id outside the table counts none");
        let eval = DomainEval::from_sums("code", 10.0, 4, bytes);
        assert_eq!(eval.loss, 2.5);
        // 10 nats / ln 2 = 14.42695 bits over 8 bytes.
        assert!(
            (eval.bpb - 1.803_368_801_111_204).abs() < 1e-12,
            "{}",
            eval.bpb
        );
        let none = DomainEval::from_sums("empty", 0.0, 0, 0);
        assert!(none.loss.is_nan() && none.bpb.is_nan());

        // Written and read back; an eval file from before bpb existed reads it as NaN.
        let file = EvalFile {
            step: 3,
            domains: vec![eval.clone(), none],
            expert_share: BTreeMap::new(),
            tasks: BTreeMap::new(),
        };
        let back: EvalFile = serde_json::from_str(&serde_json::to_string(&file).unwrap()).unwrap();
        assert_eq!(back.domains[0], eval);
        assert!(back.domains[1].bpb.is_nan());
        let old: EvalFile = serde_json::from_str(
            r#"{"step": 1, "domains": [{"domain": "web", "loss": 2.0, "tokens": 128}]}"#,
        )
        .unwrap();
        assert!(old.domains[0].bpb.is_nan() && old.domains[0].bytes == 0);
    }

    fn plan(domain: &str, documents: u64, available: u64, scored: u64) -> ValidationPlan {
        ValidationPlan {
            domain: domain.to_string(),
            documents,
            available,
            scored,
            shortfall: (scored == 0)
                .then(|| format!("domain `{domain}` has no validation documents")),
        }
    }

    #[test]
    fn domains_below_the_threshold_are_warned_about_with_the_cause() {
        let check = ValidationCheck {
            domains: vec![
                plan("web", 400, 90_000, 16_384),
                plan("notes", 3, 300, 256),
                plan("empty", 0, 0, 0),
            ],
            cap: 16_384,
            seq_len: 128,
        };
        assert_eq!(
            check.line(),
            "validation tokens per domain (data.validation_tokens = 16384): web 16384, notes 256, empty 0"
        );
        let warnings = check.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        for part in [
            "`notes`",
            "256 tokens",
            "300 validation tokens in 3 documents",
            "fewer than 16384",
            "--min-validation-tokens",
        ] {
            assert!(warnings[0].contains(part), "{part}: {}", warnings[0]);
        }
        assert!(
            warnings[1].contains("`empty`") && warnings[1].contains("not measured"),
            "{}",
            warnings[1]
        );
        // A cap below the threshold is named as the cause, with the key to raise.
        let capped = ValidationCheck {
            domains: vec![plan("web", 400, 90_000, 4096)],
            cap: 4096,
            seq_len: 128,
        };
        let w = capped.warnings();
        assert!(
            w[0].contains("data.validation_tokens = 4096 caps it"),
            "{w:?}"
        );
    }
}
