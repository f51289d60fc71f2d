//! The training run, top to bottom: set up the run folder, data, model and optimizer (fresh or
//! from a checkpoint), then step: forward/backward over micro-batches, clip, AdamW, expert-bias
//! update, metrics, router log, evaluation, checkpoints.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use moelab_data::{Batch, Dataset, MixtureStream, Prefetcher};
use moelab_model::{ForwardOptions, ModelInfo, MoeTransformer};
use serde::Serialize;

use crate::checkpoint::{self, TrainState};
use crate::config::DeviceKind;
use crate::eval::{evaluate, EvalReport};
use crate::optim::{clip_scale, AdamW, AdamWParams};
use crate::router_log::RouterAccumulator;
use crate::schedule::Schedule;
use crate::{Config, TrainError};

/// Dense bf16 peak of the H100/H200 class, the denominator of MFU on CUDA.
pub(crate) const GPU_PEAK_FLOPS: f64 = 989e12;

/// Where to resume from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest complete checkpoint of the run folder, or a fresh start if there is none.
    Auto,
    /// This checkpoint folder.
    Path(PathBuf),
}

/// How to run, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run folder; default `run.out_dir/run.name`.
    pub run_dir: Option<PathBuf>,
    /// Resume instead of starting fresh.
    pub resume: Option<Resume>,
    /// Accept a changed `[data.mixture]` on resume (appended as a new data stage).
    pub allow_mixture_change: bool,
}

/// One metrics.jsonl line.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    /// Optimizer steps completed.
    pub step: u64,
    /// Tokens consumed.
    pub tokens: u64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Training objective of this step (LM + weighted aux + z).
    pub loss: f64,
    /// LM cross-entropy of this step.
    pub lm_loss: f64,
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
}

/// What the trainer reports to its caller as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// The run is set up.
    Started {
        /// Run folder.
        run_dir: PathBuf,
        /// First step to run.
        start_step: u64,
        /// Last step.
        total_steps: u64,
        /// Checkpoint resumed from.
        resumed_from: Option<PathBuf>,
    },
    /// A logged step.
    Step(StepMetrics),
    /// A step whose loss or gradient was not finite; its update was skipped.
    Skipped {
        /// The step.
        step: u64,
        /// What was not finite.
        reason: String,
    },
    /// An evaluation finished.
    Eval(EvalReport),
    /// A checkpoint was written.
    Checkpoint(PathBuf),
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Run folder.
    pub run_dir: PathBuf,
    /// Steps completed.
    pub steps: u64,
    /// The last evaluation (None when stopped by a signal).
    pub final_eval: Option<EvalReport>,
    /// True when SIGINT/SIGTERM stopped the run (after saving a checkpoint).
    pub interrupted: bool,
}

/// Per-step sums over the micro-batches.
struct StepOutcome {
    grads: HashMap<String, Tensor>,
    loss: f64,
    lm_loss: f64,
    domain_loss: BTreeMap<String, f64>,
    aux_loss: Vec<f64>,
    z_loss: Vec<f64>,
    tokens_per_expert: Vec<Vec<usize>>,
}

