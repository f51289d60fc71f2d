//! What a trained swarm measured: every finished run's realised mixture and its measures.
//!
//! An ablation's output folder holds one run folder per variant (`OUT/<name>`, or
//! `OUT/<name>/seed-<s>` with seeds). A run counts once its final checkpoint exists; its measures
//! come from the final evaluation (evaluated first when the files are missing, as the ablation
//! comparison does). The mixture used is the *realised* one: the domain shares the run's stream
//! really drew over its training sequences, not the shares written in the config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moelab_data::{Dataset, MixtureStream};
use serde::Serialize;

use crate::ablate::{final_eval, COMPARISON_DIR};
use crate::run::RunDir;
use crate::{checkpoint, Config, TrainError};

/// Folder of an ablation's output that holds the mixture-search report.
pub const MIX_DIR: &str = "mix";
/// Prefix of per-domain bits-per-byte targets.
pub const BPB_PREFIX: &str = "bpb/";
/// Prefix of task bits-per-byte targets.
pub const TASK_PREFIX: &str = "task/";

/// One finished run of the swarm.
#[derive(Debug, Clone, Serialize)]
pub struct RunMeasures {
    /// The run folder relative to the ablation folder (`mix-003`, `base/seed-2`).
    pub label: String,
    /// Variant name (the label without the seed folder).
    pub variant: String,
    /// `run.seed`.
    pub seed: u64,
    /// Realised share of each domain of [`SwarmRuns::domains`] over the training sequences.
    pub mixture: Vec<f64>,
    /// Target name -> measured value: `<domain>` (validation loss, nats per token),
    /// `bpb/<domain>` (bits per byte, when the evaluation has it), `task/<task>` (bits per byte).
    pub measures: BTreeMap<String, f64>,
}

/// The finished runs of an ablation folder.
#[derive(Debug, Clone, Serialize)]
pub struct SwarmRuns {
    /// The ablation output folder.
    pub dir: PathBuf,
    /// Domains that any run drew from, in dataset order.
    pub domains: Vec<String>,
    /// Finished runs, in folder order.
    pub runs: Vec<RunMeasures>,
    /// Runs left out and why.
    pub notes: Vec<String>,
}

impl SwarmRuns {
    /// Every target measured by at least one run, in name order.
    pub fn targets(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .runs
            .iter()
            .flat_map(|r| r.measures.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Run folders under `dir` (depth 1 and 2), sorted; the comparison, report and hidden folders are
/// not runs.
fn run_folders(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let list = |d: &Path| -> Result<Vec<PathBuf>, TrainError> {
        let entries = std::fs::read_dir(d).map_err(TrainError::io(d))?;
        let mut out: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .filter(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    !n.starts_with('.') && n != COMPARISON_DIR && n != MIX_DIR
                })
            })
            .collect();
        out.sort();
        Ok(out)
    };
    let mut runs = Vec::new();
    for child in list(dir)? {
        if RunDir::new(&child).config().is_file() {
            runs.push(child);
            continue;
        }
        for grandchild in list(&child)? {
            if RunDir::new(&grandchild).config().is_file() {
                runs.push(grandchild);
            }
        }
    }
    Ok(runs)
}

/// What a finished run measured at its final evaluation: per-domain loss and bits per byte,
/// and every task's bits per byte (finite values only).
fn final_measures(run: &RunDir, step: u64) -> Result<BTreeMap<String, f64>, TrainError> {
    let (losses, _, scores, _) = final_eval(run.root(), step)?;
    let mut measures: BTreeMap<String, f64> = losses.into_iter().collect();
    measures.extend(domain_bpb(&run.eval_json(step)));
    for (key, value) in scores {
        if let Some(task) = key.strip_suffix("/bpb") {
            measures.insert(format!("{TASK_PREFIX}{task}"), value);
        }
    }
    measures.retain(|_, v| v.is_finite());
    Ok(measures)
}

