//! The training run. [`Trainer::setup`] validates everything (config, run folder, data,
//! checkpoint) before it writes anything into the run folder; [`Trainer::run`] is the loop:
//! step, log, router log, evaluate, checkpoint. The pieces decide their own timing:
//! `step.rs` (the step `train` and `bench` share), `checkpoint_policy.rs` (when to save, what to
//! keep, which checkpoint is known good), `metrics.rs`. The run folder and the checkpoint format
//! are the `run` layer below.

mod checkpoint_policy;
mod metrics;
mod step;
mod tensorboard;

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::Device;
use moelab_data::{Dataset, MixtureStream, Prefetcher, PrepareEvent};
use moelab_model::ModelInfo;

use crate::config::DeviceKind;
use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::{self, Collective, Shown, Single};
use crate::eval::{evaluate, EvalReport, ValidationCheck};
use crate::interrupt;
use crate::router_logger::RouterLogger;
use crate::run::checkpoint::{self, TrainState};
use crate::run::device::{check_memory, open_device, set_threads};
use crate::run::{RunDir, RunLock};
use crate::schedule::Schedule;
use crate::{Config, TrainError};
use checkpoint_policy::Checkpointer;
pub use checkpoint_policy::Resume;
use metrics::MetricsLogger;
pub use metrics::StepMetrics;
pub(crate) use metrics::GPU_PEAK_FLOPS;
pub use step::{Accumulated, Learner, Phase, StepConfig, StepOutcome};

/// How to run, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run folder; default `run.out_dir/run.name`.
    pub run_dir: Option<PathBuf>,
    /// Resume instead of starting fresh.
    pub resume: Option<Resume>,
    /// Accept a changed `[data.mixture]` on resume (appended as a new data stage).
    pub allow_mixture_change: bool,
    /// Start even when the estimated memory exceeds what the device has.
    pub ignore_memory_check: bool,
}

/// What the trainer reports to its caller as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// The dataset is being prepared from `data.sources` on first use.
    Preparing(PrepareEvent),
    /// The validation tokens each domain's loss will rest on, and warnings for domains with
    /// too few (sent once the run is valid, before [`Event::Started`]).
    Validation(ValidationCheck),
    /// The run is set up.
    Started {
        /// Run folder.
        run_dir: PathBuf,
        /// Steps already done (the first step to run is this + 1).
        start_step: u64,
        /// Last step.
        total_steps: u64,
        /// Checkpoint resumed from.
        resumed_from: Option<PathBuf>,
        /// Where the checkpoints past the resume point were set aside (resuming from an older
        /// checkpoint than the run's newest).
        set_aside: Option<PathBuf>,
    },
    /// What each rank of a job of several holds (measured, gathered from every rank).
    Layout(Vec<RankLayout>),
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

/// What one rank of a job holds, as measured from its learner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankLayout {
    /// The rank.
    pub rank: usize,
    /// The global ids of the routed experts it holds of every MoE layer.
    pub experts: std::ops::Range<usize>,
    /// Bytes of trainable parameters it holds.
    pub parameter_bytes: u64,
    /// Bytes of optimizer state it holds.
    pub optimizer_bytes: u64,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Run folder.
    pub run_dir: PathBuf,
    /// Steps completed.
    pub steps: u64,
    /// Steps this process ran.
    pub steps_run: u64,
    /// The last evaluation (None when stopped by a signal).
    pub final_eval: Option<EvalReport>,
    /// True when SIGINT/SIGTERM stopped the run (after saving a checkpoint).
    pub interrupted: bool,
    /// True when the run was already finished (final checkpoint and final evaluation written
    /// at `train.steps`) and nothing was done or changed.
    pub already_finished: bool,
    /// Wall-clock seconds of the training loop in this process.
    pub wall_s: f64,
    /// Mean training throughput of this process.
    pub tokens_per_s: f64,
}