/// Runs (or resumes) training as configured.
pub fn train(
    cfg: Config,
    options: RunOptions,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Summary, TrainError> {
    let run_dir = options
        .run_dir
        .clone()
        .unwrap_or_else(|| cfg.run.out_dir.join(&cfg.run.name));
    let checkpoints_dir = run_dir.join("checkpoints");
    let resume_from = match &options.resume {
        None => None,
        Some(Resume::Auto) => checkpoint::list(&checkpoints_dir)?
            .pop()
            .map(|(_, path)| path),
        Some(Resume::Path(path)) => Some(path.clone()),
    };
    prepare_run_dir(&run_dir, &cfg, options.resume.is_some())?;
    checkpoint::remove_partial(&checkpoints_dir)?;
    set_threads(cfg.run.threads);
    let device = open_device(cfg.run.device)?;

    let dataset = Arc::new(moelab_data::ensure_prepared(&cfg.data)?);
    if dataset.vocab_size() > cfg.model.vocab_size {
        return Err(TrainError::Config {
            path: run_dir.join("config.toml"),
            message: format!(
                "invalid config key `model.vocab_size`: {} is smaller than the tokenizer's vocabulary ({})",
                cfg.model.vocab_size,
                dataset.vocab_size()
            ),
        });
    }
    let (model, varmap) = MoeTransformer::init(&cfg.model, cfg.run.seed, DType::F32, &device)?;
    let model = model.with_compute_dtype(cfg.train.precision.compute_dtype());
    let params = named_params(&varmap)?;
    let mut optimizer = new_optimizer(&params, &cfg)?;
    let global_sequences = cfg.global_sequences();
    let (stream, mut state) = match &resume_from {
        Some(dir) => {
            let ckpt = checkpoint::load(dir, &device)?;
            restore_model(&model, &params, &ckpt.model, dir)?;
            optimizer
                .load_state(ckpt.state.optimizer_step, &ckpt.optimizer)
                .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.display())))?;
            if ckpt.state.stream.sequences_consumed != ckpt.state.step * global_sequences as u64 {
                return Err(TrainError::Checkpoint(format!(
                    "{}: the checkpoint consumed {} sequences in {} steps, which does not match {} sequences per step; keep train.global_batch_tokens as it was",
                    dir.display(),
                    ckpt.state.stream.sequences_consumed,
                    ckpt.state.step,
                    global_sequences
                )));
            }
            let stream = MixtureStream::resume(
                dataset.clone(),
                &cfg.data,
                cfg.run.seed,
                &ckpt.state.stream,
                options.allow_mixture_change,
            )?;
            (stream, ckpt.state)
        }
        None => {
            let stream = MixtureStream::new(dataset.clone(), &cfg.data, cfg.run.seed)?;
            let state = TrainState::fresh(&stream, cfg.run.seed);
            (stream, state)
        }
    };
    let stream = Arc::new(stream);
    // Whatever a killed run wrote past its checkpoint is produced again, identically.
    let mut metrics = MetricsFile::open(&run_dir.join("metrics.jsonl"), state.step)?;
    let router_dir = run_dir.join("router");
    if router_dir.exists() {
        moelab_trace::router_log::remove_after(&router_dir, state.step)?;
    }
    let moe_layers: Vec<usize> = (0..cfg.model.n_layers)
        .filter(|&l| cfg.model.is_moe_layer(l))
        .collect();
    let mut router_log = RouterAccumulator::new(
        moe_layers,
        dataset.domains().to_vec(),
        cfg.model.moe.n_experts,
        cfg.model.moe.top_k,
        &device,
    )?;
    let schedule = Schedule {
        kind: cfg.train.schedule,
        lr: cfg.train.lr,
        min_lr_ratio: cfg.train.min_lr_ratio,
        warmup_steps: cfg.train.warmup_steps,
        total_steps: cfg.train.steps,
        decay_fraction: cfg.train.decay_fraction,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).map_err(|source| TrainError::Io {
            path: run_dir.clone(),
            source,
        })?;
    }
    on_event(&Event::Started {
        run_dir: run_dir.clone(),
        start_step: state.step,
        total_steps: cfg.train.steps,
        resumed_from: resume_from.clone(),
    });

    let flops_per_token = ModelInfo::new(&cfg.model, cfg.data.seq_len).train_flops_per_token as f64;
    let tokens_per_step = (global_sequences * cfg.data.seq_len) as u64;
    let config_toml = cfg.to_toml();
    let save = |state: &TrainState,
                optimizer: &AdamW,
                stream: &MixtureStream|
     -> Result<PathBuf, TrainError> {
        let model_tensors = model_tensors(&params, &model);
        let (_, moments) = optimizer.state()?;
        let mut state = state.clone();
        state.optimizer_step = optimizer.step_count();
        state.stream = stream.state(state.step * global_sequences as u64);
        let dir = checkpoint::save(
            &checkpoints_dir,
            &model_tensors,
            &moments.into_iter().collect(),
            &state,
            &config_toml,
        )?;
        checkpoint::prune(
            &checkpoints_dir,
            cfg.checkpoint.keep_last,
            &cfg.checkpoint.milestones,
        )?;
        Ok(dir)
    };

    let mut window = (Instant::now(), 0u64);
    let batches = Prefetcher::new(stream.clone(), state.step, global_sequences, 0, 1, 2);
    for batch in batches {
        if state.step >= cfg.train.steps {
            break;
        }
        let step = state.step;
        let lr = schedule.lr_at(step);
        let outcome = train_step(&model, &params, &batch?, &cfg, step, &mut router_log)?;
        let grad_norm = optimizer.grad_norm(&outcome.grads)?;
        let poisoned = cfg.train.debug_nan_steps.contains(&(step + 1));
        let loss = if poisoned { f64::NAN } else { outcome.loss };
        state.step += 1;
        state.tokens += tokens_per_step;
        window.1 += tokens_per_step;

        let finite = loss.is_finite() && grad_norm.is_finite();
        if !finite {
            state.consecutive_nonfinite += 1;
            let reason = format!("loss {loss}, grad norm {grad_norm}");
            metrics.write(
                &serde_json::json!({ "step": state.step, "skipped": true, "reason": reason }),
            )?;
            on_event(&Event::Skipped {
                step: state.step,
                reason,
            });
            if state.consecutive_nonfinite >= cfg.train.max_nonfinite_steps {
                let last = checkpoint::list(&checkpoints_dir)?
                    .pop()
                    .map_or("none was written yet".to_string(), |(_, p)| {
                        p.display().to_string()
                    });
                return Err(TrainError::NonFinite {
                    count: state.consecutive_nonfinite,
                    step: state.step,
                    last_checkpoint: last,
                });
            }
        } else {
            state.consecutive_nonfinite = 0;
            let scale = clip_scale(grad_norm, cfg.train.grad_clip);
            optimizer.step(&outcome.grads, lr, scale)?;
            update_expert_bias(
                &model,
                &outcome.tokens_per_expert,
                cfg.train.expert_bias_rate,
            )?;
            let last = state.step == cfg.train.steps;
            if state.step % cfg.log.interval == 0 || last {
                let seconds = window.0.elapsed().as_secs_f64().max(1e-9);
                let tokens_per_s = window.1 as f64 / seconds;
                let line = StepMetrics {
                    step: state.step,
                    tokens: state.tokens,
                    lr,
                    loss,
                    lm_loss: outcome.lm_loss,
                    domain_loss: outcome.domain_loss,
                    grad_norm,
                    aux_loss: outcome.aux_loss,
                    z_loss: outcome.z_loss,
                    load_imbalance: outcome
                        .tokens_per_expert
                        .iter()
                        .map(|c| imbalance(c))
                        .collect(),
                    tokens_per_s,
                    mfu: (cfg.run.device == DeviceKind::Cuda)
                        .then(|| flops_per_token * tokens_per_s / GPU_PEAK_FLOPS),
                };
                metrics.write(&line)?;
                on_event(&Event::Step(line));
                window = (Instant::now(), 0);
            }
        }

        let last = state.step == cfg.train.steps;
        // A checkpoint inside a non-finite streak would only record the streak.
        let checkpoint_due =
            cfg.checkpoint.interval > 0 && state.step % cfg.checkpoint.interval == 0 && finite;
        let interrupted = stop.load(Ordering::SeqCst);
        if state.step % cfg.log.router_interval == 0 || checkpoint_due || interrupted || last {
            router_log.flush(&run_dir.join("router"), state.step)?;
        }
        if cfg.train.eval_interval > 0 && state.step % cfg.train.eval_interval == 0 && !last {
            let report = evaluate(&model, &dataset, &cfg, state.step, &device)?;
            report.write(&run_dir.join("eval"))?;
            on_event(&Event::Eval(report));
        }
        if checkpoint_due || interrupted || last {
            let dir = save(&state, &optimizer, &stream)?;
            on_event(&Event::Checkpoint(dir));
        }
        if interrupted {
            return Ok(Summary {
                run_dir,
                steps: state.step,
                final_eval: None,
                interrupted: true,
            });
        }
    }

    let report = evaluate(&model, &dataset, &cfg, state.step, &device)?;
    report.write(&run_dir.join("eval"))?;
    on_event(&Event::Eval(report.clone()));
    if checkpoint::list(&checkpoints_dir)?.last().map(|(s, _)| *s) != Some(state.step) {
        let dir = save(&state, &optimizer, &stream)?;
        on_event(&Event::Checkpoint(dir));
    }
    Ok(Summary {
        run_dir,
        steps: state.step,
        final_eval: Some(report),
        interrupted: false,
    })
}

