//! The metrics logger: it decides when a step is logged, measures throughput over the window
//! since the previous line, and writes metrics.jsonl (one JSON object per line: logged steps,
//! skipped steps, evaluations), so that one file loads in pandas. With `log.tensorboard` it
//! also writes the same scalars as TensorBoard event files.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::step::StepOutcome;
use super::tensorboard::EventWriter;
use crate::checkpoint::LossWindow;
use crate::config::Config;
use crate::eval::EvalReport;
use crate::run::RunDir;
use crate::TrainError;

/// Dense bf16 peak of the H100/H200 class, the denominator of MFU on CUDA.
pub(crate) const GPU_PEAK_FLOPS: f64 = 989e12;

/// One logged step of metrics.jsonl.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    /// Optimizer steps completed.
    pub step: u64,
    /// Tokens consumed.
    pub tokens: u64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Training objective (LM + weighted aux + z), nats per token: the mean over the applied
    /// steps since the previous line (the log interval), as torchtitan logs it.
    pub loss: f64,
    /// LM cross-entropy, nats per token: the mean over the same steps as `loss`.
    pub lm_loss: f64,
    /// Training objective of this step alone.
    pub step_loss: f64,
    /// LM cross-entropy of this step alone.
    pub step_lm_loss: f64,
    /// LM cross-entropy per domain present in this step's batch.
    pub domain_loss: BTreeMap<String, f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Load-balancing loss per MoE layer.
    pub aux_loss: Vec<f64>,
    /// Router z-loss per MoE layer.
    pub z_loss: Vec<f64>,
    /// max / mean tokens per expert, per MoE layer.
    pub load_imbalance: Vec<f64>,
    /// Throughput since the previous line.
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation (CUDA only: against 989 TFLOP/s).
    pub mfu: Option<f64>,
    /// Wall-clock time of the line (UTC, RFC 3339).
    pub time: String,
    /// Seconds since this process started training.
    pub elapsed_s: f64,
    /// Under expert parallelism, the bytes each rank sent to other ranks in the logged step's
    /// all-to-alls (token rows forward and backward as they go on the wire, f32 for bf16/f16,
    /// and the counts), by rank; absent without expert parallelism.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ep_all_to_all_bytes: Option<Vec<u64>>,
}

/// Writes metrics.jsonl (and TensorBoard events) and keeps the throughput window.
pub(crate) struct MetricsLogger {
    /// None on ranks other than 0, which log nothing but keep the throughput window.
    file: Option<std::fs::File>,
    path: PathBuf,
    /// The event file, when `log.tensorboard` is on.
    tensorboard: Option<EventWriter>,
    /// Model layer index of each MoE layer, naming the per-layer router scalars the way the
    /// router logs and traces do (dense layers have no router).
    moe_layers: Vec<usize>,
    interval: u64,
    last_step: u64,
    flops_per_token: Option<f64>,
    started: Instant,
    window_start: Instant,
    window_tokens: u64,
    /// Tokens and seconds of all logged windows, for the run's mean throughput.
    total: (u64, f64),
    /// The current step's expert-parallel all-to-all bytes by rank, for its line.
    ep_all_to_all_bytes: Option<Vec<u64>>,
}

