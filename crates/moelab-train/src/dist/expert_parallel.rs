//! Expert parallelism: the E experts of every MoE layer are split over groups of G ranks, each
//! rank holding E/G of them, and tokens travel to their experts' ranks and back.
//!
//! The ranks form groups of G consecutive ranks (the EP group); rank r holds experts
//! `(r % G) * E/G ..` and the same experts live on the ranks with index `r % G` in the other
//! groups (the expert-DP group, over which expert gradients are summed). Attention, norms,
//! embeddings and routers stay replicated over all ranks.
//!
//! [`ExpertParallel::forward`] is the MoE layer after the router: each rank sorts its own
//! (token, slot) assignments by expert (dropless, so every count is data dependent and may be
//! zero), exchanges the per-(rank, expert) counts with an integer all-to-all, sends the rows to
//! the experts' ranks with an all-to-all-v, runs its local experts with the grouped GEMM,
//! returns the outputs with a second all-to-all-v, and combines them with the gates where the
//! tokens live. The two exchanges are autograd ops ([`Exchange`]) whose backward is the
//! exchange the other way, so the backward pass mirrors the forward one.
//!
//! Every rank of an EP group must run the same layers in the same order, forward and backward
//! (the collectives pair up by order). Candle walks the backward graph in an order fixed by the
//! graph's structure, which is the same on every rank.

use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use moelab_kernels::moe_dispatch::{self, Routing};

use super::{exchange_cpu, Collective};
use crate::config::DistConfig;
use crate::TrainError;

/// Which experts and peers a rank has under expert parallelism (pure arithmetic, no messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpLayout {
    /// Ranks in the job.
    pub world_size: usize,
    /// Ranks per expert-parallel group (G).
    pub expert_parallel: usize,
    /// Experts of every MoE layer (E).
    pub n_experts: usize,
}

impl EpLayout {
    /// Checks that G divides the world size and the expert count (the error names the numbers).
    pub fn new(
        world_size: usize,
        expert_parallel: usize,
        n_experts: usize,
    ) -> Result<Self, TrainError> {
        let dist = DistConfig {
            expert_parallel,
            ..DistConfig::default()
        };
        if world_size == 0 {
            return Err(TrainError::Distributed(
                "a job has at least one rank".into(),
            ));
        }
        dist.check_layout(world_size, n_experts)
            .map_err(|reason| TrainError::Argument(format!("invalid config key {reason}")))?;
        Ok(Self {
            world_size,
            expert_parallel,
            n_experts,
        })
    }

    /// Experts each rank holds (E / G).
    pub fn experts_per_rank(&self) -> usize {
        self.n_experts / self.expert_parallel
    }

    /// The EP group `rank` belongs to.
    pub fn group_of(&self, rank: usize) -> usize {
        rank / self.expert_parallel
    }

    /// `rank`'s index inside its EP group (its rank in the EP sub-communicator).
    pub fn index_in_group(&self, rank: usize) -> usize {
        rank % self.expert_parallel
    }

    /// The experts `rank` holds (global expert ids).
    pub fn local_experts(&self, rank: usize) -> Range<usize> {
        let n = self.experts_per_rank();
        let start = self.index_in_group(rank) * n;
        start..start + n
    }

    /// The world ranks of `rank`'s EP group.
    pub fn ep_ranks(&self, rank: usize) -> Range<usize> {
        let start = self.group_of(rank) * self.expert_parallel;
        start..start + self.expert_parallel
    }

    /// The world ranks holding the same experts as `rank` (its expert-DP group), ascending.
    pub fn expert_dp_ranks(&self, rank: usize) -> Vec<usize> {
        let groups = self.world_size / self.expert_parallel;
        let index = self.index_in_group(rank);
        (0..groups)
            .map(|g| g * self.expert_parallel + index)
            .collect()
    }
}

thread_local! {
    /// The communicators autograd ops may use on this thread, by id (see [`ExchangeGroup`]).
    static GROUPS: RefCell<HashMap<u64, Rc<dyn Collective>>> = RefCell::new(HashMap::new());
}

static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);

/// Bytes this process sent to other ranks in expert-parallel all-to-alls (the rows of
/// [`Exchange`], forward and backward, as they go on the wire, and the counts of [`dispatch`])
/// since the last [`take_all_to_all_bytes`].
static SENT_BYTES: AtomicU64 = AtomicU64::new(0);