/// Forward and backward over the step's micro-batches, summing gradients and statistics.
fn train_step(
    model: &MoeTransformer,
    params: &[(String, Var)],
    batch: &Batch,
    cfg: &Config,
    step: u64,
    router_log: &mut RouterAccumulator,
) -> Result<StepOutcome, TrainError> {
    let device = model_device(params);
    let micro = cfg.train.micro_batch;
    let seq_len = batch.seq_len;
    let accumulation = batch.n_sequences / micro;
    let n_moe = cfg.model.n_moe_layers();
    let mut outcome = StepOutcome {
        grads: HashMap::new(),
        loss: 0.0,
        lm_loss: 0.0,
        domain_loss: BTreeMap::new(),
        aux_loss: vec![0.0; n_moe],
        z_loss: vec![0.0; n_moe],
        tokens_per_expert: vec![vec![0; cfg.model.moe.n_experts]; n_moe],
    };
    let mut domain_sums: BTreeMap<u32, (f64, usize)> = BTreeMap::new();
    for m in 0..accumulation {
        let rows = m * micro * seq_len..(m + 1) * micro * seq_len;
        let input = Tensor::from_slice(&batch.tokens[rows.clone()], (micro, seq_len), &device)?;
        let target = Tensor::from_slice(&batch.targets[rows], (micro, seq_len), &device)?;
        let out = model.forward(
            &input,
            Some(&target),
            ForwardOptions {
                step: Some(step),
                seed: cfg.run.seed,
            },
        )?;
        let (Some(loss), Some(lm_loss), Some(token_losses)) =
            (&out.loss, &out.lm_loss, &out.token_losses)
        else {
            return Err(TrainError::Checkpoint(
                "model returned no loss for a batch with targets".into(),
            ));
        };
        let grads = (loss / accumulation as f64)?.backward()?;
        for (name, var) in params {
            if let Some(g) = grads.get(var.as_tensor()) {
                // Detached: the micro-batch's graph is freed as soon as its backward is done.
                let g = g.detach();
                let sum = match outcome.grads.remove(name) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                outcome.grads.insert(name.clone(), sum);
            }
        }
        // One host copy for all scalars of the micro-batch.
        let mut scalars = vec![loss.clone(), lm_loss.clone()];
        scalars.extend(out.routing.iter().map(|r| r.aux_loss.clone()));
        scalars.extend(out.routing.iter().map(|r| r.z_loss.clone()));
        let values = Tensor::stack(&scalars, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let share = 1.0 / accumulation as f64;
        outcome.loss += values[0] * share;
        outcome.lm_loss += values[1] * share;
        for l in 0..n_moe {
            outcome.aux_loss[l] += values[2 + l] * share;
            outcome.z_loss[l] += values[2 + n_moe + l] * share;
        }
        let per_sequence = token_losses
            .mean(1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let domains = &batch.domain_ids[m * micro..(m + 1) * micro];
        for (&d, loss) in domains.iter().zip(per_sequence) {
            let entry = domain_sums.entry(d).or_insert((0.0, 0));
            entry.0 += loss;
            entry.1 += 1;
        }
        for (l, record) in out.routing.iter().enumerate() {
            for (total, n) in outcome.tokens_per_expert[l]
                .iter_mut()
                .zip(&record.tokens_per_expert)
            {
                *total += n;
            }
        }
        // Router logs number steps like metrics: by steps completed.
        router_log.record(step + 1, &out.routing, domains, seq_len)?;
    }
    let names = router_log.domains();
    outcome.domain_loss = domain_sums
        .into_iter()
        .map(|(d, (sum, n))| {
            (
                names
                    .get(d as usize)
                    .cloned()
                    .unwrap_or_else(|| d.to_string()),
                sum / n as f64,
            )
        })
        .collect();
    Ok(outcome)
}

fn model_device(params: &[(String, Var)]) -> Device {
    params
        .first()
        .map_or(Device::Cpu, |(_, v)| v.device().clone())
}

/// max / mean of a load vector (1 = perfectly balanced).
fn imbalance(load: &[usize]) -> f64 {
    let total: usize = load.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let max = load.iter().copied().max().unwrap_or(0) as f64;
    max * load.len() as f64 / total as f64
}

/// DeepSeek-V3's auxiliary-loss-free update: b_i += rate * sign(mean load - load_i).
fn update_expert_bias(
    model: &MoeTransformer,
    loads: &[Vec<usize>],
    rate: f64,
) -> Result<(), TrainError> {
    for ((_, bias), load) in model.expert_biases().iter().zip(loads) {
        let mean = load.iter().sum::<usize>() as f64 / load.len().max(1) as f64;
        let delta: Vec<f32> = load
            .iter()
            .map(|&l| {
                let gap = mean - l as f64;
                (rate
                    * if gap > 0.0 {
                        1.0
                    } else if gap < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }) as f32
            })
            .collect();
        let delta = Tensor::from_vec(delta, load.len(), bias.device())?.to_dtype(bias.dtype())?;
        bias.set(&(bias.as_tensor() + delta)?)?;
    }
    Ok(())
}

/// Trainable parameters by name, sorted.
/// The device `run.device` names; CUDA needs a build with `--features cuda`.
pub(crate) fn open_device(kind: DeviceKind) -> Result<Device, TrainError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => Device::new_cuda(0).map_err(|e| {
            TrainError::Device(format!(
                "run.device = \"cuda\" but no CUDA device is usable ({e}); this binary needs a build with --features cuda (see scripts/cuda-toolchain.sh), or set run.device = \"cpu\""
            ))
        }),
    }
}