impl MetricsLogger {
    /// Opens the run's metrics.jsonl for a run resuming after `resume_step` steps: lines past
    /// that step are dropped (they will be produced again). With `log.tensorboard`, a new event
    /// file is started (old ones are left as they are; see the tensorboard module).
    /// `flops_per_token` is given on CUDA, for MFU.
    pub(crate) fn open(
        run_dir: &RunDir,
        cfg: &Config,
        resume_step: u64,
        flops_per_token: Option<f64>,
    ) -> Result<Self, TrainError> {
        let path = &run_dir.metrics();
        let kept: String = match std::fs::read_to_string(path) {
            Ok(text) if resume_step > 0 => text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= resume_step)
                })
                .map(|line| format!("{line}\n"))
                .collect(),
            _ => String::new(),
        };
        moelab_io::write_atomic(path, kept.as_bytes()).map_err(TrainError::io(path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(TrainError::io(path))?;
        let tensorboard = if cfg.log.tensorboard {
            Some(EventWriter::create(&run_dir.tensorboard(), resume_step)?)
        } else {
            None
        };
        let mut logger = Self::silent(cfg, flops_per_token);
        logger.file = Some(file);
        logger.path = path.to_path_buf();
        logger.tensorboard = tensorboard;
        Ok(logger)
    }

    /// A logger that writes nothing (ranks other than 0 of a distributed run): it returns the
    /// same lines as rank 0's and keeps the throughput window.
    pub(crate) fn silent(cfg: &Config, flops_per_token: Option<f64>) -> Self {
        let moe_layers = (0..cfg.model.n_layers)
            .filter(|&l| cfg.model.is_moe_layer(l))
            .collect();
        let now = Instant::now();
        Self {
            file: None,
            path: PathBuf::new(),
            tensorboard: None,
            moe_layers,
            interval: cfg.log.interval.max(1),
            last_step: cfg.train.steps,
            flops_per_token,
            started: now,
            window_start: now,
            window_tokens: 0,
            total: (0, 0.0),
            ep_all_to_all_bytes: None,
        }
    }

    /// Sets the expert-parallel all-to-all bytes by rank of the step about to be recorded.
    pub(crate) fn set_ep_all_to_all_bytes(&mut self, by_rank: Vec<u64>) {
        self.ep_all_to_all_bytes = Some(by_rank);
    }

    /// Records a finished, applied step of `tokens` tokens, adding its losses to `window` (kept
    /// in the train state, so that it survives a resume); returns its line when the step is due
    /// for logging (every `log.interval` steps and the last), after writing it.
    pub(crate) fn step(
        &mut self,
        step: u64,
        total_tokens: u64,
        tokens: u64,
        lr: f64,
        outcome: &StepOutcome,
        window: &mut LossWindow,
    ) -> Result<Option<StepMetrics>, TrainError> {
        self.window_tokens += tokens;
        window.add(outcome.loss, outcome.lm_loss);
        if !step.is_multiple_of(self.interval) && step != self.last_step {
            return Ok(None);
        }
        let (loss, lm_loss) = window
            .take_means()
            .unwrap_or((outcome.loss, outcome.lm_loss));
        let seconds = self.window_start.elapsed().as_secs_f64().max(1e-9);
        let tokens_per_s = self.window_tokens as f64 / seconds;
        self.total.0 += self.window_tokens;
        self.total.1 += seconds;
        let line = StepMetrics {
            step,
            tokens: total_tokens,
            lr,
            loss,
            lm_loss,
            step_loss: outcome.loss,
            step_lm_loss: outcome.lm_loss,
            domain_loss: outcome.domain_loss.clone(),
            grad_norm: outcome.grad_norm,
            aux_loss: outcome.aux_loss.clone(),
            z_loss: outcome.z_loss.clone(),
            load_imbalance: outcome.load_imbalance(),
            tokens_per_s,
            mfu: self
                .flops_per_token
                .map(|f| f * tokens_per_s / GPU_PEAK_FLOPS),
            time: now_rfc3339(),
            elapsed_s: self.elapsed_s(),
            ep_all_to_all_bytes: self.ep_all_to_all_bytes.take(),
        };
        self.write(&line)?;
        self.write_step_scalars(&line)?;
        self.window_start = Instant::now();
        self.window_tokens = 0;
        Ok(Some(line))
    }

    /// Records a step whose update was skipped (non-finite loss or gradient).
    pub(crate) fn skipped(&mut self, step: u64, reason: &str) -> Result<(), TrainError> {
        let line = serde_json::json!({
            "step": step,
            "skipped": true,
            "reason": reason,
            "time": now_rfc3339(),
            "elapsed_s": self.elapsed_s(),
        });
        self.write(&line)
    }

    /// Records an evaluation: `{"step", "eval": {domain: loss}, "task": {"name/metric": value}}`
    /// (`task` only with `[[eval.tasks]]`).
    pub(crate) fn eval(&mut self, report: &EvalReport) -> Result<(), TrainError> {
        let losses: BTreeMap<&str, f64> = report
            .domains
            .iter()
            .filter(|d| d.tokens > 0)
            .map(|d| (d.domain.as_str(), d.loss))
            .collect();
        let tasks: BTreeMap<String, f64> = report
            .tasks
            .iter()
            .flat_map(|t| {
                t.metrics()
                    .into_iter()
                    .map(|(m, v)| (format!("{}/{m}", t.name), v))
            })
            .collect();
        let mut line = serde_json::json!({
            "step": report.step,
            "eval": losses,
            "time": now_rfc3339(),
            "elapsed_s": self.elapsed_s(),
        });
        if !tasks.is_empty() {
            line["task"] = serde_json::json!(tasks);
        }
        self.write(&line)?;
        if let Some(events) = &mut self.tensorboard {
            for (domain, loss) in &losses {
                events.scalar(&format!("eval/loss/{domain}"), report.step, *loss)?;
            }
            for (metric, value) in &tasks {
                events.scalar(&format!("eval/task/{metric}"), report.step, *value)?;
            }
            events.flush()?;
        }
        Ok(())
    }

    /// The scalars of a logged step as TensorBoard events, flushed together.
    fn write_step_scalars(&mut self, line: &StepMetrics) -> Result<(), TrainError> {
        let Some(events) = &mut self.tensorboard else {
            return Ok(());
        };
        let step = line.step;
        for (tag, value) in [
            ("train/loss", Some(line.loss)),
            ("train/lm_loss", Some(line.lm_loss)),
            ("train/step_loss", Some(line.step_loss)),
            ("train/lr", Some(line.lr)),
            ("train/grad_norm", Some(line.grad_norm)),
            ("train/tokens_per_s", Some(line.tokens_per_s)),
            ("train/mfu", line.mfu),
        ] {
            if let Some(value) = value {
                events.scalar(tag, step, value)?;
            }
        }
        for (domain, loss) in &line.domain_loss {
            events.scalar(&format!("train/domain_loss/{domain}"), step, *loss)?;
        }
        for (name, per_layer) in [
            ("aux_loss", &line.aux_loss),
            ("z_loss", &line.z_loss),
            ("load_imbalance", &line.load_imbalance),
        ] {
            for (ordinal, value) in per_layer.iter().enumerate() {
                let layer = self.moe_layers.get(ordinal).copied().unwrap_or(ordinal);
                events.scalar(&format!("router/{name}/layer_{layer}"), step, *value)?;
            }
        }
        events.flush()
    }

    /// Mean tokens/s over the logged windows of this process.
    pub(crate) fn mean_tokens_per_s(&self) -> f64 {
        self.total.0 as f64 / self.total.1.max(1e-9)
    }

    /// Seconds since this process started training.
    pub(crate) fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn write<T: Serialize>(&mut self, value: &T) -> Result<(), TrainError> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let line =
            serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        writeln!(file, "{line}").map_err(TrainError::io(&self.path))
    }
}

