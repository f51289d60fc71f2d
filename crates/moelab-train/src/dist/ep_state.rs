//! What training under expert parallelism keeps per rank, beyond the exchange: the optimizer
//! split into the replicated parameters (reduced over every rank) and this rank's experts
//! (reduced over the expert-DP group only), and the checkpoint tensors, gathered into the
//! whole model on save and cut back to this rank's experts on restore, so a checkpoint does not
//! depend on the layout it was written at.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::expert_parallel::{is_expert_param, EpGroups, ExchangeGroup};
use super::Collective;
use crate::optim::{
    AdamW, AdamWParams, Optimizer, ReplicatedOptimizer, ShardedAdamW, ShardedOptimizer,
};
use crate::TrainError;

/// Two optimizers behind one [`Optimizer`]: the replicated parameters' over the world
/// communicator the learner passes, this rank's experts' over its expert-DP group (found by id:
/// the optimizer must be Send + Sync, which a communicator is not). With
/// `train.shard_optimizer` each is ZeRO-1 over its own group.
pub struct ExpertParallelOptimizer {
    replicated: Box<dyn Optimizer + Send + Sync>,
    experts: Box<dyn Optimizer + Send + Sync>,
    groups: EpGroups,
}

impl ExpertParallelOptimizer {
    /// Optimises `params` (this rank's: its experts' stacked tensors hold only its rows) as
    /// world rank `groups.rank`; `shard` = ZeRO-1 with buckets of `bucket_elements`.
    pub fn new(
        params: &[(String, Var)],
        hyper: AdamWParams,
        no_decay: &[String],
        shard: bool,
        groups: EpGroups,
        bucket_elements: usize,
    ) -> Result<Self, TrainError> {
        let (experts, replicated): (Vec<_>, Vec<_>) = params
            .iter()
            .cloned()
            .partition(|(name, _)| is_expert_param(name));
        let layout = groups.layout;
        let world = (groups.rank, layout.world_size);
        let expert_dp = (
            layout.group_of(groups.rank),
            layout.world_size / layout.expert_parallel,
        );
        let build = |params: Vec<(String, Var)>,
                     (rank, size): (usize, usize)|
         -> Result<Box<dyn Optimizer + Send + Sync>, TrainError> {
            Ok(if shard {
                Box::new(ShardedOptimizer::new(ShardedAdamW::new(
                    params,
                    hyper.clone(),
                    no_decay,
                    (rank, size),
                    bucket_elements,
                )?))
            } else {
                let adamw = AdamW::new(params.clone(), hyper.clone(), no_decay)?;
                Box::new(ReplicatedOptimizer::new(adamw, params))
            })
        };
        Ok(Self {
            replicated: build(replicated, world)?,
            experts: build(experts, expert_dp)?,
            groups,
        })
    }
}

/// Splits `tensors` into (experts', the others') by name (`m.`/`v.` prefixes included).
fn split_experts(
    tensors: HashMap<String, Tensor>,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    tensors
        .into_iter()
        .partition(|(name, _)| is_expert_param(name))
}

impl Optimizer for ExpertParallelOptimizer {
    fn reduce(
        &mut self,
        comm: &dyn Collective,
        grads: HashMap<String, Tensor>,
    ) -> Result<f64, TrainError> {
        let (experts, replicated) = split_experts(grads);
        let replicated_norm = self.replicated.reduce(comm, replicated)?;
        let experts_opt = &mut self.experts;
        let expert_norm =
            ExchangeGroup::with(self.groups.expert_dp, |dp| experts_opt.reduce(dp, experts))?;
        // Every rank of the EP group holds other experts: their squares add up once each.
        let mut squares = [expert_norm * expert_norm];
        ExchangeGroup::with(self.groups.ep, |ep| {
            ep.all_reduce_f64(&mut squares);
            Ok(())
        })?;
        Ok((replicated_norm * replicated_norm + squares[0]).sqrt())
    }

    fn update(
        &mut self,
        comm: &dyn Collective,
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), TrainError> {
        self.replicated.update(comm, lr, grad_scale)?;
        let experts = &mut self.experts;
        ExchangeGroup::with(self.groups.expert_dp, |dp| {
            experts.update(dp, lr, grad_scale)
        })
    }

    fn discard(&mut self) {
        self.replicated.discard();
        self.experts.discard();
    }

    fn state(&self, comm: &dyn Collective) -> Result<(u64, Vec<(String, Tensor)>), TrainError> {
        let (step, mut tensors) = self.replicated.state(comm)?;
        let (_, experts) = ExchangeGroup::with(self.groups.expert_dp, |dp| self.experts.state(dp))?;
        tensors.extend(experts);
        Ok((step, tensors))
    }

    fn load_state(&mut self, step: u64, tensors: &HashMap<String, Tensor>) -> Result<(), String> {
        let (experts, replicated) = split_experts(tensors.clone());
        self.replicated.load_state(step, &replicated)?;
        self.experts.load_state(step, &experts)
    }

    fn state_bytes(&self) -> usize {
        self.replicated.state_bytes() + self.experts.state_bytes()
    }
}

/// The whole layer's stacked expert tensors from every rank's rows: each expert tensor of
/// `tensors` (this rank's E/G experts) is all-gathered over the EP group in rank order, which
/// is expert order. Every rank of the EP group must call it (names are taken in sorted order).
pub fn gather_experts(
    groups: &EpGroups,
    mut tensors: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let mut names: Vec<String> = tensors
        .keys()
        .filter(|n| is_expert_param(n))
        .cloned()
        .collect();
    names.sort();
    for name in names {
        let Some(local) = tensors.remove(&name) else {
            continue;
        };
        let mut dims = local.dims().to_vec();
        let Some(first) = dims.first_mut() else {
            return Err(TrainError::Checkpoint(format!(
                "expert tensor `{name}` is a scalar"
            )));
        };
        *first *= groups.layout.expert_parallel;
        let flat = local.flatten_all()?;
        let all = ExchangeGroup::with(groups.ep, |ep| ep.all_gather_tensor(&flat))?;
        tensors.insert(name, all.reshape(dims)?);
    }
    Ok(tensors)
}

/// Cuts every expert tensor of a checkpoint's `tensors` (the whole layer's E experts) down to
/// this rank's rows; the error names a tensor whose expert count is not the config's.
pub fn local_experts(
    groups: &EpGroups,
    tensors: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let range = groups.local_experts();
    let n_experts = groups.layout.n_experts;
    tensors
        .iter()
        .map(|(name, t)| {
            if !is_expert_param(name) {
                return Ok((name.clone(), t.clone()));
            }
            if t.dims().first() != Some(&n_experts) {
                return Err(TrainError::Checkpoint(format!(
                    "tensor `{name}` has shape {:?}; the config's model.moe.n_experts = {n_experts} experts should be its first dimension",
                    t.dims()
                )));
            }
            let mine = t.narrow(0, range.start, range.len())?.contiguous()?;
            Ok((name.clone(), mine))
        })
        .collect()
}
