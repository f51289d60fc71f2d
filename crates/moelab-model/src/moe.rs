//! The mixture-of-experts feed-forward: router, balancing losses, dispatch to SwiGLU experts.
//!
//! Dispatch is permute -> grouped GEMM -> un-permute: the chosen (token, slot) pairs are sorted by
//! expert once, every expert multiplies its contiguous rows through `grouped_matmul`, and the
//! gated outputs are added back to their tokens (`moe_dispatch::unpermute`, the combine fused in).
//!
//! On the CPU (and on CUDA with `run.kernels = "composed"`, a capacity factor, or per-sequence
//! balancing) the chosen expert ids are copied to the host, which builds the permutation and the
//! per-expert row counts. On CUDA otherwise the routing stays on the device: `router_topk` picks
//! the experts and counts them, the counts are the layer's one host copy (the grouped GEMM's
//! group sizes), and `moe_plan` builds the permutation from the ids on the device.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use moelab_kernels::moe_dispatch;

use crate::config::{BalanceScope, ModelConfig, MoeConfig, RouterKind};
use crate::layers::{Linear, SwiGlu};
use moelab_io::rng::SplitMix64;

/// What one MoE layer decided for one micro-batch: the record router logging and traces consume.
///
/// Tokens are numbered row-major over (batch, seq). All tensors are detached from autograd except
/// the two losses (and `router_probs` under `aux_loss_scope = "global"`).
#[derive(Debug, Clone)]
pub struct LayerRouting {
    /// Index of the block this layer belongs to.
    pub layer: usize,
    /// (tokens, k) u32: the chosen experts, best first; k distinct ids per token.
    pub expert_ids: Tensor,
    /// (tokens, k): the gate weight each chosen expert's output is scaled by.
    pub gate_weights: Tensor,
    /// (tokens, n_experts): the router's distribution over experts (sigmoid scores normalised).
    pub router_probs: Tensor,
    /// (tokens, k) u8, only with a capacity factor: 1 where the assignment was processed, 0 where
    /// it overflowed its expert and was dropped.
    pub kept: Option<Tensor>,
    /// Assignments each expert processed in this micro-batch (after any capacity drop).
    pub tokens_per_expert: Vec<usize>,
    /// Assignments dropped by the capacity limit.
    pub dropped: usize,
    /// Load-balancing loss E * sum_i f_i P_i of this layer (differentiable, unweighted).
    pub aux_loss: Tensor,
    /// Router z-loss mean(logsumexp(logits)^2) of this layer (differentiable, unweighted).
    pub z_loss: Tensor,
}

/// How the router is perturbed for one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct RoutingNoise {
    /// Weight of the learned logits; the random logits get `1 - alpha`.
    pub alpha: f64,
    /// Seed of this layer's random logits for this step.
    pub seed: u64,
}

/// The learned router: a linear map to one logit per expert, plus the optional selection bias.
#[derive(Debug, Clone)]
pub struct Router {
    weight: Linear,
    /// Added to scores for choosing experts only; never to the gates (auxiliary-loss-free
    /// balancing). Not a trainable parameter: the trainer updates it from observed loads.
    expert_bias: Option<Var>,
    kind: RouterKind,
    top_k: usize,
    renormalize: bool,
    scope: BalanceScope,
    /// Whether this router may route on the device (no capacity limit, whose slot-ordered drops
    /// are planned on the host, and no per-sequence balancing, which needs every id).
    device_routing: bool,
}

/// The router's decision, still attached to autograd where the gradient flows.
#[derive(Debug, Clone)]
pub struct RouterDecision {
    /// (tokens, k) u32 chosen experts.
    pub expert_ids: Tensor,
    /// The same ids on the host, row-major; None when they were chosen on the device and never
    /// copied (see the module docs).
    pub expert_ids_host: Option<Vec<u32>>,
    /// Assignments per expert (the histogram of the ids).
    pub counts: Vec<usize>,
    /// (tokens, k) differentiable gate weights.
    pub gates: Tensor,
    /// (tokens, n_experts) differentiable router distribution.
    pub probs: Tensor,
    /// Load-balancing loss (differentiable).
    pub aux_loss: Tensor,
    /// Router z-loss (differentiable).
    pub z_loss: Tensor,
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    ((x.neg()?.exp()? + 1.0)?).recip()
}