/// The bytes this process sent to other ranks in expert-parallel all-to-alls since the last
/// call (rows and counts; its own block, which stays in memory, is not counted), and restarts
/// the count: `train` takes it around each step to log the step's traffic.
pub fn take_all_to_all_bytes() -> u64 {
    SENT_BYTES.swap(0, Ordering::Relaxed)
}

/// Bytes one element of `dtype` takes on the wire of the exchange: bf16 and f16 travel as f32
/// (see [`exchange_cpu`] and the NCCL exchange), f64 as itself.
fn wire_bytes(dtype: candle_core::DType) -> u64 {
    match dtype {
        candle_core::DType::F64 => 8,
        _ => 4,
    }
}

/// Counts `elements` per peer of `dtype` sent by rank `me` (its own block stays local).
fn count_sent(me: usize, elements: &[usize], dtype: candle_core::DType) {
    let remote: usize = elements
        .iter()
        .enumerate()
        .filter(|&(peer, _)| peer != me)
        .map(|(_, &n)| n)
        .sum();
    SENT_BYTES.fetch_add(remote as u64 * wire_bytes(dtype), Ordering::Relaxed);
}

/// A communicator registered on this thread for the exchange ops. Candle keeps ops in the
/// autograd graph behind `Send + Sync` bounds, which an MPI or NCCL communicator is not, so an
/// op holds the group's id and finds the communicator here when it runs (on this thread, the
/// only one that may call MPI). Dropping the group unregisters it; an op of a graph that
/// outlives it fails with an error instead of using a freed communicator.
pub struct ExchangeGroup {
    id: u64,
    // Not Send: the registration lives in this thread's table.
    _thread: PhantomData<Rc<()>>,
}

impl ExchangeGroup {
    /// The id ops and Send + Sync holders use to find the communicator on this thread.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Registers `comm` on this thread.
    pub fn new(comm: Rc<dyn Collective>) -> Self {
        let id = NEXT_GROUP.fetch_add(1, Ordering::Relaxed);
        GROUPS.with(|groups| groups.borrow_mut().insert(id, comm));
        Self {
            id,
            _thread: PhantomData,
        }
    }

    /// Runs `f` with the communicator of group `id` (registered on this thread).
    pub(crate) fn with<R>(
        id: u64,
        f: impl FnOnce(&dyn Collective) -> Result<R, TrainError>,
    ) -> Result<R, TrainError> {
        let comm = GROUPS.with(|groups| groups.borrow().get(&id).cloned());
        match comm {
            Some(comm) => f(comm.as_ref()),
            None => Err(TrainError::Distributed(format!(
                "expert-parallel exchange group {id} is not registered on this thread: the backward pass ran on another thread than the forward pass, or after the ExpertParallel it belongs to was dropped"
            ))),
        }
    }
}

impl Drop for ExchangeGroup {
    fn drop(&mut self) {
        GROUPS.with(|groups| groups.borrow_mut().remove(&self.id));
    }
}

/// The all-to-all-v of rows as an autograd op: `rows` (sum of `send_rows`, width) in blocks per
/// destination rank -> (sum of `recv_rows`, width) in blocks per source rank. Its backward is
/// the same exchange with the counts swapped.
#[derive(Debug, Clone)]
pub struct Exchange {
    group: u64,
    send_rows: Arc<[usize]>,
    recv_rows: Arc<[usize]>,
    width: usize,
}

impl Exchange {
    /// Rows in and out, and element counts per peer.
    fn counts(&self) -> candle_core::Result<(usize, usize, Vec<usize>, Vec<usize>)> {
        let elements = |rows: &[usize]| -> candle_core::Result<Vec<usize>> {
            rows.iter()
                .map(|&r| {
                    r.checked_mul(self.width).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "expert exchange: {r} rows of {} overflow",
                            self.width
                        ))
                    })
                })
                .collect()
        };
        Ok((
            self.send_rows.iter().sum(),
            self.recv_rows.iter().sum(),
            elements(&self.send_rows)?,
            elements(&self.recv_rows)?,
        ))
    }

    fn check_input(&self, layout: &Layout, rows: usize) -> candle_core::Result<()> {
        if layout.dims() != [rows, self.width] {
            candle_core::bail!(
                "expert exchange: input {:?} does not match the plan's ({rows}, {})",
                layout.dims(),
                self.width
            );
        }
        Ok(())
    }

    fn reversed(&self) -> Self {
        Self {
            group: self.group,
            send_rows: self.recv_rows.clone(),
            recv_rows: self.send_rows.clone(),
            width: self.width,
        }
    }
}