/// AdamW over `params` with `[train]`'s hyper-parameters (f32 state).
pub(crate) fn new_optimizer(params: &[(String, Var)], cfg: &Config) -> Result<AdamW, TrainError> {
    Ok(AdamW::new(
        params.to_vec(),
        AdamWParams {
            beta1: cfg.train.beta1,
            beta2: cfg.train.beta2,
            eps: cfg.train.eps,
            weight_decay: cfg.train.weight_decay,
        },
        &cfg.train.no_decay,
    )?)
}

pub(crate) fn named_params(varmap: &VarMap) -> Result<Vec<(String, Var)>, TrainError> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| TrainError::Checkpoint("parameter map lock poisoned".into()))?;
    let mut params: Vec<(String, Var)> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(params)
}

/// Parameters and expert biases as saved in model.safetensors.
fn model_tensors(params: &[(String, Var)], model: &MoeTransformer) -> HashMap<String, Tensor> {
    params
        .iter()
        .cloned()
        .chain(model.expert_biases())
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect()
}

/// Loads checkpoint tensors into the model; every tensor must exist with the right shape and
/// nothing may be left over, and the error names the tensor otherwise.
pub fn restore_model(
    model: &MoeTransformer,
    params: &[(String, Var)],
    saved: &HashMap<String, Tensor>,
    dir: &Path,
) -> Result<(), TrainError> {
    let wanted: Vec<(String, Var)> = params
        .iter()
        .cloned()
        .chain(model.expert_biases())
        .collect();
    for (name, var) in &wanted {
        let tensor = saved.get(name).ok_or_else(|| {
            TrainError::Checkpoint(format!(
                "{}: model.safetensors lacks tensor `{name}` that the config needs",
                dir.display()
            ))
        })?;
        if tensor.dims() != var.dims() {
            return Err(TrainError::Checkpoint(format!(
                "{}: tensor `{name}` has shape {:?} but the config needs {:?}",
                dir.display(),
                tensor.dims(),
                var.dims()
            )));
        }
        var.set(&tensor.to_dtype(var.dtype())?)?;
    }
    if let Some(extra) = saved.keys().find(|k| !wanted.iter().any(|(n, _)| n == *k)) {
        return Err(TrainError::Checkpoint(format!(
            "{}: tensor `{extra}` in model.safetensors has no place in the configured model",
            dir.display()
        )));
    }
    Ok(())
}