impl Router {
    /// Builds `{vb}.weight` (n_experts, d_model) and, if configured, the expert bias.
    pub fn new(d_model: usize, moe: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        let expert_bias = if moe.expert_bias {
            Some(Var::zeros(moe.n_experts, vb.dtype(), vb.device())?)
        } else {
            None
        };
        Ok(Self {
            weight: Linear::new(d_model, moe.n_experts, vb)?,
            expert_bias,
            kind: moe.router,
            top_k: moe.top_k,
            renormalize: moe.renormalize,
            scope: moe.aux_loss_scope,
            device_routing: moe.capacity_factor.is_none()
                && moe.aux_loss_scope != BalanceScope::Sequence,
        })
    }

    /// The selection bias, if this router has one.
    pub fn expert_bias(&self) -> Option<&Var> {
        self.expert_bias.as_ref()
    }

    /// Routes `x` (tokens, d_model) made of `n_sequences` equal-length sequences.
    pub fn forward(
        &self,
        x: &Tensor,
        n_sequences: usize,
        noise: Option<RoutingNoise>,
    ) -> Result<RouterDecision> {
        // The router runs in at least f32 whatever the compute dtype: top-k choices and the
        // balancing losses are sensitive to bf16 rounding.
        let x = match x.dtype() {
            DType::BF16 | DType::F16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let logits = self.weight.forward(&x)?;
        let (tokens, n_experts) = logits.dims2()?;

        let max = logits.max_keepdim(D::Minus1)?.detach();
        let logsumexp = (logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        let z_loss = logsumexp.sqr()?.mean_all()?;

        let routing_logits = match noise {
            Some(RoutingNoise { alpha, seed }) if alpha < 1.0 => {
                let random = SplitMix64::new(seed).normals(tokens * n_experts);
                let random = Tensor::from_vec(random, (tokens, n_experts), x.device())?
                    .to_dtype(logits.dtype())?;
                ((&logits * alpha)? + (random * (1.0 - alpha))?)?
            }
            _ => logits,
        };
        let scores = match self.kind {
            RouterKind::Softmax => moelab_kernels::softmax_last_dim(&routing_logits)?,
            RouterKind::Sigmoid => sigmoid(&routing_logits)?,
        };

        let (expert_ids, expert_ids_host, counts) = self.choose(&scores, n_experts)?;

        let mut gates = scores.gather(&expert_ids, 1)?;
        if self.kind == RouterKind::Sigmoid || self.renormalize {
            gates = gates.broadcast_div(&gates.sum_keepdim(1)?)?;
        }
        let probs = match self.kind {
            RouterKind::Softmax => scores,
            RouterKind::Sigmoid => scores.broadcast_div(&scores.sum_keepdim(1)?)?,
        };

        let groups = match self.scope {
            BalanceScope::MicroBatch | BalanceScope::Global => 1,
            BalanceScope::Sequence => n_sequences,
        };
        let mut aux_loss = match &expert_ids_host {
            Some(ids) => balance_loss(&probs, ids, groups, self.top_k)?,
            // Device routing has one group (checked when the router was built).
            None => balance_loss_from_counts(&probs, &counts, self.top_k)?,
        };
        if self.scope == BalanceScope::Global {
            aux_loss = aux_loss.detach();
        }
        Ok(RouterDecision {
            expert_ids,
            expert_ids_host,
            counts,
            gates,
            probs,
            aux_loss,
            z_loss,
        })
    }
}

impl Router {
    /// Each token's top-k experts by `scores` plus the selection bias: (ids on the scores'
    /// device, the ids on the host if copied, the per-expert counts).
    fn choose(
        &self,
        scores: &Tensor,
        n_experts: usize,
    ) -> Result<(Tensor, Option<Vec<u32>>, Vec<usize>)> {
        let on_device = self.device_routing
            && scores.device().is_cuda()
            && moelab_kernels::use_fused(moelab_kernels::FusedOp::MoeDispatch);
        if on_device {
            let bias = self.expert_bias.as_ref().map(|b| b.as_tensor());
            let top = moelab_kernels::router_topk(&scores.detach(), bias, self.top_k)?;
            // The layer's one device-to-host copy: the histogram.
            let counts = top.counts.to_vec1::<u32>()?;
            return Ok((
                top.expert_ids,
                None,
                counts.into_iter().map(|c| c as usize).collect(),
            ));
        }
        let selection = match &self.expert_bias {
            Some(bias) => scores.detach().broadcast_add(bias.as_tensor())?,
            None => scores.detach(),
        };
        let expert_ids = selection
            .arg_sort_last_dim(false)?
            .narrow(1, 0, self.top_k)?
            .contiguous()?;
        let ids = expert_ids.flatten_all()?.to_vec1::<u32>()?;
        let mut counts = vec![0usize; n_experts];
        for &e in &ids {
            counts[e as usize] += 1;
        }
        Ok((expert_ids, Some(ids), counts))
    }
}

/// [`balance_loss`] over one group from the per-expert assignment counts (the device routing's
/// histogram) instead of the ids.
pub fn balance_loss_from_counts(probs: &Tensor, counts: &[usize], top_k: usize) -> Result<Tensor> {
    let (tokens, n_experts) = probs.dims2()?;
    if counts.len() != n_experts {
        candle_core::bail!(
            "balance_loss: {} counts for {n_experts} experts",
            counts.len()
        );
    }
    let total = (tokens * top_k).max(1) as f64;
    let fractions: Vec<f64> = counts.iter().map(|&c| c as f64 / total).collect();
    let fractions =
        Tensor::from_vec(fractions, (1, n_experts), probs.device())?.to_dtype(probs.dtype())?;
    let mean_probs = probs.mean_keepdim(0)?;
    (fractions * mean_probs)?.sum_all()? * n_experts as f64
}

/// Switch/GShard balance loss `E * sum_i f_i P_i`, averaged over `groups` equal token groups:
/// f_i is the share of the group's k-assignments that chose expert i (a constant), P_i the mean
/// router probability of expert i over the group (carries the gradient). Equals 1 when balanced.
pub fn balance_loss(
    probs: &Tensor,
    expert_ids: &[u32],
    groups: usize,
    top_k: usize,
) -> Result<Tensor> {
    let (tokens, n_experts) = probs.dims2()?;
    if groups == 0 || tokens % groups != 0 {
        candle_core::bail!("balance_loss: {tokens} tokens do not split into {groups} groups");
    }
    let per_group = tokens / groups;
    let mut fractions = vec![0f64; groups * n_experts];
    for (assignment, &expert) in expert_ids.iter().enumerate() {
        let group = assignment / top_k / per_group;
        fractions[group * n_experts + expert as usize] += 1.0 / (per_group * top_k) as f64;
    }
    let fractions = Tensor::from_vec(fractions, (groups, n_experts), probs.device())?
        .to_dtype(probs.dtype())?;
    let mean_probs = probs.reshape((groups, per_group, n_experts))?.mean(1)?;
    (fractions * mean_probs)?.sum_all()? * (n_experts as f64 / groups as f64)
}

/// The global-batch balance loss of one micro-batch: `E * sum_i f_i P_i` with `fractions` f_i
/// counted over the whole global batch (a constant) and P_i the mean router probability of
/// expert i over this micro-batch's `probs` (tokens, n_experts), which carries the gradient.
/// Averaged over a step's equal micro-batches it is the balance loss of the global batch.
pub fn global_balance_loss(probs: &Tensor, fractions: &[f64]) -> Result<Tensor> {
    let (_, n_experts) = probs.dims2()?;
    if fractions.len() != n_experts {
        candle_core::bail!(
            "global_balance_loss: {} fractions for {n_experts} experts",
            fractions.len()
        );
    }
    let fractions =
        Tensor::from_slice(fractions, n_experts, probs.device())?.to_dtype(probs.dtype())?;
    (probs.mean(0)? * fractions)?.sum_all()? * n_experts as f64
}

/// This process's routed experts of one MoE layer, stacked, nn.Linear layout per expert: what
/// an [`ExpertBackend`] runs the tokens through.
#[derive(Debug, Clone, Copy)]
pub struct ExpertWeights<'a> {
    /// (local experts, expert_ff, d_model).
    pub gate_proj: &'a Tensor,
    /// (local experts, expert_ff, d_model).
    pub up_proj: &'a Tensor,
    /// (local experts, d_model, expert_ff).
    pub down_proj: &'a Tensor,
}

/// Runs a MoE layer's routed experts when they are spread over several processes (expert
/// parallelism). The model knows nothing of collectives: the train crate implements this and
/// hands it to [`crate::MoeTransformer::with_expert_backend`]; the router, the losses and the
/// routing record stay in the layer, computed where the tokens are.
pub trait ExpertBackend: Send + Sync + std::fmt::Debug {
    /// `x` (tokens, d_model), the router's `expert_ids` (tokens x top_k, row-major, global ids)
    /// and differentiable `gates` (tokens, top_k), with this process's `experts`: returns
    /// (tokens, d_model), each token's gate-weighted sum of its experts' outputs.
    fn run(
        &self,
        x: &Tensor,
        expert_ids: &[u32],
        gates: &Tensor,
        experts: ExpertWeights<'_>,
    ) -> Result<Tensor>;
}

/// A MoE feed-forward: router, `n_experts` SwiGLU experts stored stacked, optional shared experts.
#[derive(Debug, Clone)]
pub struct MoeFfn {
    router: Router,
    /// (n_experts, expert_ff, d_model), nn.Linear layout per expert.
    gate_proj: Tensor,
    /// (n_experts, expert_ff, d_model).
    up_proj: Tensor,
    /// (n_experts, d_model, expert_ff).
    down_proj: Tensor,
    /// The always-active experts, fused into one SwiGLU of width n_shared x expert_ff (the sum of
    /// n_shared independent experts is exactly that).
    shared: Option<SwiGlu>,
    top_k: usize,
    capacity_factor: Option<f64>,
    /// Routed experts of the whole layer (this process may hold fewer: `gate_proj.dim(0)`).
    n_experts: usize,
    /// Where the routed experts run when they are spread over processes; `None` runs them all
    /// here.
    backend: Option<Arc<dyn ExpertBackend>>,
}

impl MoeFfn {
    /// Builds `{vb}.router`, `{vb}.experts.{gate,up,down}_proj` and `{vb}.shared_experts`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_local_experts(cfg, vb, cfg.moe.n_experts)
    }

