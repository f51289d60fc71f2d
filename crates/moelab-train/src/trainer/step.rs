//! The training step, the one piece of code `moelab train` and `moelab bench` both run, in two
//! parts: [`Learner::accumulate`] (forward and backward over the batch's micro-batches,
//! gradients summed, the objective from `loss.rs`) and [`Learner::apply`] (losses and
//! gradients reduced over ranks, the global norm, and, when both are finite, clipping, the
//! optimizer and the expert-bias update).

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use moelab_data::Batch;
use moelab_model::moe::LayerRouting;
use moelab_model::{BalanceScope, ForwardOptions, MoeTransformer};
use rayon::prelude::*;

use crate::balance::ExpertCounts;
use crate::dist::ep_state::{gather_experts, local_experts, ExpertParallelOptimizer};
use crate::dist::expert_parallel::{EpGroups, ExpertParallel};
use crate::dist::{data_parallel, Collective, Single};
use crate::loss::{self, LossValues, LossWeights};
use crate::optim::{
    clip_scale, AdamW, AdamWParams, Optimizer, ReplicatedOptimizer, ShardedAdamW, ShardedOptimizer,
};
use crate::router_logger::RouterLogger;
use crate::run::checkpoint::Checkpoint;
use crate::run::load::{model_tensors, named_params, restore_model};
use crate::{Config, TrainError};

/// Tensors by name.
pub type TensorMap = HashMap<String, Tensor>;

/// The model with its trainable parameters (sorted by name) and optimizer.
pub struct Learner {
    /// The model (compute dtype from `train.precision`, f32 master weights).
    pub model: MoeTransformer,
    params: Vec<(String, Var)>,
    optimizer: Box<dyn Optimizer + Send + Sync>,
    device: Device,
    /// On the CPU, the threads the step runs on (see [`Learner::step`]).
    cpu_pool: Option<rayon::ThreadPool>,
    cfg: StepConfig,
    /// Expert parallelism: this rank's groups (the model holds only its experts).
    ep: Option<EpGroups>,
}

/// What a step needs of the run's config; fixed for the run.
#[derive(Debug, Clone)]
pub struct StepConfig {
    /// Sequences per micro-batch (`train.micro_batch`).
    pub micro_batch: usize,
    /// The run seed (routing warm-up noise).
    pub seed: u64,
    /// The auxiliary losses' weights and balance scope.
    pub loss: LossWeights,
    /// MoE layers of the model.
    pub n_moe_layers: usize,
    /// Routed experts per MoE layer.
    pub n_experts: usize,
    /// Gradient-norm clip (`train.grad_clip`).
    pub grad_clip: Option<f64>,
    /// Expert-bias update rate (`train.expert_bias_rate`).
    pub expert_bias_rate: f64,
    /// Steps (1-based) whose loss is replaced by NaN, to test the non-finite guard.
    pub debug_nan_steps: Vec<u64>,
}

impl StepConfig {
    /// The step settings of `cfg`.
    pub fn new(cfg: &Config) -> Self {
        Self {
            micro_batch: cfg.train.micro_batch,
            seed: cfg.run.seed,
            loss: LossWeights::new(&cfg.model.moe),
            n_moe_layers: cfg.model.n_moe_layers(),
            n_experts: cfg.model.moe.n_experts,
            grad_clip: cfg.train.grad_clip,
            expert_bias_rate: cfg.train.expert_bias_rate,
            debug_nan_steps: cfg.train.debug_nan_steps.clone(),
        }
    }
}

/// A step's summed gradients and this rank's scalars, between [`Learner::accumulate`] and
/// [`Learner::apply`].
pub struct Accumulated {
    grads: HashMap<String, Tensor>,
    outcome: StepOutcome,
    /// LM loss sums and sequence counts by domain id.
    domain_sums: BTreeMap<u32, (f64, usize)>,
}