fn to_candle(e: TrainError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp1 for Exchange {
    fn name(&self) -> &'static str {
        "expert-all-to-all"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (sent, received, send_counts, recv_counts) = self.counts()?;
        self.check_input(layout, sent)?;
        let out = ExchangeGroup::with(self.group, |comm| {
            let out = exchange_cpu(comm, storage, layout, &send_counts, &recv_counts)?;
            count_sent(comm.rank(), &send_counts, storage.dtype());
            Ok(out)
        })
        .map_err(to_candle)?;
        Ok((out, Shape::from((received, self.width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (sent, received, send_counts, recv_counts) = self.counts()?;
        self.check_input(layout, sent)?;
        let out = ExchangeGroup::with(self.group, |comm| {
            let out = comm.all_to_all_v_cuda(storage, layout, &send_counts, &recv_counts)?;
            count_sent(comm.rank(), &send_counts, storage.dtype());
            Ok(out)
        })
        .map_err(to_candle)?;
        Ok((out, Shape::from((received, self.width))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(self.reversed())?))
    }
}

/// The stacked weights of a rank's local experts, nn.Linear layout per expert (the model's
/// `experts.{gate,up,down}_proj` rows of this rank's experts).
#[derive(Debug, Clone, Copy)]
pub struct LocalExperts<'a> {
    /// (E/G, expert_ff, d_model).
    pub gate_proj: &'a Tensor,
    /// (E/G, expert_ff, d_model).
    pub up_proj: &'a Tensor,
    /// (E/G, d_model, expert_ff).
    pub down_proj: &'a Tensor,
}

/// What one expert-parallel MoE layer moved, for metrics and the volume check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchStats {
    /// This rank's assignments per (global) expert: what a single process would count for
    /// these tokens, so router logs and balancing see the same numbers as without EP.
    pub tokens_per_expert: Vec<usize>,
    /// Rows this rank sent to each rank of its EP group (its own block included).
    pub rows_sent: Vec<usize>,
    /// Rows this rank received from each rank of its EP group, for its local experts.
    pub rows_received: Vec<usize>,
}

impl DispatchStats {
    /// Rows that crossed to other ranks in one of the layer's four all-to-alls (dispatch and
    /// return forward, and their mirrors backward, each move this many rows out of this rank).
    pub fn remote_rows_sent(&self, rank_in_group: usize) -> usize {
        self.rows_sent
            .iter()
            .enumerate()
            .filter(|&(peer, _)| peer != rank_in_group)
            .map(|(_, &rows)| rows)
            .sum()
    }
}

/// A rank's expert-parallel setup: its layout, the EP and expert-DP sub-communicators, and the
/// EP group registered for the exchange ops.
pub struct ExpertParallel {
    layout: EpLayout,
    rank: usize,
    ep: Rc<dyn Collective>,
    expert_dp: Rc<dyn Collective>,
    exchange: ExchangeGroup,
    /// The expert-DP group registered too, for the optimizer (which must be Send + Sync and so
    /// holds ids, not communicators).
    expert_dp_group: ExchangeGroup,
}

/// The registered ids of a rank's EP and expert-DP groups: what Send + Sync holders (the
/// model's expert backend, the optimizer) keep, looked up on the thread that registered them
/// ([`ExchangeGroup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpGroups {
    /// The layout.
    pub layout: EpLayout,
    /// This rank (in the world).
    pub rank: usize,
    /// The EP group's id.
    pub ep: u64,
    /// The expert-DP group's id.
    pub expert_dp: u64,
}

impl EpGroups {
    /// The global ids of the experts this rank holds.
    pub fn local_experts(&self) -> Range<usize> {
        self.layout.local_experts(self.rank)
    }
}

/// Whether parameter `name` is a stacked routed-expert tensor (held per rank under expert
/// parallelism): `blocks.L.moe.experts.{gate,up,down}_proj`; shared experts are not.
pub fn is_expert_param(name: &str) -> bool {
    name.contains(".experts.")
}

/// The model's [`ExpertBackend`](moelab_model::ExpertBackend) under expert parallelism:
/// [`dispatch`] through the EP group registered on this thread.
#[derive(Debug, Clone, Copy)]
pub struct EpBackend {
    groups: EpGroups,
}

impl moelab_model::ExpertBackend for EpBackend {
    fn run(
        &self,
        x: &Tensor,
        expert_ids: &[u32],
        gates: &Tensor,
        experts: moelab_model::ExpertWeights<'_>,
    ) -> candle_core::Result<Tensor> {
        let local = LocalExperts {
            gate_proj: experts.gate_proj,
            up_proj: experts.up_proj,
            down_proj: experts.down_proj,
        };
        dispatch(
            &self.groups.layout,
            self.groups.ep,
            x,
            expert_ids,
            gates,
            &local,
        )
        .map(|(out, _)| out)
        .map_err(to_candle)
    }
}

impl ExpertParallel {
    /// Splits `world` into EP groups of `expert_parallel` ranks and expert-DP groups. Every
    /// rank of `world` must call it (two communicator splits).
    pub fn new(
        world: &dyn Collective,
        expert_parallel: usize,
        n_experts: usize,
    ) -> Result<Self, TrainError> {
        let layout = EpLayout::new(world.world_size(), expert_parallel, n_experts)?;
        let rank = world.rank();
        let ep: Rc<dyn Collective> = Rc::from(world.split(layout.group_of(rank), rank)?);
        let expert_dp: Rc<dyn Collective> =
            Rc::from(world.split(layout.index_in_group(rank), rank)?);
        if ep.world_size() != expert_parallel || ep.rank() != layout.index_in_group(rank) {
            return Err(TrainError::Distributed(format!(
                "the EP group of rank {rank} has {} ranks with this one at {}; expected {expert_parallel} and {}",
                ep.world_size(),
                ep.rank(),
                layout.index_in_group(rank)
            )));
        }
        Ok(Self {
            layout,
            rank,
            exchange: ExchangeGroup::new(ep.clone()),
            expert_dp_group: ExchangeGroup::new(expert_dp.clone()),
            ep,
            expert_dp,
        })
    }

    /// The registered group ids (for Send + Sync holders on this thread).
    pub fn groups(&self) -> EpGroups {
        EpGroups {
            layout: self.layout,
            rank: self.rank,
            ep: self.exchange.id,
            expert_dp: self.expert_dp_group.id,
        }
    }

    /// The model's expert backend: [`ExpertParallel::forward`] through this rank's EP group.
    pub fn backend(&self) -> Arc<EpBackend> {
        Arc::new(EpBackend {
            groups: self.groups(),
        })
    }

    /// The layout.
    pub fn layout(&self) -> &EpLayout {
        &self.layout
    }

    /// The global ids of the experts this rank holds.
    pub fn local_experts(&self) -> Range<usize> {
        self.layout.local_experts(self.rank)
    }

    /// The EP group (G ranks that hold the experts between them).
    pub fn ep_group(&self) -> &Rc<dyn Collective> {
        &self.ep
    }

    /// The ranks holding this rank's experts: expert gradients are summed over it only.
    pub fn expert_dp_group(&self) -> &Rc<dyn Collective> {
        &self.expert_dp
    }

    /// Sums gradients over the ranks that share each parameter: `is_expert(name)` parameters
    /// (this rank's experts) over the expert-DP group, every other parameter over `world`,
    /// each set bucketed in the parameters' order as [`data_parallel::all_reduce_gradients`]
    /// does. Every rank must call it with the same parameter names in the same order.
    ///
    /// [`data_parallel::all_reduce_gradients`]: super::data_parallel::all_reduce_gradients
    pub fn all_reduce_gradients(
        &self,
        world: &dyn Collective,
        params: &[(String, candle_core::Var)],
        grads: &mut HashMap<String, Tensor>,
        is_expert: &dyn Fn(&str) -> bool,
    ) -> Result<(), TrainError> {
        let (experts, replicated): (Vec<_>, Vec<_>) = params
            .iter()
            .cloned()
            .partition(|(name, _)| is_expert(name));
        super::data_parallel::all_reduce_gradients(world, &replicated, grads)?;
        super::data_parallel::all_reduce_gradients(self.expert_dp.as_ref(), &experts, grads)
    }

    /// The MoE experts for this rank's tokens `x` (tokens, d_model): `expert_ids` (tokens x
    /// top_k, row-major, global ids, as the router chose them) and `gates` (tokens, top_k,
    /// differentiable). Returns (tokens, d_model): each token's gate-weighted sum of its
    /// experts' outputs, computed on the ranks holding those experts.
    pub fn forward(
        &self,
        x: &Tensor,
        expert_ids: &[u32],
        gates: &Tensor,
        experts: &LocalExperts<'_>,
    ) -> Result<(Tensor, DispatchStats), TrainError> {
        dispatch(
            &self.layout,
            self.exchange.id,
            x,
            expert_ids,
            gates,
            experts,
        )
    }
}

/// [`ExpertParallel::forward`] with the EP group found by its registered id `group` (on this
/// thread), for holders that cannot keep the communicator.
pub fn dispatch(
    layout: &EpLayout,
    group: u64,
    x: &Tensor,
    expert_ids: &[u32],
    gates: &Tensor,
    experts: &LocalExperts<'_>,
) -> Result<(Tensor, DispatchStats), TrainError> {
    let (tokens, d) = x.dims2()?;
    let (gate_tokens, top_k) = gates.dims2()?;
    let local = layout.experts_per_rank();
    check_shapes(x, gates, experts, local)?;
    if gate_tokens != tokens || expert_ids.len() != tokens * top_k {
        return Err(TrainError::Argument(format!(
            "expert-parallel forward: {tokens} tokens, gates {:?} and {} expert ids do not agree",
            gates.dims(),
            expert_ids.len()
        )));
    }
    let plan = SortedAssignments::new(expert_ids, layout.n_experts, top_k)?;
    let g = layout.expert_parallel;
    // counts[q * local + e]: rows for expert e of rank q; the received matrix is indexed
    // by (source rank, local expert).
    let counts: Vec<u64> = plan.tokens_per_expert.iter().map(|&c| c as u64).collect();
    let received: Vec<usize> = ExchangeGroup::with(group, |ep| {
        let received = ep.all_to_all_u64(&counts)?;
        // The counts for the other ranks' experts leave this rank, 8 bytes each.
        let per_peer = vec![local; g];
        count_sent(ep.rank(), &per_peer, candle_core::DType::F64);
        Ok(received)
    })?
    .into_iter()
    .map(|c| usize::try_from(c).unwrap_or(usize::MAX))
    .collect();
    let block_sums = |m: &[usize]| -> Vec<usize> {
        m.chunks(local.max(1))
            .map(|c| c.iter().sum())
            .collect::<Vec<_>>()
    };
    let rows_sent = block_sums(&plan.tokens_per_expert);
    let rows_received = block_sums(&received);

    let device = x.device();
    let slot_index = Tensor::from_slice(&plan.assignments, plan.assignments.len(), device)?;
    let routing = Routing::new(plan.token_of_row, tokens)?;
    let x_sorted = moe_dispatch::permute(x, &routing)?;
    let gates_sorted = gates
        .flatten_all()?
        .index_select(&slot_index, 0)?
        .to_dtype(x.dtype())?;
    let exchange = Exchange {
        group,
        send_rows: rows_sent.clone().into(),
        recv_rows: rows_received.clone().into(),
        width: d,
    };
    let arrived = if g == 1 {
        x_sorted
    } else {
        x_sorted.apply_op1(exchange.clone())?
    };
    let order = ExpertOrder::new(&received, g, local)?;
    let by_expert = order.to_expert_major(&arrived)?;
    let outputs = run_experts(&by_expert, experts, &order.group_sizes)?;
    let by_source = order.to_source_major(&outputs)?;
    let returned = if g == 1 {
        by_source
    } else {
        by_source.apply_op1(exchange.reversed())?
    };
    let out = moe_dispatch::unpermute(&returned, &gates_sorted, &routing)?;
    Ok((
        out,
        DispatchStats {
            tokens_per_expert: plan.tokens_per_expert,
            rows_sent,
            rows_received,
        },
    ))
}

/// Checks the local experts' weights against `x` and the experts per rank.
fn check_shapes(
    x: &Tensor,
    gates: &Tensor,
    experts: &LocalExperts<'_>,
    local: usize,
) -> Result<(), TrainError> {
    let (_, d) = x.dims2()?;
    let (e, ff, wd) = experts.gate_proj.dims3()?;
    let ok = e == local
        && wd == d
        && experts.up_proj.dims() == [local, ff, d]
        && experts.down_proj.dims() == [local, d, ff]
        && gates.rank() == 2;
    if !ok {
        return Err(TrainError::Argument(format!(
            "expert-parallel forward: local experts gate {:?}, up {:?}, down {:?} do not fit {local} experts per rank and d_model {d}",
            experts.gate_proj.dims(),
            experts.up_proj.dims(),
            experts.down_proj.dims()
        )));
    }
    Ok(())
}

/// The local SwiGLU experts on rows grouped by local expert (the model's expert computation:
/// grouped GEMMs in x's dtype, weights cast on use).
fn run_experts(
    rows: &Tensor,
    experts: &LocalExperts<'_>,
    sizes: &[usize],
) -> Result<Tensor, TrainError> {
    let weight = |w: &Tensor| w.to_dtype(rows.dtype());
    let gate = moelab_kernels::grouped_matmul(rows, &weight(experts.gate_proj)?, sizes)?;
    let up = moelab_kernels::grouped_matmul(rows, &weight(experts.up_proj)?, sizes)?;
    let hidden = moelab_kernels::swiglu(&gate, &up)?;
    Ok(moelab_kernels::grouped_matmul(
        &hidden,
        &weight(experts.down_proj)?,
        sizes,
    )?)
}

/// A rank's (token, slot) assignments sorted by global expert, hence by destination rank:
/// slot-major within an expert (every token's first choice before any second choice), the
/// order the single-process MoE layer uses, so EP sums in the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SortedAssignments {
    /// Token of each sorted assignment.
    token_of_row: Vec<u32>,
    /// Flat (token * top_k + slot) index of each sorted assignment.
    assignments: Vec<u32>,
    /// Assignments per global expert.
    tokens_per_expert: Vec<usize>,
}