    /// [`MoeFfn::new`] holding only `local` of the layer's routed experts (expert parallelism:
    /// the stacked tensors have `local` rows; which ones is the caller's layout).
    pub fn with_local_experts(cfg: &ModelConfig, vb: VarBuilder, local: usize) -> Result<Self> {
        let moe = &cfg.moe;
        let (n, ff, d) = (local, moe.expert_ff, cfg.d_model);
        let experts = vb.pp("experts");
        // Zero here; seeded values come from `crate::init` like every other matrix.
        let stacked = |rows: usize, cols: usize, name: &str| {
            experts.get_with_hints((n, rows, cols), name, Init::Const(0.0))
        };
        let shared = if moe.n_shared_experts > 0 {
            Some(SwiGlu::new(
                d,
                moe.n_shared_experts * ff,
                vb.pp("shared_experts"),
            )?)
        } else {
            None
        };
        Ok(Self {
            router: Router::new(d, moe, vb.pp("router"))?,
            gate_proj: stacked(ff, d, "gate_proj")?,
            up_proj: stacked(ff, d, "up_proj")?,
            down_proj: stacked(d, ff, "down_proj")?,
            shared,
            top_k: moe.top_k,
            capacity_factor: moe.capacity_factor,
            n_experts: moe.n_experts,
            backend: None,
        })
    }