/// A point inside a step, reported to the caller as it passes (bench times them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A micro-batch's forward pass (with its loss) is done.
    Forward,
    /// A micro-batch's backward pass is done.
    Backward,
    /// The update (norm, clip, AdamW, expert bias) is done or skipped.
    Optimizer,
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// Training objective (LM + weighted aux + z), mean over micro-batches.
    pub loss: f64,
    /// LM cross-entropy, mean over micro-batches.
    pub lm_loss: f64,
    /// LM cross-entropy per domain present in the batch.
    pub domain_loss: BTreeMap<String, f64>,
    /// Load-balancing loss per MoE layer.
    pub aux_loss: Vec<f64>,
    /// Router z-loss per MoE layer.
    pub z_loss: Vec<f64>,
    /// Tokens routed to each expert, per MoE layer.
    pub tokens_per_expert: Vec<Vec<usize>>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the loss or gradient was not finite; the update was then skipped.
    pub applied: bool,
}

impl StepOutcome {
    /// max / mean tokens per expert, per MoE layer (1 = perfectly balanced).
    pub fn load_imbalance(&self) -> Vec<f64> {
        self.tokens_per_expert
            .iter()
            .map(|load| {
                let total: usize = load.iter().sum();
                if total == 0 {
                    return 0.0;
                }
                let max = load.iter().copied().max().unwrap_or(0) as f64;
                max * load.len() as f64 / total as f64
            })
            .collect()
    }
}

impl Learner {
    /// A freshly initialised model (seeded by `run.seed`) and its optimizer on `device`, as
    /// rank `comm.rank()` (which only matters with `train.shard_optimizer`).
    pub fn new(cfg: &Config, device: &Device, comm: &dyn Collective) -> Result<Self, TrainError> {
        Self::build(cfg, device, comm, None)
    }

    /// [`Learner::new`] under expert parallelism: the model holds only `ep`'s local experts
    /// (initialised as they are in the whole model) and runs them through `ep`'s exchange;
    /// expert gradients are reduced over the expert-DP group, the rest over `comm`. `ep` must
    /// outlive the learner's steps (its groups are registered on this thread).
    pub fn new_expert_parallel(
        cfg: &Config,
        device: &Device,
        comm: &dyn Collective,
        ep: &ExpertParallel,
    ) -> Result<Self, TrainError> {
        Self::build(cfg, device, comm, Some(ep))
    }

