//! The training step, the one piece of code `moelab train` and `moelab bench` both run:
//! forward and backward over the batch's micro-batches (gradients summed), the global gradient
//! norm, and, when the loss and gradient are finite, clipping, AdamW and the expert-bias update.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use moelab_data::Batch;
use moelab_model::moe::{global_balance_loss, LayerRouting};
use moelab_model::{BalanceScope, ForwardOptions, MoeTransformer};
use rayon::prelude::*;

use super::checkpoint::Checkpoint;
use crate::balance::ExpertCounts;
use crate::dist::{data_parallel, Collective, Single};
use crate::optim::{clip_scale, AdamW, AdamWParams, ShardedAdamW};
use crate::routing_counts::RouterAccumulator;
use crate::{Config, TrainError};

/// Tensors by name.
pub type TensorMap = HashMap<String, Tensor>;

/// The model with its trainable parameters (sorted by name) and optimizer.
pub struct Learner {
    /// The model (compute dtype from `train.precision`, f32 master weights).
    pub model: MoeTransformer,
    params: Vec<(String, Var)>,
    optimizer: Optimizer,
    device: Device,
    /// On the CPU, the threads the step runs on (see [`Learner::step`]).
    cpu_pool: Option<rayon::ThreadPool>,
}

/// Every parameter's moments, or this rank's share of them (`train.shard_optimizer`).
enum Optimizer {
    Full(AdamW),
    Sharded(ShardedAdamW),
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
        let (model, varmap) = MoeTransformer::init(&cfg.model, cfg.run.seed, DType::F32, device)?;
        let model = model.with_compute_dtype(cfg.train.precision.compute_dtype());
        let params = super::named_params(&varmap)?;
        let hyper = AdamWParams {
            beta1: cfg.train.beta1,
            beta2: cfg.train.beta2,
            eps: cfg.train.eps,
            weight_decay: cfg.train.weight_decay,
        };
        let optimizer = if cfg.train.shard_optimizer {
            Optimizer::Sharded(ShardedAdamW::new(
                params.clone(),
                hyper,
                &cfg.train.no_decay,
                (comm.rank(), comm.world_size()),
                data_parallel::BUCKET_ELEMENTS,
            )?)
        } else {
            Optimizer::Full(AdamW::new(params.clone(), hyper, &cfg.train.no_decay)?)
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
        })
    }

    /// Loads a checkpoint's weights and optimizer state; every tensor must fit.
    pub fn restore(&mut self, ckpt: &Checkpoint) -> Result<(), TrainError> {
        super::restore_model(&self.model, &self.params, &ckpt.model, &ckpt.dir)?;
        let step = ckpt.state.optimizer_step;
        match &mut self.optimizer {
            Optimizer::Full(adamw) => adamw.load_state(step, &ckpt.optimizer),
            Optimizer::Sharded(sharded) => sharded.load_state(step, &ckpt.optimizer),
        }
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", ckpt.dir.display())))
    }

    /// Model tensors (parameters and expert biases) and optimizer moments, by name, as a
    /// checkpoint stores them; and the optimizer's update count. With a sharded optimizer the
    /// moments are gathered from every rank, so every rank must call it.
    pub fn checkpoint_tensors(
        &self,
        comm: &dyn Collective,
    ) -> Result<(TensorMap, TensorMap, u64), TrainError> {
        let model = super::model_tensors(&self.params, &self.model);
        let (step, moments) = match &self.optimizer {
            Optimizer::Full(adamw) => adamw.state()?,
            Optimizer::Sharded(sharded) => sharded.state(comm)?,
        };
        Ok((model, moments.into_iter().collect(), step))
    }

    /// Bytes of optimizer state this rank holds.
    pub fn optimizer_state_bytes(&self) -> usize {
        match &self.optimizer {
            Optimizer::Full(adamw) => adamw.state_bytes(),
            Optimizer::Sharded(sharded) => sharded.state_bytes(),
        }
    }

    /// The routing pass of global balancing: every micro-batch of this rank's `batch` routed
    /// (forward without targets or backward), choices counted, and the fractions over all
    /// ranks returned.
    fn route_only(
        &self,
        batch: &Batch,
        step: u64,
        cfg: &Config,
        comm: &dyn Collective,
    ) -> Result<Vec<Vec<f64>>, TrainError> {
        let micro = cfg.train.micro_batch;
        let seq_len = batch.seq_len;
        let mut counts = ExpertCounts::new(cfg.model.n_moe_layers(), cfg.model.moe.n_experts);
        for m in 0..batch.n_sequences / micro {
            let rows = m * micro * seq_len..(m + 1) * micro * seq_len;
            let input = Tensor::from_slice(&batch.tokens[rows], (micro, seq_len), &self.device)?;
            let out = self.model.forward(
                &input,
                None,
                ForwardOptions {
                    step: Some(step),
                    seed: cfg.run.seed,
                },
            )?;
            counts.add_routing(&out.routing)?;
        }
        Ok(counts.global_fractions(comm))
    }

    /// Runs step `step` (0-based) on `batch` (this rank's share of the global batch) at
    /// learning rate `lr`; routing choices go to `router_log`, and `on_phase` is called as each
    /// phase ends. Gradients, losses and loads are summed over the ranks of `comm`, so every
    /// rank applies the same update and returns the same outcome.
    ///
    /// On the CPU in a single process the whole step runs on one of the pool's threads
    /// (`run.threads` of them), so that every kernel and GEMM inside splits its work from a pool
    /// thread: the other threads steal halves as they free up. Called from outside the pool,
    /// each of the step's few hundred parallel ops would instead park the caller and wake a
    /// worker, which cost more than the second core gave (2 threads were slower than 1 on the
    /// tiny config). A step of several micro-batches runs up to `run.threads` of them at once,
    /// one per pool thread: each one's GEMMs and kernels still split their work from the pool,
    /// but whole micro-batches keep every thread busy where one micro-batch's small ops leave a
    /// thread waiting at each op's join (tiny.toml's 2 micro-batches on 2 cores: 150-167 ms
    /// against about 196 ms one after the other). Gradients are summed in micro-batch order, so the step does not depend
    /// on which thread ran what. Under MPI the step stays on the calling thread, which MPI's
    /// threading level requires of the collectives, and its micro-batches run in turn.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        batch: &Batch,
        step: u64,
        lr: f64,
        cfg: &Config,
        comm: &dyn Collective,
        router_log: &mut RouterAccumulator,
        on_phase: &mut (dyn FnMut(Phase) + Send),
    ) -> Result<StepOutcome, TrainError> {
        match self.cpu_pool.take() {
            Some(pool) if comm.world_size() == 1 => {
                let lanes = self.lanes(batch.n_sequences / cfg.train.micro_batch, &pool);
                let outcome = pool.install(|| {
                    self.step_here(batch, step, lr, cfg, &Single, router_log, on_phase, lanes)
                });
                self.cpu_pool = Some(pool);
                outcome
            }
            pool => {
                self.cpu_pool = pool;
                self.step_here(batch, step, lr, cfg, comm, router_log, on_phase, 1)
            }
        }
    }

    /// Forward and backward of micro-batch `m` of `batch`: its gradients (by parameter, in
    /// `self.params` order, detached so that its graph is freed here), its scalars and routing.
    /// `on_phase` hears the end of the forward and of the backward when given.
    #[allow(clippy::too_many_arguments)]
    fn micro_batch(
        &self,
        m: usize,
        batch: &Batch,
        step: u64,
        cfg: &Config,
        accumulation: usize,
        global_fractions: Option<&[Vec<f64>]>,
        mut on_phase: Option<&mut (dyn FnMut(Phase) + Send)>,
    ) -> Result<MicroBatchResult, TrainError> {
        let micro = cfg.train.micro_batch;
        let seq_len = batch.seq_len;
        let rows = m * micro * seq_len..(m + 1) * micro * seq_len;
        let shape = (micro, seq_len);
        let input = Tensor::from_slice(&batch.tokens[rows.clone()], shape, &self.device)?;
        let target = Tensor::from_slice(&batch.targets[rows], shape, &self.device)?;
        let out = self.model.forward(
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
            return Err(TrainError::Argument(
                "the model returned no loss for a batch with targets".into(),
            ));
        };
        // Global balancing: the model's micro-batch aux loss (reported only, no gradient) is
        // replaced in the objective by the loss against the step's global fractions.
        let (loss, aux_losses) = match global_fractions {
            Some(fractions) => {
                let global = out
                    .routing
                    .iter()
                    .zip(fractions)
                    .map(|(r, f)| global_balance_loss(&r.router_probs, f))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let coef = cfg.model.moe.aux_loss_coef;
                let total = Tensor::stack(&global, 0)?
                    .sum_all()?
                    .to_dtype(loss.dtype())?;
                let objective = ((loss - (&out.aux_loss * coef)?)? + (total * coef)?)?;
                (objective, global)
            }
            None => (
                loss.clone(),
                out.routing.iter().map(|r| r.aux_loss.clone()).collect(),
            ),
        };
        if let Some(f) = on_phase.as_mut() {
            f(Phase::Forward);
        }
        let micro_grads = (&loss / accumulation as f64)?.backward()?;
        let grads = self
            .params
            .iter()
            .map(|(_, var)| micro_grads.get(var.as_tensor()).map(Tensor::detach))
            .collect();
        drop(micro_grads);
        if let Some(f) = on_phase.as_mut() {
            f(Phase::Backward);
        }
        // One host copy for all scalars of the micro-batch.
        let mut scalars = vec![loss.clone(), lm_loss.clone()];
        scalars.extend(aux_losses);
        scalars.extend(out.routing.iter().map(|r| r.z_loss.clone()));
        let scalars = Tensor::stack(&scalars, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let per_sequence = token_losses
            .mean(1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let routing = out.routing.into_iter().map(detached).collect();
        Ok(MicroBatchResult {
            grads,
            scalars,
            per_sequence,
            routing,
        })
    }

    /// How many of a step's `micro_batches` run at once on `pool`: one per thread.
    fn lanes(&self, micro_batches: usize, pool: &rayon::ThreadPool) -> usize {
        pool.current_num_threads().min(micro_batches).max(1)
    }

    /// Micro-batches [`Learner::step`] runs at once for a batch of `n_sequences` in one process
    /// (1 off the CPU), so that callers timing phases know whether they overlap.
    pub fn concurrent_micro_batches(&self, n_sequences: usize, cfg: &Config) -> usize {
        match &self.cpu_pool {
            Some(pool) => self.lanes(n_sequences / cfg.train.micro_batch, pool),
            None => 1,
        }
    }

    /// [`Learner::step`] on the calling thread, `lanes` micro-batches at a time.
    #[allow(clippy::too_many_arguments)]
    fn step_here(
        &mut self,
        batch: &Batch,
        step: u64,
        lr: f64,
        cfg: &Config,
        comm: &dyn Collective,
        router_log: &mut RouterAccumulator,
        on_phase: &mut (dyn FnMut(Phase) + Send),
        lanes: usize,
    ) -> Result<StepOutcome, TrainError> {
        let micro = cfg.train.micro_batch;
        let seq_len = batch.seq_len;
        // Micro-batches of the whole step, over all ranks: each one's loss weighs 1/accumulation.
        let accumulation = batch.n_sequences / micro * comm.world_size();
        let local_micro_batches = batch.n_sequences / micro;
        let n_moe = cfg.model.n_moe_layers();
        let n_experts = cfg.model.moe.n_experts;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut outcome = StepOutcome {
            loss: 0.0,
            lm_loss: 0.0,
            domain_loss: BTreeMap::new(),
            aux_loss: vec![0.0; n_moe],
            z_loss: vec![0.0; n_moe],
            tokens_per_expert: vec![vec![0; n_experts]; n_moe],
            grad_norm: 0.0,
            applied: false,
        };
        let mut domain_sums: BTreeMap<u32, (f64, usize)> = BTreeMap::new();
        let share = 1.0 / accumulation as f64;
        let global_fractions = match cfg.model.moe.aux_loss_scope {
            BalanceScope::Global if n_moe > 0 => Some(self.route_only(batch, step, cfg, comm)?),
            _ => None,
        };
        // Micro-batches run `lanes` at a time (see [`Learner::step`]) and are summed in order,
        // so the step is the same whichever thread ran which micro-batch.
        let indices: Vec<usize> = (0..local_micro_batches).collect();
        for chunk in indices.chunks(lanes.max(1)) {
            let results = if let [m] = chunk {
                vec![self.micro_batch(
                    *m,
                    batch,
                    step,
                    cfg,
                    accumulation,
                    global_fractions.as_deref(),
                    Some(&mut *on_phase),
                )]
            } else {
                let this = &*self;
                let fractions = global_fractions.as_deref();
                chunk
                    .par_iter()
                    .map(|&m| this.micro_batch(m, batch, step, cfg, accumulation, fractions, None))
                    .collect::<Vec<_>>()
            };
            for (&m, result) in chunk.iter().zip(results) {
                let result = result?;
                for ((name, _), g) in self.params.iter().zip(result.grads) {
                    let Some(g) = g else { continue };
                    let sum = match grads.remove(name) {
                        Some(acc) => (acc + g)?,
                        None => g,
                    };
                    grads.insert(name.clone(), sum);
                }
                if chunk.len() > 1 {
                    on_phase(Phase::Forward);
                    on_phase(Phase::Backward);
                }
                let values = result.scalars;
                outcome.loss += values[0] * share;
                outcome.lm_loss += values[1] * share;
                for l in 0..n_moe {
                    outcome.aux_loss[l] += values[2 + l] * share;
                    outcome.z_loss[l] += values[2 + n_moe + l] * share;
                }
                let domains = &batch.domain_ids[m * micro..(m + 1) * micro];
                for (&d, loss) in domains.iter().zip(result.per_sequence) {
                    let entry = domain_sums.entry(d).or_insert((0.0, 0));
                    entry.0 += loss;
                    entry.1 += 1;
                }
                for (l, record) in result.routing.iter().enumerate() {
                    for (total, n) in outcome.tokens_per_expert[l]
                        .iter_mut()
                        .zip(&record.tokens_per_expert)
                    {
                        *total += n;
                    }
                }
                // Router logs number steps like metrics: by steps completed.
                router_log.record(step + 1, &result.routing, domains, seq_len)?;
            }
        }
        let names = router_log.domains();
        let domain_sums = reduce_outcome(comm, &mut outcome, domain_sums, names.len())?;
        outcome.domain_loss = domain_sums
            .into_iter()
            .map(|(d, (sum, n))| {
                let name = names.get(d as usize).cloned();
                (name.unwrap_or_else(|| d.to_string()), sum / n as f64)
            })
            .collect();
        if cfg.train.debug_nan_steps.contains(&(step + 1)) {
            outcome.loss = f64::NAN;
        }
        let shards = match &self.optimizer {
            Optimizer::Full(adamw) => {
                data_parallel::all_reduce_gradients(comm, &self.params, &mut grads)?;
                outcome.grad_norm = adamw.grad_norm(&grads)?;
                None
            }
            Optimizer::Sharded(sharded) => {
                let shards = sharded.reduce_scatter(comm, &grads)?;
                grads.clear();
                outcome.grad_norm = sharded.grad_norm(comm, &shards)?;
                Some(shards)
            }
        };
        outcome.applied = outcome.loss.is_finite() && outcome.grad_norm.is_finite();
        if outcome.applied {
            let scale = clip_scale(outcome.grad_norm, cfg.train.grad_clip);
            match (&mut self.optimizer, shards) {
                (Optimizer::Sharded(sharded), Some(shards)) => {
                    sharded.step(comm, &shards, lr, scale)?
                }
                (Optimizer::Full(adamw), _) => adamw.step(&grads, lr, scale)?,
                (Optimizer::Sharded(_), None) => {}
            }
            update_expert_bias(
                &self.model,
                &outcome.tokens_per_expert,
                cfg.train.expert_bias_rate,
            )?;
        }
        on_phase(Phase::Optimizer);
        Ok(outcome)
    }
}

/// What one micro-batch's forward and backward leave for the step.
struct MicroBatchResult {
    /// Gradient per parameter (in `Learner::params` order), `None` where it has none.
    grads: Vec<Option<Tensor>>,
    /// Objective, LM loss, aux loss per MoE layer, z-loss per MoE layer.
    scalars: Vec<f64>,
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
    use moelab_model::rng::SplitMix64;

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

    fn router_log(cfg: &Config) -> RouterAccumulator {
        let layers = (0..cfg.model.n_layers)
            .filter(|&l| cfg.model.is_moe_layer(l))
            .collect();
        RouterAccumulator::new(
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
                assert_eq!(
                    learner.concurrent_micro_batches(cfg.global_sequences(), &cfg),
                    2
                );
            }
            let mut log = router_log(&cfg);
            let mut phases = Vec::new();
            for step in 0..3 {
                let b = batch(&cfg, step);
                let mut on_phase = |p: Phase| phases.push(p);
                let outcome = if concurrent {
                    learner.step(&b, step, 1e-2, &cfg, &Single, &mut log, &mut on_phase)
                } else {
                    // On the calling thread, one micro-batch after the other.
                    learner.step_here(&b, step, 1e-2, &cfg, &Single, &mut log, &mut on_phase, 1)
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