    /// Runs the routed experts through `backend` from now on.
    pub fn set_expert_backend(&mut self, backend: Arc<dyn ExpertBackend>) {
        self.backend = Some(backend);
    }

    /// Whether the routed experts run through an [`ExpertBackend`].
    pub fn has_expert_backend(&self) -> bool {
        self.backend.is_some()
    }

    /// The router (its expert bias is what the trainer updates).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// `x`: (tokens, d_model) made of `n_sequences` sequences. Returns the output and the record.
    pub fn forward(
        &self,
        x: &Tensor,
        n_sequences: usize,
        layer: usize,
        noise: Option<RoutingNoise>,
    ) -> Result<(Tensor, LayerRouting)> {
        let (tokens, _) = x.dims2()?;
        let n_experts = self.n_experts;
        let decision = self.router.forward(x, n_sequences, noise)?;
        if let Some(backend) = &self.backend {
            return self.forward_backend(backend.as_ref(), x, decision, layer);
        }
        let device = x.device();
        let mut plan = match &decision.expert_ids_host {
            Some(ids) => DispatchPlan::new(ids, n_experts, self.top_k, self.capacity_factor),
            // Routed on the device: the plan too (no capacity there, so nothing is dropped).
            None => DispatchPlan {
                tokens: Vec::new(),
                assignments: Vec::new(),
                group_sizes: decision.counts.clone(),
                kept: Vec::new(),
                dropped: 0,
            },
        };
        let (routing, slot_index) = match &decision.expert_ids_host {
            Some(_) => (
                moe_dispatch::Routing::new(std::mem::take(&mut plan.tokens), tokens)?,
                index_tensor(&plan.assignments, device)?,
            ),
            None => {
                let p = moelab_kernels::moe_plan::plan(&decision.expert_ids, &decision.counts)?;
                (p.routing, p.assignment_of_row)
            }
        };
        let x_sorted = moe_dispatch::permute(x, &routing)?;
        let gates_sorted = decision
            .gates
            .flatten_all()?
            .index_select(&slot_index, 0)?
            .to_dtype(x.dtype())?;
        // Experts compute in x's dtype; the master weights are cast on use (no-op in f32).
        let weight = |w: &Tensor| w.to_dtype(x.dtype());
        let sizes = &plan.group_sizes;
        let gate = moelab_kernels::grouped_matmul(&x_sorted, &weight(&self.gate_proj)?, sizes)?;
        let up = moelab_kernels::grouped_matmul(&x_sorted, &weight(&self.up_proj)?, sizes)?;
        let hidden = moelab_kernels::swiglu(&gate, &up)?;
        let expert_out = moelab_kernels::grouped_matmul(&hidden, &weight(&self.down_proj)?, sizes)?;
        let mut out = moe_dispatch::unpermute(&expert_out, &gates_sorted, &routing)?;
        if let Some(shared) = &self.shared {
            out = (out + shared.forward(x)?)?;
        }

        let kept = match self.capacity_factor {
            Some(_) => Some(Tensor::from_vec(plan.kept, (tokens, self.top_k), device)?),
            None => None,
        };
        let routing = self.record(layer, decision, kept, plan.group_sizes, plan.dropped);
        Ok((out, routing))
    }