impl SortedAssignments {
    fn new(expert_ids: &[u32], n_experts: usize, top_k: usize) -> Result<Self, TrainError> {
        if top_k == 0 || !expert_ids.len().is_multiple_of(top_k) {
            return Err(TrainError::Argument(format!(
                "expert-parallel forward: {} expert ids are not a whole number of tokens of top_k = {top_k}",
                expert_ids.len()
            )));
        }
        if u32::try_from(expert_ids.len()).is_err() {
            return Err(TrainError::Argument(format!(
                "expert-parallel forward: {} assignments exceed the u32 row index",
                expert_ids.len()
            )));
        }
        if let Some((i, &e)) = expert_ids
            .iter()
            .enumerate()
            .find(|&(_, &e)| e as usize >= n_experts)
        {
            return Err(TrainError::Argument(format!(
                "expert-parallel forward: assignment {i} names expert {e} of {n_experts}"
            )));
        }
        let tokens = expert_ids.len() / top_k;
        let mut per_expert: Vec<Vec<u32>> = vec![Vec::new(); n_experts];
        for slot in 0..top_k {
            for token in 0..tokens {
                let assignment = token * top_k + slot;
                per_expert[expert_ids[assignment] as usize].push(assignment as u32);
            }
        }
        let tokens_per_expert = per_expert.iter().map(Vec::len).collect();
        let assignments: Vec<u32> = per_expert.into_iter().flatten().collect();
        let token_of_row = assignments.iter().map(|&a| a / top_k as u32).collect();
        Ok(Self {
            token_of_row,
            assignments,
            tokens_per_expert,
        })
    }
}