/// The current UTC time as RFC 3339 with milliseconds, e.g. `2026-12-01T08:36:30.123Z`.
fn now_rfc3339() -> String {
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(since_epoch.as_millis() as i64)
}

/// RFC 3339 of milliseconds since the Unix epoch (civil-from-days, proleptic Gregorian).
fn rfc3339(millis: i64) -> String {
    let days = millis.div_euclid(86_400_000);
    let ms_of_day = millis.rem_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, ms) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::trainer::tensorboard::tests::read_events;
    use moelab_trace::router_log::RouterLog;

    fn scratch(name: &str) -> RunDir {
        let root =
            std::env::temp_dir().join(format!("moelab-metrics-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        RunDir::new(root)
    }

    /// Two layers, the first dense, so the one MoE layer is layer 1; every step is logged.
    fn config(tensorboard: bool) -> Config {
        let mut cfg: Config = toml::from_str(crate::config::tests::TEXT).unwrap();
        cfg.model.moe.dense_layers = 1;
        cfg.log.interval = 1;
        cfg.log.tensorboard = tensorboard;
        cfg
    }

    fn domain_eval(domain: &str, loss: f64, tokens: u64) -> crate::eval::DomainEval {
        crate::eval::DomainEval::from_sums(domain, loss * tokens as f64, tokens, 4 * tokens)
    }

    fn outcome() -> StepOutcome {
        StepOutcome {
            loss: 2.5,
            lm_loss: 2.25,
            domain_loss: [("math".to_string(), 3.0), ("web".to_string(), 2.0)].into(),
            aux_loss: vec![0.5],
            z_loss: vec![0.125],
            tokens_per_expert: vec![vec![3, 1, 0, 0]],
            grad_norm: 1.5,
            applied: true,
        }
    }

    #[test]
    fn tensorboard_off_creates_no_folder() {
        let run_dir = scratch("off");
        let mut logger = MetricsLogger::open(&run_dir, &config(false), 0, None).unwrap();
        assert!(logger
            .step(1, 64, 64, 1e-3, &outcome(), &mut LossWindow::default())
            .unwrap()
            .is_some());
        assert!(std::fs::read_to_string(run_dir.metrics())
            .unwrap()
            .contains("\"step\":1"));
        assert!(!run_dir.tensorboard().exists());
        std::fs::remove_dir_all(run_dir.root()).unwrap();
    }

    #[test]
    fn tensorboard_on_writes_the_logged_scalars() {
        let run_dir = scratch("on");
        let mut logger = MetricsLogger::open(&run_dir, &config(true), 0, None).unwrap();
        logger
            .step(1, 64, 64, 1e-3, &outcome(), &mut LossWindow::default())
            .unwrap();
        let report = EvalReport {
            step: 1,
            domains: vec![
                domain_eval("web", 2.75, 100),
                // Domains without validation tokens have no loss, as in metrics.jsonl.
                domain_eval("math", 0.0, 0),
            ],
            router_log: RouterLog::new(vec![1], vec!["web".into(), "math".into()], 4, 2),
            tasks: vec![crate::tasks::TaskScore {
                name: "arith".into(),
                examples: 2,
                bpb: 1.5,
                accuracy: None,
                exact_match: Some(0.5),
            }],
        };
        logger.eval(&report).unwrap();
        let jsonl = std::fs::read_to_string(run_dir.metrics()).unwrap();
        assert!(
            jsonl.contains(r#""task":{"arith/bpb":1.5,"arith/exact_match":0.5}"#),
            "{jsonl}"
        );

        let files: Vec<_> = std::fs::read_dir(run_dir.tensorboard())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        let events = read_events(&files[0]);
        let scalars: Vec<(u64, String, f32)> = events[1..]
            .iter()
            .map(|e| (e.step, e.values[0].0.clone(), e.values[0].1))
            .collect();
        let tags: Vec<&str> = scalars.iter().map(|(_, tag, _)| tag.as_str()).collect();
        assert_eq!(
            tags,
            [
                "train/loss",
                "train/lm_loss",
                "train/step_loss",
                "train/lr",
                "train/grad_norm",
                "train/tokens_per_s",
                "train/domain_loss/math",
                "train/domain_loss/web",
                "router/aux_loss/layer_1",
                "router/z_loss/layer_1",
                "router/load_imbalance/layer_1",
                "eval/loss/web",
                "eval/task/arith/bpb",
                "eval/task/arith/exact_match",
            ]
        );
        let value = |tag: &str| scalars.iter().find(|(_, t, _)| t == tag).unwrap().2;
        assert_eq!(value("train/loss"), 2.5);
        assert_eq!(value("train/lr"), 1e-3);
        assert_eq!(value("train/domain_loss/math"), 3.0);
        assert_eq!(value("router/z_loss/layer_1"), 0.125);
        // max 3 over a mean of 1 token per expert.
        assert_eq!(value("router/load_imbalance/layer_1"), 3.0);
        assert_eq!(value("eval/loss/web"), 2.75);
        assert!(scalars.iter().all(|(step, _, _)| *step == 1));
        std::fs::remove_dir_all(run_dir.root()).unwrap();
    }

    fn outcome_with(loss: f64, lm_loss: f64) -> StepOutcome {
        StepOutcome {
            loss,
            lm_loss,
            ..outcome()
        }
    }

    #[test]
    fn loss_is_the_interval_mean_and_the_window_survives_a_resume() {
        let run_dir = scratch("mean");
        let mut cfg = config(false);
        cfg.log.interval = 3;
        cfg.train.steps = 6;
        let mut logger = MetricsLogger::open(&run_dir, &cfg, 0, None).unwrap();
        let mut window = LossWindow::default();
        for (step, loss) in [(1, 1.0), (2, 2.0)] {
            let line = logger.step(
                step,
                0,
                64,
                1e-3,
                &outcome_with(loss, loss - 0.5),
                &mut window,
            );
            assert!(line.unwrap().is_none());
        }
        let line = logger
            .step(3, 0, 64, 1e-3, &outcome_with(6.0, 5.5), &mut window)
            .unwrap()
            .unwrap();
        assert_eq!((line.loss, line.lm_loss), (3.0, 2.5));
        assert_eq!((line.step_loss, line.step_lm_loss), (6.0, 5.5));
        assert_eq!(window, LossWindow::default(), "a line empties the window");

        // Steps 4 and 5, then a checkpoint: the window travels in state.json to a new process.
        for (step, loss) in [(4, 0.1), (5, 0.2)] {
            let line = logger.step(step, 0, 64, 1e-3, &outcome_with(loss, loss), &mut window);
            assert!(line.unwrap().is_none());
        }
        let json = serde_json::to_string(&window).unwrap();
        let mut resumed: LossWindow = serde_json::from_str(&json).unwrap();
        assert_eq!(resumed, window);
        let mut logger = MetricsLogger::open(&run_dir, &cfg, 5, None).unwrap();
        let line = logger
            .step(6, 0, 64, 1e-3, &outcome_with(0.3, 0.3), &mut resumed)
            .unwrap()
            .unwrap();
        assert_eq!(line.loss, (0.1 + 0.2 + 0.3) / 3.0);
        assert_eq!(line.step_loss, 0.3);
        let text = std::fs::read_to_string(run_dir.metrics()).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["loss"].as_f64(), Some(line.loss));
        assert_eq!(last["step_loss"].as_f64(), Some(0.3));
        assert_eq!(last["step_lm_loss"].as_f64(), Some(0.3));
        std::fs::remove_dir_all(run_dir.root()).unwrap();
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        // 2026-12-01T08:36:30.5Z and a leap day.
        assert_eq!(rfc3339(1_796_114_190_500), "2026-12-01T08:36:30.500Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