/// Loads a checkpoint's model for evaluation: its own config, its weights.
pub fn load_model(
    dir: &Path,
    device: &Device,
) -> Result<(Config, MoeTransformer, checkpoint::Checkpoint), TrainError> {
    let ckpt = checkpoint::load(dir, device)?;
    let config_path = dir.join("config.toml");
    let cfg = Config::load(&config_path, &[])?;
    let (model, varmap) = MoeTransformer::init(&cfg.model, cfg.run.seed, DType::F32, device)?;
    restore_model(&model, &named_params(&varmap)?, &ckpt.model, dir)?;
    Ok((cfg, model, ckpt))
}

/// Evaluates a checkpoint on its run's validation streams.
pub fn evaluate_checkpoint(dir: &Path) -> Result<EvalReport, TrainError> {
    let device = Device::Cpu;
    let (cfg, model, ckpt) = load_model(dir, &device)?;
    let dataset: Dataset = moelab_data::ensure_prepared(&cfg.data)?;
    evaluate(&model, &dataset, &cfg, ckpt.state.step, &device)
}

/// Creates the run folder and writes the resolved config first. A folder holding another run's
/// config, or checkpoints, is refused unless resuming.
fn prepare_run_dir(run_dir: &Path, cfg: &Config, resuming: bool) -> Result<(), TrainError> {
    std::fs::create_dir_all(run_dir).map_err(|source| TrainError::Io {
        path: run_dir.to_path_buf(),
        source,
    })?;
    let config_path = run_dir.join("config.toml");
    let resolved = cfg.to_toml();
    if let Ok(existing) = std::fs::read_to_string(&config_path) {
        if existing != resolved && !resuming {
            return Err(TrainError::RunDir {
                path: run_dir.to_path_buf(),
                reason: "it holds another run's config.toml; pass --resume auto to continue that run, or choose another --run-dir".into(),
            });
        }
        if !resuming && !checkpoint::list(&run_dir.join("checkpoints"))?.is_empty() {
            return Err(TrainError::RunDir {
                path: run_dir.to_path_buf(),
                reason: "it already has checkpoints; pass --resume auto to continue, or choose another --run-dir".into(),
            });
        }
        if existing != resolved {
            // Keep the config the earlier part of the run used.
            let mut n = 1;
            while run_dir.join(format!("config.previous-{n}.toml")).exists() {
                n += 1;
            }
            let previous = run_dir.join(format!("config.previous-{n}.toml"));
            std::fs::write(&previous, existing).map_err(|source| TrainError::Io {
                path: previous,
                source,
            })?;
        }
    }
    let tmp = run_dir.join(".config.toml.tmp");
    std::fs::write(&tmp, resolved).map_err(|source| TrainError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &config_path).map_err(|source| TrainError::Io {
        path: config_path,
        source,
    })
}

/// Fixes the CPU thread count (0 = all cores) for rayon and candle's GEMM.
pub(crate) fn set_threads(threads: usize) {
    if threads == 0 {
        return;
    }
    // candle reads RAYON_NUM_THREADS at every GEMM; rayon reads it when its global pool is first
    // used, which is after this point.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}

/// metrics.jsonl: one JSON object per line, flushed as written. On resume, lines past the
/// checkpoint's step are dropped (they will be produced again, identically).
struct MetricsFile {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsFile {
    fn open(path: &Path, resume_step: u64) -> Result<Self, TrainError> {
        let io = |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        };
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
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, kept).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    fn write<T: Serialize>(&mut self, value: &T) -> Result<(), TrainError> {
        let line =
            serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        writeln!(self.file, "{line}").map_err(|source| TrainError::Io {
            path: self.path.clone(),
            source,
        })
    }
}