/// The reordering of received rows from (source rank, local expert) blocks, as they arrive, to
/// (local expert, source rank) blocks, as the grouped GEMM wants them, and back.
struct ExpertOrder {
    /// Row r of the expert-major matrix is arrived row `to_expert[r]`; None when the orders
    /// coincide (one source rank or one local expert).
    to_expert: Option<Arc<Routing>>,
    to_source: Option<Arc<Routing>>,
    /// Rows per local expert.
    group_sizes: Vec<usize>,
}

impl ExpertOrder {
    /// `received[s * local + e]`: rows from source rank s for local expert e.
    fn new(received: &[usize], sources: usize, local: usize) -> Result<Self, TrainError> {
        let total: usize = received.iter().sum();
        let mut start = vec![0usize; received.len()];
        let mut offset = 0;
        for (block, &n) in received.iter().enumerate() {
            start[block] = offset;
            offset += n;
        }
        let group_sizes: Vec<usize> = (0..local)
            .map(|e| (0..sources).map(|s| received[s * local + e]).sum())
            .collect();
        if sources == 1 || local == 1 {
            return Ok(Self {
                to_expert: None,
                to_source: None,
                group_sizes,
            });
        }
        let mut to_expert = Vec::with_capacity(total);
        for e in 0..local {
            for s in 0..sources {
                let block = s * local + e;
                to_expert.extend((start[block]..start[block] + received[block]).map(|r| r as u32));
            }
        }
        let mut to_source = vec![0u32; total];
        for (r, &arrived) in to_expert.iter().enumerate() {
            to_source[arrived as usize] = r as u32;
        }
        Ok(Self {
            to_expert: Some(Routing::new(to_expert, total)?),
            to_source: Some(Routing::new(to_source, total)?),
            group_sizes,
        })
    }