/// Reads every finished run under `dir`. Unfinished runs are noted, not errors; an ablation folder
/// with no finished run is an error that says how to train it.
pub fn read_runs(dir: &Path) -> Result<SwarmRuns, TrainError> {
    if !dir.is_dir() {
        return Err(TrainError::Argument(format!(
            "{} is not a folder; give the output folder of `moelab ablate SWARM.toml` (its --out, \
             or the file's out_dir)",
            dir.display()
        )));
    }
    let mut datasets: BTreeMap<PathBuf, Arc<Dataset>> = BTreeMap::new();
    let mut found: Vec<(RunMeasures, BTreeMap<String, f64>)> = Vec::new();
    let mut notes = Vec::new();
    let mut order: Vec<String> = Vec::new();
    for run_dir in run_folders(dir)? {
        let label = run_dir
            .strip_prefix(dir)
            .unwrap_or(&run_dir)
            .to_string_lossy()
            .replace('\\', "/");
        let run = RunDir::new(&run_dir);
        let cfg = Config::load(&run.config(), &[])?;
        let last = checkpoint::list(&run.checkpoints())?.pop();
        let step = match last {
            Some((step, _)) if step >= cfg.train.steps => step,
            _ => {
                notes.push(format!(
                    "{label}: not finished (no checkpoint at step {}); left out",
                    cfg.train.steps
                ));
                continue;
            }
        };
        let measures = final_measures(&run, step)?;
        let dataset = match datasets.get(&cfg.data.dataset) {
            Some(d) => d.clone(),
            None => {
                let d = Arc::new(Dataset::open(&cfg.data.dataset)?);
                datasets.insert(cfg.data.dataset.clone(), d.clone());
                d
            }
        };
        for d in dataset.domains() {
            if !order.contains(d) {
                order.push(d.clone());
            }
        }
        let realised = realised_mixture(dataset, &cfg)?;
        let variant = label.split('/').next().unwrap_or(&label).to_string();
        found.push((
            RunMeasures {
                label,
                variant,
                seed: cfg.run.seed,
                mixture: Vec::new(),
                measures,
            },
            realised,
        ));
    }
    // Domains no run drew from carry no information about the response: leave them out.
    let domains: Vec<String> = order
        .into_iter()
        .filter(|d| {
            found
                .iter()
                .any(|(_, m)| m.get(d).is_some_and(|&w| w > 0.0))
        })
        .collect();
    let runs: Vec<RunMeasures> = found
        .into_iter()
        .map(|(mut r, m)| {
            r.mixture = domains
                .iter()
                .map(|d| m.get(d).copied().unwrap_or(0.0))
                .collect();
            r
        })
        .collect();
    if runs.is_empty() {
        return Err(TrainError::Argument(format!(
            "{} holds no finished run{}; train the swarm first: `moelab ablate SWARM.toml --out {}`",
            dir.display(),
            if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join("; "))
            },
            dir.display()
        )));
    }
    Ok(SwarmRuns {
        dir: dir.to_path_buf(),
        domains,
        runs,
        notes,
    })
}

/// Realised share per domain over the run's training sequences.
fn realised_mixture(
    dataset: Arc<Dataset>,
    cfg: &Config,
) -> Result<BTreeMap<String, f64>, TrainError> {
    let stream = MixtureStream::new(dataset, &cfg.data, cfg.run.seed)?;
    let report = stream.report(cfg.train.steps * cfg.global_sequences() as u64);
    Ok(report
        .rows
        .into_iter()
        .filter(|r| r.source.is_none())
        .map(|r| (r.domain, r.realised))
        .collect())
}

/// `bpb/<domain>` for each domain of an evaluation JSON that carries a `bpb` field (evaluations
/// that do not simply give none).
fn domain_bpb(eval_json: &Path) -> Vec<(String, f64)> {
    let Ok(text) = std::fs::read_to_string(eval_json) else {
        return Vec::new();
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    let Some(domains) = value.get("domains").and_then(|d| d.as_array()) else {
        return Vec::new();
    };
    domains
        .iter()
        .filter_map(|d| {
            let name = d.get("domain")?.as_str()?;
            let bpb = d.get("bpb")?.as_f64()?;
            Some((format!("{BPB_PREFIX}{name}"), bpb))
        })
        .collect()
}