    /// The layer with its routed experts run by `backend` (expert parallelism): the router's
    /// decision and record as without it, the experts wherever the backend keeps them.
    fn forward_backend(
        &self,
        backend: &dyn ExpertBackend,
        x: &Tensor,
        mut decision: RouterDecision,
        layer: usize,
    ) -> Result<(Tensor, LayerRouting)> {
        if self.capacity_factor.is_some() {
            candle_core::bail!(
                "model.moe.capacity_factor cannot be combined with expert parallelism (dist.expert_parallel > 1): capacity drops are planned over every expert's queue in one process"
            );
        }
        let ids = match &decision.expert_ids_host {
            Some(ids) => ids.clone(),
            None => decision.expert_ids.flatten_all()?.to_vec1::<u32>()?,
        };
        let experts = ExpertWeights {
            gate_proj: &self.gate_proj,
            up_proj: &self.up_proj,
            down_proj: &self.down_proj,
        };
        let mut out = backend.run(x, &ids, &decision.gates, experts)?;
        if let Some(shared) = &self.shared {
            out = (out + shared.forward(x)?)?;
        }
        let counts = std::mem::take(&mut decision.counts);
        let routing = self.record(layer, decision, None, counts, 0);
        Ok((out, routing))
    }

    /// The layer's routing record from the router's decision and what dispatch kept.
    fn record(
        &self,
        layer: usize,
        decision: RouterDecision,
        kept: Option<Tensor>,
        tokens_per_expert: Vec<usize>,
        dropped: usize,
    ) -> LayerRouting {
        LayerRouting {
            layer,
            expert_ids: decision.expert_ids,
            gate_weights: decision.gates.detach(),
            // Global balancing forms its loss from the probabilities, so they keep their graph.
            router_probs: match self.router.scope {
                BalanceScope::Global => decision.probs,
                _ => decision.probs.detach(),
            },
            kept,
            tokens_per_expert,
            dropped,
            aux_loss: decision.aux_loss,
            z_loss: decision.z_loss,
        }
    }
}

fn index_tensor(values: &[u32], device: &Device) -> Result<Tensor> {
    Tensor::from_slice(values, values.len(), device)?.to_dtype(DType::U32)
}

/// The permutation that groups (token, slot) assignments by expert.
#[derive(Debug, Clone, PartialEq)]
struct DispatchPlan {
    /// Token of each processed assignment, grouped by expert.
    tokens: Vec<u32>,
    /// Flat (token * k + slot) index of each processed assignment, same order.
    assignments: Vec<u32>,
    /// Processed assignments per expert.
    group_sizes: Vec<usize>,
    /// Per (token, slot): 1 if processed, 0 if dropped.
    kept: Vec<u8>,
    dropped: usize,
}