    fn to_expert_major(&self, arrived: &Tensor) -> Result<Tensor, TrainError> {
        Ok(match &self.to_expert {
            Some(routing) => moe_dispatch::permute(arrived, routing)?,
            None => arrived.clone(),
        })
    }

    fn to_source_major(&self, outputs: &Tensor) -> Result<Tensor, TrainError> {
        Ok(match &self.to_source {
            Some(routing) => moe_dispatch::permute(outputs, routing)?,
            None => outputs.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::dist::Single;
    use candle_core::DType;

    #[test]
    fn layout_places_experts_and_groups() {
        let l = EpLayout::new(4, 2, 8).unwrap();
        assert_eq!(l.experts_per_rank(), 4);
        assert_eq!(l.local_experts(3), 4..8);
        assert_eq!(l.local_experts(2), 0..4);
        assert_eq!(l.ep_ranks(3), 2..4);
        assert_eq!(l.expert_dp_ranks(1), [1, 3]);
        assert_eq!(l.expert_dp_ranks(2), [0, 2]);
        let err = EpLayout::new(3, 2, 8).unwrap_err().to_string();
        assert!(err.contains("world size of 3 ranks"), "{err}");
        let err = EpLayout::new(4, 4, 6).unwrap_err().to_string();
        assert!(err.contains("n_experts = 6"), "{err}");
    }

    #[test]
    fn assignments_sort_by_expert_slot_major() {
        // 3 tokens, top-2: (0: 2,0) (1: 0,1) (2: 2,1).
        let plan = SortedAssignments::new(&[2, 0, 0, 1, 2, 1], 4, 2).unwrap();
        assert_eq!(plan.tokens_per_expert, [2, 2, 2, 0]);
        // expert 0: token 1 slot 0 (a2), token 0 slot 1 (a1); expert 1: a3, a5; expert 2: a0, a4.
        assert_eq!(plan.assignments, [2, 1, 3, 5, 0, 4]);
        assert_eq!(plan.token_of_row, [1, 0, 1, 2, 0, 2]);
        let err = SortedAssignments::new(&[0, 4], 4, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expert 4 of 4"), "{err}");
    }

    #[test]
    fn expert_order_round_trips() {
        // 2 sources x 2 local experts: blocks (s0,e0)=1, (s0,e1)=2, (s1,e0)=0, (s1,e1)=1.
        let order = ExpertOrder::new(&[1, 2, 0, 1], 2, 2).unwrap();
        assert_eq!(order.group_sizes, [1, 3]);
        let arrived = Tensor::new(&[[0f32], [1.], [2.], [3.]], &candle_core::Device::Cpu).unwrap();
        let by_expert = order.to_expert_major(&arrived).unwrap();
        assert_eq!(
            by_expert.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 1., 2., 3.]
        );
        let order = ExpertOrder::new(&[1, 2, 1, 1], 2, 2).unwrap();
        let arrived =
            Tensor::new(&[[0f32], [1.], [2.], [3.], [4.]], &candle_core::Device::Cpu).unwrap();
        let by_expert = order.to_expert_major(&arrived).unwrap();
        // e0: s0 row 0, s1 row 3; e1: s0 rows 1,2, s1 row 4.
        assert_eq!(
            by_expert.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 3., 1., 2., 4.]
        );
        let back = order.to_source_major(&by_expert).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 1., 2., 3., 4.]
        );
    }