    fn build(
        cfg: &Config,
        device: &Device,
        comm: &dyn Collective,
        ep: Option<&ExpertParallel>,
    ) -> Result<Self, TrainError> {
        let (model, varmap) = match ep {
            Some(ep) => {
                let (model, varmap) = MoeTransformer::init_sharded(
                    &cfg.model,
                    cfg.run.seed,
                    DType::F32,
                    device,
                    ep.local_experts(),
                )?;
                (model.with_expert_backend(ep.backend()), varmap)
            }
            None => MoeTransformer::init(&cfg.model, cfg.run.seed, DType::F32, device)?,
        };
        let model = model.with_compute_dtype(cfg.train.precision.compute_dtype());
        let params = named_params(&varmap)?;
        let hyper = AdamWParams {
            beta1: cfg.train.beta1,
            beta2: cfg.train.beta2,
            eps: cfg.train.eps,
            weight_decay: cfg.train.weight_decay,
        };
        let optimizer: Box<dyn Optimizer + Send + Sync> = if let Some(ep) = ep {
            Box::new(ExpertParallelOptimizer::new(
                &params,
                hyper,
                &cfg.train.no_decay,
                cfg.train.shard_optimizer,
                ep.groups(),
                data_parallel::BUCKET_ELEMENTS,
            )?)
        } else if cfg.train.shard_optimizer {
            Box::new(ShardedOptimizer::new(ShardedAdamW::new(
                params.clone(),
                hyper,
                &cfg.train.no_decay,
                (comm.rank(), comm.world_size()),
                data_parallel::BUCKET_ELEMENTS,
            )?))
        } else {
            let adamw = AdamW::new(params.clone(), hyper, &cfg.train.no_decay)?;
            Box::new(ReplicatedOptimizer::new(adamw, params.clone()))
        };
        let cpu_pool = match device {
            Device::Cpu => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.run.threads)
                    .thread_name(|i| format!("moelab-cpu-{i}"))
                    .build()
                    .map_err(|e| TrainError::Argument(format!("run.threads: {e}")))?,
            ),
            _ => None,
        };
        Ok(Self {
            model,
            params,
            optimizer,
            device: device.clone(),
            cpu_pool,
            cfg: StepConfig::new(cfg),
            ep: ep.map(ExpertParallel::groups),
        })
    }

    /// Loads a checkpoint's weights and optimizer state; every tensor must fit. Under expert
    /// parallelism the checkpoint holds every expert (whatever layout wrote it) and this rank
    /// keeps its own rows.
    pub fn restore(&mut self, ckpt: &Checkpoint) -> Result<(), TrainError> {
        let in_dir = |e: TrainError| match e {
            TrainError::Checkpoint(m) => {
                TrainError::Checkpoint(format!("{}: {m}", ckpt.dir.display()))
            }
            other => other,
        };
        let (model, optimizer) = match &self.ep {
            Some(groups) => (
                local_experts(groups, &ckpt.model).map_err(in_dir)?,
                local_experts(groups, &ckpt.optimizer).map_err(in_dir)?,
            ),
            None => (ckpt.model.clone(), ckpt.optimizer.clone()),
        };
        restore_model(&self.model, &self.params, &model, &ckpt.dir)?;
        self.optimizer
            .load_state(ckpt.state.optimizer_step, &optimizer)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", ckpt.dir.display())))
    }

    /// Model tensors (parameters and expert biases) and optimizer moments, by name, as a
    /// checkpoint stores them; and the optimizer's update count. With a sharded optimizer the
    /// moments are gathered from every rank, so every rank must call it.
    pub fn checkpoint_tensors(
        &self,
        comm: &dyn Collective,
    ) -> Result<(TensorMap, TensorMap, u64), TrainError> {
        let model = model_tensors(&self.params, &self.model);
        let (step, moments) = self.optimizer.state(comm)?;
        let moments: TensorMap = moments.into_iter().collect();
        match &self.ep {
            // Every expert once, as a one-process run stores them.
            Some(groups) => Ok((
                gather_experts(groups, model)?,
                gather_experts(groups, moments)?,
                step,
            )),
            None => Ok((model, moments, step)),
        }
    }

    /// Bytes of optimizer state this rank holds.
    pub fn optimizer_state_bytes(&self) -> usize {
        self.optimizer.state_bytes()
    }

    /// Bytes of trainable parameters this rank holds (under expert parallelism, its experts
    /// only).
    pub fn parameter_bytes(&self) -> usize {
        self.params
            .iter()
            .map(|(_, v)| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }

    /// Runs step `step` (0-based) on `batch` (this rank's share of the global batch) at
    /// learning rate `lr`: [`Learner::accumulate`] then [`Learner::apply`]. Routing choices go
    /// to `router_log`, and `on_phase` is called as each phase ends. Gradients, losses and
    /// loads are summed over the ranks of `comm`, so every rank applies the same update and
    /// returns the same outcome.
    ///
    /// On the CPU in a single process the whole step runs on one of the pool's threads
    /// (`run.threads` of them), so that every kernel and GEMM inside splits its work from a pool
    /// thread: the other threads steal halves as they free up. Called from outside the pool,
    /// each of the step's few hundred parallel ops would instead park the caller and wake a
    /// worker, which cost more than the second core gave (2 threads were slower than 1 on the
    /// tiny config). A step of several micro-batches runs up to `run.threads` of them at once,
    /// one per pool thread: each one's GEMMs and kernels still split their work from the pool,
    /// but whole micro-batches keep every thread busy where one micro-batch's small ops leave a
    /// thread waiting at each op's join. Gradients are summed in micro-batch order, so the step
    /// does not depend on which thread ran what. Under MPI the step stays on the calling
    /// thread, which MPI's threading level requires of the collectives, and its micro-batches
    /// run in turn.
    pub fn step(
        &mut self,
        batch: &Batch,
        step: u64,
        lr: f64,
        comm: &dyn Collective,
        router_log: &mut RouterLogger,
        on_phase: &mut (dyn FnMut(Phase) + Send),
    ) -> Result<StepOutcome, TrainError> {
        match self.cpu_pool.take() {
            Some(pool) if comm.world_size() == 1 => {
                let lanes = self.lanes(batch.n_sequences / self.cfg.micro_batch, &pool);
                let outcome = pool.install(|| {
                    self.step_with_lanes(batch, step, lr, &Single, router_log, on_phase, lanes)
                });
                self.cpu_pool = Some(pool);
                outcome
            }
            pool => {
                self.cpu_pool = pool;
                self.step_with_lanes(batch, step, lr, comm, router_log, on_phase, 1)
            }
        }
    }

    /// [`Learner::step`] on the calling thread, `lanes` micro-batches at a time.
    #[allow(clippy::too_many_arguments)]
    fn step_with_lanes(
        &mut self,
        batch: &Batch,
        step: u64,
        lr: f64,
        comm: &dyn Collective,
        router_log: &mut RouterLogger,
        on_phase: &mut (dyn FnMut(Phase) + Send),
        lanes: usize,
    ) -> Result<StepOutcome, TrainError> {
        let accumulated = self.accumulate(batch, step, comm, router_log, on_phase, lanes)?;
        self.apply(accumulated, step, lr, comm, router_log.domains(), on_phase)
    }

    /// How many of a step's `micro_batches` run at once on `pool`: one per thread.
    fn lanes(&self, micro_batches: usize, pool: &rayon::ThreadPool) -> usize {
        pool.current_num_threads().min(micro_batches).max(1)
    }

    /// Micro-batches [`Learner::step`] runs at once for a batch of `n_sequences` in one process
    /// (1 off the CPU), so that callers timing phases know whether they overlap.
    pub fn concurrent_micro_batches(&self, n_sequences: usize) -> usize {
        match &self.cpu_pool {
            Some(pool) => self.lanes(n_sequences / self.cfg.micro_batch, pool),
            None => 1,
        }
    }

    /// Forward and backward over this rank's micro-batches of `batch`, `lanes` at a time:
    /// gradients summed in micro-batch order, each micro-batch's loss weighing 1/(micro-batches
    /// over all ranks); the routing is recorded in `router_log`. Nothing is reduced over ranks.
    pub fn accumulate(
        &self,
        batch: &Batch,
        step: u64,
        comm: &dyn Collective,
        router_log: &mut RouterLogger,
        on_phase: &mut (dyn FnMut(Phase) + Send),
        lanes: usize,
    ) -> Result<Accumulated, TrainError> {
        let micro = self.cfg.micro_batch;
        let local_micro_batches = batch.n_sequences / micro;
        let accumulation = local_micro_batches * comm.world_size();
        let (n_moe, n_experts) = (self.cfg.n_moe_layers, self.cfg.n_experts);
        let mut acc = Accumulated {
            grads: HashMap::new(),
            outcome: StepOutcome {
                loss: 0.0,
                lm_loss: 0.0,
                domain_loss: BTreeMap::new(),
                aux_loss: vec![0.0; n_moe],
                z_loss: vec![0.0; n_moe],
                tokens_per_expert: vec![vec![0; n_experts]; n_moe],
                grad_norm: 0.0,
                applied: false,
            },
            domain_sums: BTreeMap::new(),
        };
        let global_fractions = match self.cfg.loss.scope {
            BalanceScope::Global if n_moe > 0 => Some(self.route_only(batch, step, comm)?),
            _ => None,
        };
        let fractions = global_fractions.as_deref();
        let indices: Vec<usize> = (0..local_micro_batches).collect();
        for chunk in indices.chunks(lanes.max(1)) {
            let results = if let [m] = chunk {
                vec![self.micro_batch(
                    *m,
                    batch,
                    step,
                    accumulation,
                    fractions,
                    Some(&mut *on_phase),
                )]
            } else {
                chunk
                    .par_iter()
                    .map(|&m| self.micro_batch(m, batch, step, accumulation, fractions, None))
                    .collect::<Vec<_>>()
            };
            for (&m, result) in chunk.iter().zip(results) {
                if chunk.len() > 1 {
                    on_phase(Phase::Forward);
                    on_phase(Phase::Backward);
                }
                let result = result?;
                let domains = &batch.domain_ids[m * micro..(m + 1) * micro];
                // Router logs number steps like metrics: by steps completed.
                router_log.record(step + 1, &result.routing, domains, batch.seq_len)?;
                acc.add(result, &self.params, domains, 1.0 / accumulation as f64)?;
            }
        }
        Ok(acc)
    }

    /// Reduces an accumulated step over the ranks of `comm` (losses, loads, per-domain losses
    /// named by `domain_names`, gradients) and, when the loss and gradient norm are finite,
    /// clips, updates the parameters and the expert biases.
    pub fn apply(
        &mut self,
        accumulated: Accumulated,
        step: u64,
        lr: f64,
        comm: &dyn Collective,
        domain_names: &[String],
        on_phase: &mut (dyn FnMut(Phase) + Send),
    ) -> Result<StepOutcome, TrainError> {
        let Accumulated {
            grads,
            mut outcome,
            domain_sums,
        } = accumulated;
        let domain_sums = reduce_outcome(comm, &mut outcome, domain_sums, domain_names.len())?;
        outcome.domain_loss = domain_sums
            .into_iter()
            .map(|(d, (sum, n))| {
                let name = domain_names.get(d as usize).cloned();
                (name.unwrap_or_else(|| d.to_string()), sum / n as f64)
            })
            .collect();
        if self.cfg.debug_nan_steps.contains(&(step + 1)) {
            outcome.loss = f64::NAN;
        }
        outcome.grad_norm = self.optimizer.reduce(comm, grads)?;
        outcome.applied = outcome.loss.is_finite() && outcome.grad_norm.is_finite();
        if outcome.applied {
            let scale = clip_scale(outcome.grad_norm, self.cfg.grad_clip);
            self.optimizer.update(comm, lr, scale)?;
            update_expert_bias(
                &self.model,
                &outcome.tokens_per_expert,
                self.cfg.expert_bias_rate,
            )?;
        } else {
            self.optimizer.discard();
        }
        on_phase(Phase::Optimizer);
        Ok(outcome)
    }

    /// The routing pass of global balancing: every micro-batch of this rank's `batch` routed
    /// (forward without targets or backward), choices counted, and the fractions over all
    /// ranks returned.
    fn route_only(
        &self,
        batch: &Batch,
        step: u64,
        comm: &dyn Collective,
    ) -> Result<Vec<Vec<f64>>, TrainError> {
        let micro = self.cfg.micro_batch;
        let seq_len = batch.seq_len;
        let mut counts = ExpertCounts::new(self.cfg.n_moe_layers, self.cfg.n_experts);
        for m in 0..batch.n_sequences / micro {
            let rows = m * micro * seq_len..(m + 1) * micro * seq_len;
            let input = Tensor::from_slice(&batch.tokens[rows], (micro, seq_len), &self.device)?;
            let out = self
                .model
                .forward(&input, None, self.forward_options(step))?;
            counts.add_routing(&out.routing)?;
        }
        Ok(counts.global_fractions(comm))
    }

    fn forward_options(&self, step: u64) -> ForwardOptions {
        ForwardOptions {
            step: Some(step),
            seed: self.cfg.seed,
        }
    }

    /// Forward and backward of micro-batch `m` of `batch`: its gradients (by parameter, in
    /// `self.params` order, detached so that its graph is freed here), its losses and routing.
    /// `on_phase` hears the end of the forward and of the backward when given.
    fn micro_batch(
        &self,
        m: usize,
        batch: &Batch,
        step: u64,
        accumulation: usize,
        global_fractions: Option<&[Vec<f64>]>,
        mut on_phase: Option<&mut (dyn FnMut(Phase) + Send)>,
    ) -> Result<MicroBatchResult, TrainError> {
        let micro = self.cfg.micro_batch;
        let rows = m * micro * batch.seq_len..(m + 1) * micro * batch.seq_len;
        let shape = (micro, batch.seq_len);
        let input = Tensor::from_slice(&batch.tokens[rows.clone()], shape, &self.device)?;
        let target = Tensor::from_slice(&batch.targets[rows], shape, &self.device)?;
        let out = self
            .model
            .forward(&input, Some(&target), self.forward_options(step))?;
        let objective = loss::objective(&out, self.cfg.loss, global_fractions)?;
        if let Some(f) = on_phase.as_mut() {
            f(Phase::Forward);
        }
        let micro_grads = (&objective.loss / accumulation as f64)?.backward()?;
        let grads = self
            .params
            .iter()
            .map(|(_, var)| micro_grads.get(var.as_tensor()).map(Tensor::detach))
            .collect();
        drop(micro_grads);
        if let Some(f) = on_phase.as_mut() {
            f(Phase::Backward);
        }
        let token_losses = out.token_losses.as_ref().ok_or_else(|| {
            TrainError::Argument(
                "the model returned no per-token loss for a batch with targets".into(),
            )
        })?;
        let per_sequence = token_losses
            .mean(1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        Ok(MicroBatchResult {
            grads,
            losses: objective.values()?,
            per_sequence,
            routing: out.routing.into_iter().map(detached).collect(),
        })
    }
}

impl Accumulated {
    /// Adds one micro-batch's result (its sequences from `domains`), its losses weighing
    /// `share`.
    fn add(
        &mut self,
        result: MicroBatchResult,
        params: &[(String, Var)],
        domains: &[u32],
        share: f64,
    ) -> Result<(), TrainError> {
        for ((name, _), g) in params.iter().zip(result.grads) {
            let Some(g) = g else { continue };
            let sum = match self.grads.remove(name) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            self.grads.insert(name.clone(), sum);
        }
        let (outcome, losses) = (&mut self.outcome, &result.losses);
        outcome.loss += losses.loss * share;
        outcome.lm_loss += losses.lm * share;
        for (total, value) in outcome.aux_loss.iter_mut().zip(&losses.balance) {
            *total += value * share;
        }
        for (total, value) in outcome.z_loss.iter_mut().zip(&losses.z) {
            *total += value * share;
        }
        for (&d, loss) in domains.iter().zip(&result.per_sequence) {
            let entry = self.domain_sums.entry(d).or_insert((0.0, 0));
            entry.0 += loss;
            entry.1 += 1;
        }
        for (load, record) in outcome.tokens_per_expert.iter_mut().zip(&result.routing) {
            for (total, n) in load.iter_mut().zip(&record.tokens_per_expert) {
                *total += n;
            }
        }
        Ok(())
    }
}

/// What one micro-batch's forward and backward leave for the step.
struct MicroBatchResult {
    /// Gradient per parameter (in `Learner::params` order), `None` where it has none.
    grads: Vec<Option<Tensor>>,
    /// The objective and its terms.
    losses: LossValues,
    /// Mean LM loss of each sequence.
    per_sequence: Vec<f64>,
    /// The routing, cut from the graph.
    routing: Vec<LayerRouting>,
}

/// `r` with every tensor detached, so that holding it keeps no graph alive.
fn detached(r: LayerRouting) -> LayerRouting {
    LayerRouting {
        expert_ids: r.expert_ids.detach(),
        gate_weights: r.gate_weights.detach(),
        router_probs: r.router_probs.detach(),
        kept: r.kept.map(|k| k.detach()),
        aux_loss: r.aux_loss.detach(),
        z_loss: r.z_loss.detach(),
        ..r
    }
}

/// Sums the step's scalars over ranks: each rank holds its micro-batches' shares of the mean
/// losses, its tokens per expert and its per-domain loss sums and sequence counts (by domain
/// id, `n_domains` of them). Returns the summed per-domain (loss sum, sequences).
fn reduce_outcome(
    comm: &dyn Collective,
    outcome: &mut StepOutcome,
    domain_sums: BTreeMap<u32, (f64, usize)>,
    n_domains: usize,
) -> Result<BTreeMap<u32, (f64, usize)>, TrainError> {
    if comm.world_size() == 1 {
        return Ok(domain_sums);
    }
    let n_moe = outcome.aux_loss.len();
    let mut packed = vec![outcome.loss, outcome.lm_loss];
    packed.extend(&outcome.aux_loss);
    packed.extend(&outcome.z_loss);
    for load in &outcome.tokens_per_expert {
        packed.extend(load.iter().map(|&n| n as f64));
    }
    let domains_at = packed.len();
    packed.resize(domains_at + 2 * n_domains, 0.0);
    for (&d, &(sum, n)) in &domain_sums {
        let d = d as usize;
        if d >= n_domains {
            return Err(TrainError::Argument(format!(
                "a batch holds domain id {d} but the dataset has {n_domains} domains"
            )));
        }
        packed[domains_at + 2 * d] = sum;
        packed[domains_at + 2 * d + 1] = n as f64;
    }
    comm.all_reduce_f64(&mut packed);
    outcome.loss = packed[0];
    outcome.lm_loss = packed[1];
    outcome.aux_loss.copy_from_slice(&packed[2..2 + n_moe]);
    outcome
        .z_loss
        .copy_from_slice(&packed[2 + n_moe..2 + 2 * n_moe]);
    let mut at = 2 + 2 * n_moe;
    for load in &mut outcome.tokens_per_expert {
        for n in load.iter_mut() {
            *n = packed[at].round() as usize;
            at += 1;
        }
    }
    Ok((0..n_domains)
        .filter_map(|d| {
            let sequences = packed[domains_at + 2 * d + 1].round() as usize;
            (sequences > 0).then(|| (d as u32, (packed[domains_at + 2 * d], sequences)))
        })
        .collect())
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
                let sign = if gap > 0.0 {
                    1.0
                } else if gap < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                (rate * sign) as f32
            })
            .collect();
        let delta = Tensor::from_vec(delta, load.len(), bias.device())?.to_dtype(bias.dtype())?;
        bias.set(&(bias.as_tensor() + delta)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use moelab_io::rng::SplitMix64;

    fn batch(cfg: &Config, seed: u64) -> Batch {
        let sequences = cfg.global_sequences();
        let seq_len = cfg.data.seq_len;
        let mut rng = SplitMix64::new(seed);
        let mut ids = || -> Vec<u32> {
            (0..sequences * seq_len)
                .map(|_| (rng.next_u64() % cfg.model.vocab_size as u64) as u32)
                .collect()
        };
        Batch {
            tokens: ids(),
            targets: ids(),
            domain_ids: (0..sequences as u32).map(|i| i % 2).collect(),
            source_ids: vec![0; sequences],
            n_sequences: sequences,
            seq_len,
        }
    }

    fn router_log(cfg: &Config) -> RouterLogger {
        let layers = (0..cfg.model.n_layers)
            .filter(|&l| cfg.model.is_moe_layer(l))
            .collect();
        RouterLogger::new(
            layers,
            vec!["a".into(), "b".into()],
            cfg.model.moe.n_experts,
            cfg.model.moe.top_k,
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Micro-batches run at once on the pool's threads give the step they give one after the
    /// other: the same outcome and the same weights, bit for bit.
    #[test]
    fn concurrent_micro_batches_match_sequential_ones_bit_for_bit() {
        let mut cfg: Config = toml::from_str(crate::config::tests::TEXT).unwrap();
        cfg.run.threads = 2;
        assert_eq!(cfg.accumulation_steps(), 2);
        let mut weights = Vec::new();
        let mut outcomes = Vec::new();
        for concurrent in [true, false] {
            let mut learner = Learner::new(&cfg, &Device::Cpu, &Single).unwrap();
            if concurrent {
                assert_eq!(learner.concurrent_micro_batches(cfg.global_sequences()), 2);
            }
            let mut log = router_log(&cfg);
            let mut phases = Vec::new();
            for step in 0..3 {
                let b = batch(&cfg, step);
                let mut on_phase = |p: Phase| phases.push(p);
                let outcome = if concurrent {
                    learner.step(&b, step, 1e-2, &Single, &mut log, &mut on_phase)
                } else {
                    // On the calling thread, one micro-batch after the other.
                    learner.step_with_lanes(&b, step, 1e-2, &Single, &mut log, &mut on_phase, 1)
                }
                .unwrap();
                assert!(outcome.applied);
                outcomes.push(format!("{outcome:?}"));
            }
            // Both report each micro-batch's forward and backward, then the update.
            assert_eq!(phases.len(), 3 * 5);
            assert_eq!(phases.iter().filter(|&&p| p == Phase::Optimizer).count(), 3);
            let w: Vec<Vec<f32>> = learner
                .params
                .iter()
                .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            weights.push(w);
        }
        assert_eq!(outcomes[..3], outcomes[3..]);
        assert!(weights[0] == weights[1], "weights differ after 3 steps");
    }
}