impl DispatchPlan {
    /// With a capacity, assignments are admitted slot by slot (every token's first choice before
    /// any second choice), in token order within a slot, as GShard does.
    fn new(
        expert_ids: &[u32],
        n_experts: usize,
        top_k: usize,
        capacity_factor: Option<f64>,
    ) -> Self {
        let tokens = expert_ids.len() / top_k;
        let capacity = capacity_factor
            .map(|cf| ((cf * (tokens * top_k) as f64 / n_experts as f64).ceil() as usize).max(1));
        let mut per_expert: Vec<Vec<u32>> = vec![Vec::new(); n_experts];
        let mut kept = vec![0u8; expert_ids.len()];
        let mut dropped = 0;
        for slot in 0..top_k {
            for token in 0..tokens {
                let assignment = token * top_k + slot;
                let queue = &mut per_expert[expert_ids[assignment] as usize];
                if capacity.is_some_and(|c| queue.len() >= c) {
                    dropped += 1;
                } else {
                    queue.push(assignment as u32);
                    kept[assignment] = 1;
                }
            }
        }
        let group_sizes = per_expert.iter().map(Vec::len).collect();
        let assignments: Vec<u32> = per_expert.into_iter().flatten().collect();
        let tokens = assignments.iter().map(|&a| a / top_k as u32).collect();
        Self {
            tokens,
            assignments,
            group_sizes,
            kept,
            dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn dispatch_groups_by_expert_and_respects_capacity() {
        // 4 tokens, k = 2, 3 experts.
        let ids = [0, 1, 0, 2, 0, 1, 2, 0];
        let plan = DispatchPlan::new(&ids, 3, 2, None);
        assert_eq!(plan.group_sizes, vec![4, 2, 2]);
        assert_eq!(plan.dropped, 0);
        // Expert 0 gets slot-0 assignments of tokens 0,1,2 then slot-1 of token 3.
        assert_eq!(&plan.assignments[..4], &[0, 2, 4, 7]);
        assert_eq!(&plan.tokens[..4], &[0, 1, 2, 3]);

        // capacity = ceil(0.75 * 8 / 3) = 2
        let plan = DispatchPlan::new(&ids, 3, 2, Some(0.75));
        assert_eq!(plan.group_sizes, vec![2, 2, 2]);
        assert_eq!(plan.dropped, 2);
        assert_eq!(plan.kept, vec![1, 1, 1, 1, 0, 1, 1, 0]);
    }

    #[test]
    fn balance_loss_is_one_when_uniform_and_matches_hand_count() {
        // 2 tokens, 2 experts, k = 1; token 0 -> expert 0, token 1 -> expert 0.
        let probs = Tensor::new(&[[0.75f64, 0.25], [0.25, 0.75]], &Device::Cpu).unwrap();
        let loss = balance_loss(&probs, &[0, 0], 1, 1).unwrap();
        // f = [1, 0], P = [0.5, 0.5] -> 2 * 0.5 = 1.
        assert!((loss.to_scalar::<f64>().unwrap() - 1.0).abs() < 1e-12);
        let probs = Tensor::new(&[[0.9f64, 0.1], [0.8, 0.2]], &Device::Cpu).unwrap();
        let loss = balance_loss(&probs, &[0, 0], 1, 1).unwrap();
        // f = [1, 0], P = [0.85, 0.15] -> 2 * 0.85 = 1.7
        assert!((loss.to_scalar::<f64>().unwrap() - 1.7).abs() < 1e-12);
        // Per sequence: group 0 = token 0 (f=[1,0], P=[.9,.1]) -> 1.8; group 1 = token 1 -> 1.6.
        let loss = balance_loss(&probs, &[0, 0], 2, 1).unwrap();
        assert!((loss.to_scalar::<f64>().unwrap() - 1.7).abs() < 1e-12);
        let loss = balance_loss(&probs, &[0, 1], 2, 1).unwrap();
        // group 0: 2*0.9 = 1.8 ; group 1: f=[0,1], P=[.8,.2] -> 2*0.2 = 0.4 ; mean 1.1
        assert!((loss.to_scalar::<f64>().unwrap() - 1.1).abs() < 1e-12);
        // Global fractions f = [0.25, 0.75] from elsewhere, P = [0.85, 0.15]:
        // 2 * (0.25 * 0.85 + 0.75 * 0.15) = 0.65.
        let loss = global_balance_loss(&probs, &[0.25, 0.75]).unwrap();
        assert!((loss.to_scalar::<f64>().unwrap() - 0.65).abs() < 1e-12);
    }
}