/// Runs (or resumes) training as configured, in this one process.
pub fn train(
    cfg: Config,
    options: RunOptions,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Summary, TrainError> {
    train_on(cfg, options, Rc::new(Single), on_event)
}

/// Runs (or resumes) training as rank `comm.rank()` of a data-parallel job (every rank calls
/// this with the same config and options; with [`Single`] it is [`train`]).
pub fn train_on(
    cfg: Config,
    options: RunOptions,
    comm: Rc<dyn Collective>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Summary, TrainError> {
    // Rank 0 looks (it alone takes the folder's lock); every rank hears the answer.
    let finished = match comm.rank() {
        0 => finished_step(&cfg, &options),
        _ => Ok(None),
    };
    let finished = dist::agree(comm.as_ref(), finished)?.is_some();
    // Only when every rank asked for `--resume auto`: ranks started with other resume
    // arguments go on to setup, whose agreement check names the disagreement.
    let all_auto = !dist::any(comm.as_ref(), options.resume != Some(Resume::Auto));
    if dist::any(comm.as_ref(), finished) && all_auto {
        let run_dir = run_dir_of(&cfg, &options);
        return Ok(Summary {
            run_dir: run_dir.root().to_path_buf(),
            steps: cfg.train.steps,
            steps_run: 0,
            final_eval: None,
            interrupted: false,
            already_finished: true,
            wall_s: 0.0,
            tokens_per_s: 0.0,
        });
    }
    Trainer::setup(cfg, options, comm, on_event)?.run(on_event)
}

/// The run folder the options name, else `run.out_dir/run.name`.
fn run_dir_of(cfg: &Config, options: &RunOptions) -> RunDir {
    RunDir::new(
        options
            .run_dir
            .clone()
            .unwrap_or_else(|| cfg.run.out_dir.join(&cfg.run.name)),
    )
}

/// The step at which `--resume auto` finds this run finished: its newest checkpoint is at
/// `train.steps` or later, the final evaluation of that step is written, and the folder holds
/// this config. Such a run has nothing left to do (a grown `train.steps` makes it unfinished).
/// The folder's lock is taken for the look, so a run still writing is never taken as finished.
pub fn finished_step(cfg: &Config, options: &RunOptions) -> Result<Option<u64>, TrainError> {
    if options.resume != Some(Resume::Auto) {
        return Ok(None);
    }
    let run_dir = run_dir_of(cfg, options);
    if !run_dir.root().is_dir() {
        return Ok(None);
    }
    let _lock = run_dir.lock()?;
    let Some((step, _)) = checkpoint::list(&run_dir.checkpoints())?.pop() else {
        return Ok(None);
    };
    let saved = std::fs::read_to_string(run_dir.config()).unwrap_or_default();
    let done =
        step >= cfg.train.steps && run_dir.eval_json(step).is_file() && saved == cfg.to_toml();
    Ok(done.then_some(step))
}

/// A run, set up and ready to step.
pub struct Trainer {
    cfg: Config,
    comm: Rc<dyn Collective>,
    run_dir: RunDir,
    _lock: Option<RunLock>,
    device: Device,
    dataset: Arc<Dataset>,
    stream: Arc<MixtureStream>,
    learner: Learner,
    state: TrainState,
    schedule: Schedule,
    checkpointer: Checkpointer,
    metrics: MetricsLogger,
    router_log: RouterLogger,
    /// Expert parallelism's groups, registered on this thread for the model's exchanges; kept
    /// as long as the learner whose model uses them (dropped after it: fields drop in order).
    expert_parallel: Option<ExpertParallel>,
}

/// What [`Trainer::validate`] found valid, before anything is written.
struct Validated {
    cfg: Config,
    resolved: String,
    run_dir: RunDir,
    device: Device,
    dataset: Arc<Dataset>,
    learner: Learner,
    stream: MixtureStream,
    state: TrainState,
    resumed_from: Option<PathBuf>,
    validation: ValidationCheck,
}

impl Trainer {
    /// Takes the run folder (lock), checks the config against the data, the device and the
    /// checkpoint, builds the model and optimizer (fresh or restored), and only then records the
    /// config and clears what a killed or abandoned continuation left past the resume step. A
    /// refused run leaves the folder as it was.
    ///
    /// In a job of several ranks, rank 0 alone holds the lock, prepares the data and writes;
    /// every step that can fail on one rank is agreed on (see [`dist::agree`]), and the ranks
    /// check they hold the same config, data and checkpoint.
    pub fn setup(
        cfg: Config,
        options: RunOptions,
        comm: Rc<dyn Collective>,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<Self, TrainError> {
        let comm_ref = comm.as_ref();
        let leader = comm.rank() == 0;
        let run_dir = RunDir::new(
            options
                .run_dir
                .clone()
                .unwrap_or_else(|| cfg.run.out_dir.join(&cfg.run.name)),
        );
        let lock = dist::agree(comm_ref, leader.then(|| run_dir.lock()).transpose())?;
        let release = |lock: Option<RunLock>| {
            if let Some(lock) = lock {
                lock.release_unused();
            }
        };
        if comm.world_size() > 1 {
            // Rank 0 prepares the dataset on first use; the others open it once it exists.
            let prepared = match leader {
                true => prepare_data(&cfg, on_event).map(|_| ()),
                false => Ok(()),
            };
            if let Err(e) = dist::agree(comm_ref, prepared) {
                release(lock);
                return Err(e);
            }
        }
        // The EP groups are split off the world before anything else is built (every rank
        // calls it; a layout that does not divide is refused here, the same on every rank).
        let ep = match expert_parallel(&cfg, comm_ref) {
            Ok(ep) => ep,
            Err(e) => {
                release(lock);
                return Err(e);
            }
        };
        let validated = dist::agree(
            comm_ref,
            Self::validate(cfg, &options, run_dir, comm_ref, ep.as_ref(), on_event),
        )
        .and_then(|v| check_ranks_agree(comm_ref, &v).map(|()| v));
        let validated = match validated {
            Ok(v) => v,
            Err(e) => {
                release(lock);
                return Err(e);
            }
        };
        let resumed_from = validated.resumed_from.clone();
        let validation = validated.validation.clone();
        // Gradients of a GPU run travel over NCCL (set up by every rank together).
        let comm = match dist::for_device(comm.clone(), &validated.device) {
            Ok(c) => c,
            Err(e) => {
                release(lock);
                return Err(e);
            }
        };
        let committed = Self::commit(validated, &options, comm.clone());
        let (mut trainer, set_aside) = match dist::agree(comm_ref, committed) {
            Ok(built) => built,
            Err(e) => {
                release(lock);
                return Err(e);
            }
        };
        trainer._lock = lock;
        on_event(&Event::Validation(validation));
        trainer.expert_parallel = ep;
        on_event(&Event::Started {
            run_dir: trainer.run_dir.root().to_path_buf(),
            start_step: trainer.state.step,
            total_steps: trainer.cfg.train.steps,
            resumed_from,
            set_aside,
        });
        if trainer.comm.world_size() > 1 {
            on_event(&Event::Layout(trainer.rank_layouts()));
        }
        Ok(trainer)
    }

    /// Everything [`Trainer::setup`] checks before it writes: the folder, device, memory, data,
    /// model and checkpoint; nothing is written and no collective is called.
    fn validate(
        cfg: Config,
        options: &RunOptions,
        run_dir: RunDir,
        comm: &dyn Collective,
        ep: Option<&ExpertParallel>,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<Validated, TrainError> {
        let resolved = cfg.to_toml();
        let resuming = options.resume.is_some();
        run_dir.check_usable(&resolved, resuming)?;
        check_divisible(&cfg, comm.world_size())?;
        check_layout(&cfg, comm.world_size())?;
        set_threads(cfg.run.threads);
        let device = open_device(cfg.run.device, comm.local_rank())?;
        let memory_on = (!options.ignore_memory_check).then_some(&device);
        let dataset = check_run(&cfg, memory_on, comm.world_size(), on_event)?;
        let validation = ValidationCheck::new(&dataset, &cfg);
        let mut learner = match ep {
            Some(ep) => Learner::new_expert_parallel(&cfg, &device, comm, ep)?,
            None => Learner::new(&cfg, &device, comm)?,
        };
        let resume = checkpoint_policy::resume_point(&run_dir, options.resume.as_ref(), &device)?;
        let sequences_per_step = cfg.global_sequences() as u64;
        let (stream, state, resumed_from) = match resume {
            Some(ckpt) => {
                learner.restore(&ckpt)?;
                if ckpt.state.stream.sequences_consumed != ckpt.state.step * sequences_per_step {
                    return Err(TrainError::Checkpoint(format!(
                        "{}: the checkpoint consumed {} sequences in {} steps, which does not match {} sequences per step; keep train.global_batch_tokens as it was",
                        ckpt.dir.display(),
                        ckpt.state.stream.sequences_consumed,
                        ckpt.state.step,
                        sequences_per_step
                    )));
                }
                let stream = MixtureStream::resume(
                    dataset.clone(),
                    &cfg.data,
                    cfg.run.seed,
                    &ckpt.state.stream,
                    options.allow_mixture_change,
                )?;
                (stream, ckpt.state, Some(ckpt.dir))
            }
            None => {
                let stream = MixtureStream::new(dataset.clone(), &cfg.data, cfg.run.seed)
                    .map_err(|e| cfg.origin.blame(e.into()))?;
                let state = TrainState::fresh(&stream, cfg.run.seed);
                (stream, state, None)
            }
        };
        Ok(Validated {
            cfg,
            resolved,
            run_dir,
            device,
            dataset,
            learner,
            stream,
            state,
            resumed_from,
            validation,
        })
    }

    /// Records the config and clears what a killed or abandoned continuation left past the
    /// resume step (rank 0), and builds the trainer; also returns where later checkpoints were
    /// set aside.
    fn commit(
        v: Validated,
        options: &RunOptions,
        comm: Rc<dyn Collective>,
    ) -> Result<(Self, Option<PathBuf>), TrainError> {
        let Validated {
            cfg,
            resolved,
            run_dir,
            device,
            dataset,
            learner,
            stream,
            state,
            resumed_from,
            validation: _,
        } = v;
        let leader = comm.rank() == 0;
        let mut set_aside = None;
        // Everything is valid: from here on the run folder is written (by rank 0).
        if leader {
            run_dir.record_config(&resolved, options.resume.is_some())?;
            checkpoint::remove_partial(&run_dir.checkpoints())?;
            set_aside = run_dir.set_aside_checkpoints_after(state.step)?;
            run_dir.remove_evals_after(state.step)?;
            if run_dir.router().exists() {
                moelab_trace::router_log::remove_after(&run_dir.router(), state.step)?;
            }
        }
        let flops_per_token = match cfg.run.device {
            DeviceKind::Cuda => {
                Some(ModelInfo::new(&cfg.model, cfg.data.seq_len)?.train_flops_per_token as f64)
            }
            DeviceKind::Cpu => None,
        };
        let metrics = if leader {
            MetricsLogger::open(&run_dir, &cfg, state.step, flops_per_token)?
        } else {
            MetricsLogger::silent(&cfg, flops_per_token)
        };
        let moe_layers: Vec<usize> = (0..cfg.model.n_layers)
            .filter(|&l| cfg.model.is_moe_layer(l))
            .collect();
        let router_log = RouterLogger::new(
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
        interrupt::install().map_err(TrainError::io(run_dir.root()))?;
        let checkpointer = Checkpointer::new(
            &run_dir,
            cfg.checkpoint.clone(),
            resolved,
            resumed_from.clone(),
            state.known_good_step,
        );
        let trainer = Self {
            cfg,
            comm,
            run_dir,
            _lock: None,
            device,
            dataset,
            stream: Arc::new(stream),
            learner,
            state,
            schedule,
            checkpointer,
            metrics,
            router_log,
            expert_parallel: None,
        };
        Ok((trainer, set_aside))
    }

    /// Every rank's experts, parameter and optimizer bytes (every rank must call it).
    fn rank_layouts(&self) -> Vec<RankLayout> {
        let experts = match &self.expert_parallel {
            Some(ep) => ep.local_experts(),
            None => 0..self.cfg.model.moe.n_experts,
        };
        let mine = [
            experts.start as u64,
            experts.end as u64,
            self.learner.parameter_bytes() as u64,
            self.learner.optimizer_state_bytes() as u64,
        ];
        self.comm
            .all_gather_u64(&mine)
            .chunks_exact(4)
            .enumerate()
            .map(|(rank, v)| RankLayout {
                rank,
                experts: v[0] as usize..v[1] as usize,
                parameter_bytes: v[2],
                optimizer_bytes: v[3],
            })
            .collect()
    }

    /// Trains to `train.steps`, or until SIGINT/SIGTERM (which saves a checkpoint first).
    pub fn run(mut self, on_event: &mut dyn FnMut(&Event)) -> Result<Summary, TrainError> {
        let first_step = self.state.step;
        let sequences = self.cfg.global_sequences();
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        // From here on no rank waits for another's setup work (data preparation can take
        // longer than any timeout), so a collective that waits past dist.timeout_s means a
        // rank stopped responding.
        // Each rank also reports its progress, so that a timeout names the rank that stopped.
        dist::watchdog::progress(first_step, "starting the training loop");
        let _watchdog = (world > 1).then(|| {
            let reports = Some(self.run_dir.progress());
            dist::watchdog::arm(self.cfg.dist.timeout_s, rank, world, reports)
        });
        let batches = Prefetcher::new(
            self.stream.clone(),
            self.state.step,
            sequences,
            rank,
            world,
            2,
        );
        for batch in batches {
            if self.state.step >= self.cfg.train.steps {
                break;
            }
            dist::watchdog::progress(self.state.step + 1, "forward");
            let lr = self.schedule.lr_at(self.state.step);
            let batch = batch?;
            // Evaluations between steps exchange too: count this step's traffic only.
            dist::expert_parallel::take_all_to_all_bytes();
            let outcome = self.learner.step(
                &batch,
                self.state.step,
                lr,
                self.comm.as_ref(),
                &mut self.router_log,
                &mut report_phases(
                    self.state.step + 1,
                    batch.n_sequences / self.cfg.train.micro_batch,
                ),
            )?;
            if self.expert_parallel.is_some() {
                let sent = dist::expert_parallel::take_all_to_all_bytes();
                let by_rank = self.comm.all_gather_u64(&[sent]);
                self.metrics.set_ep_all_to_all_bytes(by_rank);
            }
            self.state.step += 1;
            let tokens = (sequences * self.cfg.data.seq_len) as u64;
            self.state.tokens += tokens;
            self.checkpointer.observe(outcome.applied);
            self.log_step(&outcome, tokens, lr, on_event)?;
            if self.after_step(outcome.applied, on_event)? {
                return Ok(self.summary(first_step, None, true));
            }
        }
        // The final checkpoint comes before the final evaluation, so that a signal during the
        // evaluation loses nothing: evaluating the checkpoint later gives the same report.
        let saved = self.comm.rank() == 0 && self.checkpointer.has(self.state.step)?;
        if !dist::any(self.comm.as_ref(), saved) {
            self.save(on_event)?;
        }
        match self.evaluate(on_event) {
            Ok(report) => Ok(self.summary(first_step, Some(report), false)),
            Err(TrainError::Interrupted) => Ok(self.summary(first_step, None, true)),
            Err(e) => Err(e),
        }
    }

    /// Writes the step's metrics line (or its skip line) and stops a non-finite streak that is
    /// too long, naming the newest checkpoint known to be good.
    fn log_step(
        &mut self,
        outcome: &StepOutcome,
        tokens: u64,
        lr: f64,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<(), TrainError> {
        let step = self.state.step;
        if outcome.applied {
            self.state.consecutive_nonfinite = 0;
            if let Some(line) = self.metrics.step(
                step,
                self.state.tokens,
                tokens,
                lr,
                outcome,
                &mut self.state.log_window,
            )? {
                on_event(&Event::Step(line));
            }
            return Ok(());
        }
        self.state.consecutive_nonfinite += 1;
        let reason = format!("loss {}, grad norm {}", outcome.loss, outcome.grad_norm);
        self.metrics.skipped(step, &reason)?;
        on_event(&Event::Skipped { step, reason });
        if self.state.consecutive_nonfinite >= self.cfg.train.max_nonfinite_steps {
            return Err(TrainError::NonFinite {
                count: self.state.consecutive_nonfinite,
                step,
                last_checkpoint: self.checkpointer.known_good().map_or_else(
                    || "none: no checkpoint of this run is known to give a finite loss".into(),
                    |p| p.display().to_string(),
                ),
            });
        }
        Ok(())
    }

    /// The router log, evaluation and checkpoint, each when it is due; true when a signal asks
    /// the run to stop (a checkpoint has then been saved).
    fn after_step(
        &mut self,
        finite: bool,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<bool, TrainError> {
        let step = self.state.step;
        let last = step == self.cfg.train.steps;
        let checkpoint_due = self.checkpointer.due(step, finite);
        let mut stop = dist::any(self.comm.as_ref(), interrupt::requested());
        if step.is_multiple_of(self.cfg.log.router_interval) || checkpoint_due || stop || last {
            dist::watchdog::progress(step, "router log");
            self.router_log
                .flush(&self.run_dir.router(), step, self.comm.as_ref())?;
        }
        let eval_interval = self.cfg.train.eval_interval;
        if eval_interval > 0 && step.is_multiple_of(eval_interval) && !last && !stop {
            match self.evaluate(on_event) {
                Ok(_) => {}
                Err(TrainError::Interrupted) => stop = true,
                Err(e) => return Err(e),
            }
        }
        if checkpoint_due || stop {
            self.save(on_event)?;
        }
        Ok(stop)
    }

    /// Saves a checkpoint (rank 0 writes it; the others wait until it is complete).
    fn save(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<(), TrainError> {
        dist::watchdog::progress(self.state.step, "checkpoint");
        // Gathered on every rank (a sharded optimizer's moments), written by rank 0.
        let tensors = self.learner.checkpoint_tensors(self.comm.as_ref())?;
        let dir = if self.comm.rank() == 0 {
            self.checkpointer.save(
                tensors,
                &self.state,
                &self.stream,
                self.cfg.global_sequences() as u64,
            )?
        } else {
            self.run_dir.checkpoint(self.state.step)
        };
        self.comm.barrier();
        on_event(&Event::Checkpoint(dir));
        Ok(())
    }

    /// Evaluates the model now, writing eval/ and a metrics line.
    fn evaluate(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<EvalReport, TrainError> {
        dist::watchdog::progress(self.state.step, "evaluation");
        let report = evaluate(
            &self.learner.model,
            &self.dataset,
            &self.cfg,
            self.state.step,
            &self.device,
            self.comm.as_ref(),
        )?;
        if self.comm.rank() == 0 {
            // The eval/ JSON last: its presence marks the evaluation as written (see
            // [`finished_step`]), so it must not exist without the metrics line.
            self.metrics.eval(&report)?;
            report.write(&self.run_dir)?;
        }
        on_event(&Event::Eval(report.clone()));
        Ok(report)
    }

    fn summary(
        &self,
        first_step: u64,
        final_eval: Option<EvalReport>,
        interrupted: bool,
    ) -> Summary {
        Summary {
            run_dir: self.run_dir.root().to_path_buf(),
            steps: self.state.step,
            steps_run: self.state.step - first_step,
            final_eval,
            interrupted,
            already_finished: false,
            wall_s: self.metrics.elapsed_s(),
            tokens_per_s: self.metrics.mean_tokens_per_s(),
        }
    }
}

/// The learner's phase events of step `step` (`micro_batches` of this rank), as progress
/// reports for `dist.timeout_s` (an event marks the end of a phase, so the next one begins).
fn report_phases(step: u64, micro_batches: usize) -> impl FnMut(Phase) + Send {
    let mut done = 0;
    move |phase| {
        let next = match phase {
            Phase::Forward => "backward",
            Phase::Backward => {
                done += 1;
                if done < micro_batches {
                    "forward"
                } else {
                    "gradient exchange and update"
                }
            }
            Phase::Optimizer => "after the update",
        };
        dist::watchdog::progress(step, next);
    }
}

/// Everything `train` checks about a config before its first step that needs no run folder:
/// memory on `device`, the data (prepared on first use), the vocabulary against the tokenizer,
/// the validation set, the task files, and the mixture's domains, sources and selection against
/// the dataset. Errors name the `--set` override or the file that gave the key.
fn check_run(
    cfg: &Config,
    memory_on: Option<&Device>,
    ranks: usize,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Arc<Dataset>, TrainError> {
    if let Some(device) = memory_on {
        check_memory(cfg, device, ranks)?;
    }
    let dataset = prepare_data(cfg, on_event).map_err(|e| cfg.origin.blame(e))?;
    if dataset.vocab_size() > cfg.model.vocab_size {
        return Err(cfg.origin.key_error(
            "model.vocab_size",
            &format!(
                "{} is smaller than the tokenizer's vocabulary ({})",
                cfg.model.vocab_size,
                dataset.vocab_size()
            ),
        ));
    }
    // Evaluation runs after training; its data is checked before the first step. A domain
    // with too few validation tokens is warned about (the user set no key for it).
    dataset.check_validation(
        cfg.data.seq_len,
        cfg.data.validation_tokens,
        cfg.train.micro_batch,
    )?;
    // So are the task files and the tokenizer that encodes them.
    if !cfg.eval.tasks.is_empty() {
        crate::tasks::load_tasks(&cfg.eval)?;
        crate::tasks::TokenizerCodec::open(&dataset.tokenizer_path())?;
    }
    Ok(Arc::new(dataset))
}

/// The checks `train` makes before its first step (see [`check_run`]), for a config that is
/// trained later: `moelab ablate` runs them for every variant before the first one trains.
/// With `check_memory` the device is opened to compare the estimate with what it has (a
/// launcher whose children take the devices leaves that to them). Prepares the dataset on
/// first use (as `train` would); writes no run folder.
pub fn preflight(
    cfg: &Config,
    check_memory: bool,
    on_event: &mut dyn FnMut(&Event),
) -> Result<(), TrainError> {
    let device = match check_memory {
        true => {
            set_threads(cfg.run.threads);
            Some(open_device(cfg.run.device, 0)?)
        }
        false => None,
    };
    let dataset = check_run(cfg, device.as_ref(), 1, on_event)?;
    // Building the stream checks the mixture's domains, sources and selection.
    MixtureStream::new(dataset, &cfg.data, cfg.run.seed).map_err(|e| cfg.origin.blame(e.into()))?;
    Ok(())
}

/// Opens the dataset, preparing it from `data.sources` on first use; the preparation's progress
/// is forwarded as [`Event::Preparing`] (it runs on a worker thread, this one draws).
fn prepare_data(cfg: &Config, on_event: &mut dyn FnMut(&Event)) -> Result<Dataset, TrainError> {
    std::thread::scope(|scope| {
        let (sender, receiver) = std::sync::mpsc::channel();
        let worker = scope.spawn(move || {
            let progress = move |event: &PrepareEvent| {
                let _ = sender.send(event.clone());
            };
            moelab_data::ensure_prepared_with(&cfg.data, &progress)
        });
        for event in receiver {
            on_event(&Event::Preparing(event));
        }
        match worker.join() {
            Ok(result) => Ok(result?),
            Err(_) => Err(TrainError::Argument(format!(
                "preparing {} failed unexpectedly (a worker thread panicked)",
                cfg.data.dataset.display()
            ))),
        }
    })
}

/// Refuses a job whose global batch does not split into whole micro-batches on every rank.
fn check_divisible(cfg: &Config, world: usize) -> Result<(), TrainError> {
    let sequences = cfg.global_sequences();
    if world > 1 && !sequences.is_multiple_of(world * cfg.train.micro_batch) {
        return Err(cfg.origin.key_error(
            "train.global_batch_tokens",
            &format!(
                "its {sequences} sequences per step do not split into whole micro-batches of {} over {world} ranks; make it a multiple of {world} x train.micro_batch x data.seq_len",
                cfg.train.micro_batch
            ),
        ));
    }
    Ok(())
}

/// Refuses a `dist.expert_parallel` that does not divide the world size or the expert count,
/// or that meets a capacity factor, naming the numbers.
fn check_layout(cfg: &Config, world: usize) -> Result<(), TrainError> {
    cfg.dist
        .check_layout(world, cfg.model.moe.n_experts)
        .map_err(|reason| cfg.origin.key_error("dist.expert_parallel", &reason))?;
    if cfg.dist.expert_parallel > 1 && cfg.model.moe.capacity_factor.is_some() {
        return Err(cfg.origin.key_error(
            "model.moe.capacity_factor",
            &format!(
                "it cannot be combined with dist.expert_parallel = {} (capacity drops are planned over every expert's queue in one process); remove it or set dist.expert_parallel = 1",
                cfg.dist.expert_parallel
            ),
        ));
    }
    Ok(())
}

/// The EP groups of this rank when `dist.expert_parallel` > 1 (every rank calls it: the world
/// is split twice), after the layout checks.
fn expert_parallel(
    cfg: &Config,
    comm: &dyn Collective,
) -> Result<Option<ExpertParallel>, TrainError> {
    if cfg.dist.expert_parallel <= 1 {
        return Ok(None);
    }
    check_layout(cfg, comm.world_size())?;
    ExpertParallel::new(comm, cfg.dist.expert_parallel, cfg.model.moe.n_experts).map(Some)
}

/// Checks that every rank has the same resolved config, dataset and resume step (a rank
/// started with other arguments, or seeing another copy of the run folder, would silently
/// train something else).
fn check_ranks_agree(comm: &dyn Collective, v: &Validated) -> Result<(), TrainError> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let hash = dist::fingerprint(v.resolved.as_bytes());
    dist::check_same(comm, "config hash", hash, Shown::Fingerprint)?;
    let data = dist::fingerprint(v.stream.state(0).fingerprint.as_bytes());
    dist::check_same(comm, "dataset fingerprint", data, Shown::Fingerprint)?;
    dist::check_same(comm, "checkpoint step", v.state.step, Shown::Count)
}