    /// Each token's gate-weighted sum of its experts' SwiGLU outputs, one token and expert at a
    /// time with plain matmuls (independent of the permute and grouped GEMM path).
    fn dense_reference(x: &Tensor, ids: &[u32], gates: &Tensor, w: [&Tensor; 3]) -> Tensor {
        let (tokens, top_k) = gates.dims2().unwrap();
        let rows: Vec<Tensor> = (0..tokens)
            .map(|t| {
                let xt = x.narrow(0, t, 1).unwrap();
                let mut acc = xt.zeros_like().unwrap();
                for slot in 0..top_k {
                    let e = ids[t * top_k + slot] as usize;
                    let expert = |m: &Tensor| m.get(e).unwrap().t().unwrap();
                    let g = xt.matmul(&expert(w[0])).unwrap();
                    let u = xt.matmul(&expert(w[1])).unwrap();
                    let h = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
                    let y = h.matmul(&expert(w[2])).unwrap();
                    let gate = gates.get(t).unwrap().get(slot).unwrap();
                    acc = (acc + y.broadcast_mul(&gate).unwrap()).unwrap();
                }
                acc
            })
            .collect();
        Tensor::cat(&rows, 0).unwrap()
    }

    #[test]
    fn one_rank_matches_the_dense_experts_forward_and_backward() {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let (tokens, d, ff, experts, top_k) = (5, 4, 3, 4, 2);
        let rand = |shape: &[usize], seed: u64| {
            let n: usize = shape.iter().product();
            let v = values(n, seed);
            Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
        };
        let x = rand(&[tokens, d], 1);
        let gates = rand(&[tokens, top_k], 2);
        let w = [
            rand(&[experts, ff, d], 3),
            rand(&[experts, ff, d], 4),
            rand(&[experts, d, ff], 5),
        ];
        // Expert 3 gets no token.
        let ids = [0u32, 1, 2, 0, 1, 2, 0, 2, 1, 0];
        let ep = ExpertParallel::new(&Single, 1, experts).unwrap();
        let local = LocalExperts {
            gate_proj: w[0].as_tensor(),
            up_proj: w[1].as_tensor(),
            down_proj: w[2].as_tensor(),
        };
        let (out, stats) = ep
            .forward(x.as_tensor(), &ids, gates.as_tensor(), &local)
            .unwrap();
        assert_eq!(stats.tokens_per_expert, [4, 3, 3, 0]);
        assert_eq!(
            (stats.rows_sent.clone(), stats.rows_received.clone()),
            (vec![10], vec![10])
        );
        assert_eq!(stats.remote_rows_sent(0), 0);
        let want = dense_reference(
            x.as_tensor(),
            &ids,
            gates.as_tensor(),
            [w[0].as_tensor(), w[1].as_tensor(), w[2].as_tensor()],
        );
        let probe = Tensor::from_vec(values(tokens * d, 9), (tokens, d), &dev).unwrap();
        let loss = (&out * &probe).unwrap().sum_all().unwrap();
        let want_loss = (&want * &probe).unwrap().sum_all().unwrap();
        let (got, want_grads) = (loss.backward().unwrap(), want_loss.backward().unwrap());
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(diff(&out, &want) < 1e-12, "{}", diff(&out, &want));
        for v in [&x, &gates, &w[0], &w[1], &w[2]] {
            let (a, b) = (got.get(v).unwrap(), want_grads.get(v).unwrap());
            assert!(diff(a, b) < 1e-12, "{}", diff(a, b));
        }
        // The unused expert's gradient is zero.
        let g3 = got.get(&w[0]).unwrap().get(3).unwrap();
        assert_eq!(
            g3.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn the_exchange_on_one_rank_is_the_identity_with_its_gradient() {
        use candle_core::{Device, Var};
        let group = ExchangeGroup::new(Rc::new(Single));
        let op = Exchange {
            group: group.id,
            send_rows: vec![3].into(),
            recv_rows: vec![3].into(),
            width: 2,
        };
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let x = Var::from_tensor(
                &Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let y = x.as_tensor().apply_op1(op.clone()).unwrap();
            assert_eq!(y.dtype(), dtype);
            assert_eq!(
                y.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                [[1., 2.], [3., 4.], [5., 6.]]
            );
            let grads = (y * 2.0).unwrap().sum_all().unwrap().backward().unwrap();
            let g = grads.get(&x).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(g.to_vec2::<f32>().unwrap(), [[2., 2.], [2., 2.], [2., 2.]]);
        }
        let err = Tensor::new(&[[1f32, 2.]], &Device::Cpu)
            .unwrap()
            .apply_op1(op)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    /// Deterministic values in [-1, 1) (the shared SplitMix64 stream).
    pub(super) fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = moelab_io::rng::SplitMix64::new(seed);
        (0..n).map(|_| rng.symmetric()).collect()
    }

    #[test]
    fn a_dropped_group_fails_the_exchange_cleanly() {
        let group = ExchangeGroup::new(Rc::new(Single));
        let id = group.id;
        drop(group);
        let op = Exchange {
            group: id,
            send_rows: vec![1].into(),
            recv_rows: vec![1].into(),
            width: 2,
        };
        let x = Tensor::new(&[[1f32, 2.]], &candle_core::Device::Cpu).unwrap();
        let err = x.apply_op1(op).unwrap_err().to_string();
        assert!(err.contains("not registered"), "{err}");
    }
}
