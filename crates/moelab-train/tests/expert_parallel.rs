//! Expert parallelism under a real `mpirun` (feature `mpi`): run directly, the test starts
//! itself under `mpirun -n 2` (EP = 2) and then `mpirun -n 4` (EP = 2 x expert-DP = 2). Each
//! rank checks its outputs and gradients against one process computing every expert for the
//! tokens of all ranks, and the gradients through the exchange against finite differences.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use moelab_train::dist::data_parallel::all_reduce_gradients;
use moelab_train::dist::expert_parallel::{ExpertParallel, LocalExperts};
use moelab_train::dist::{self, Collective, Single};

const D: usize = 8;
const FF: usize = 6;
const EXPERTS: usize = 4;
const TOP_K: usize = 2;
const TOKENS: usize = 5;

fn main() {
    if dist::launch_env().is_none() {
        for ranks in ["2", "4"] {
            let code = relaunch(ranks);
            if code != 0 {
                std::process::exit(code);
            }
        }
        return;
    }
    let comm = match dist::launch() {
        Ok(comm) => comm,
        Err(e) => {
            eprintln!("launch failed: {e}");
            std::process::exit(1);
        }
    };
    let world = comm.world_size();
    type Check = fn(&dyn Collective);
    let checks: [(&str, Check); 6] = [
        ("ep_matches_one_process_f64", |c| {
            matches_one_process(c, Routing::Spread, DType::F64, 1e-10)
        }),
        ("ep_matches_one_process_f32", |c| {
            matches_one_process(c, Routing::Spread, DType::F32, 1e-5)
        }),
        ("uneven_traffic_all_to_the_last_rank", |c| {
            matches_one_process(c, Routing::AllToLastRank, DType::F64, 1e-10)
        }),
        ("an_expert_with_no_tokens", |c| {
            matches_one_process(c, Routing::ExpertOneUnused, DType::F64, 1e-10)
        }),
        (
            "gradients_through_the_exchange_match_finite_differences",
            gradient_check,
        ),
        (
            "expert_gradients_sum_over_their_replicas_only",
            gradient_groups,
        ),
    ];
    for (name, check) in checks {
        check(comm.as_ref());
        comm.barrier();
        if comm.rank() == 0 {
            println!("test {name} ({world} ranks, expert_parallel 2) ... ok");
        }
    }
}

/// Runs this binary as `ranks` MPI ranks; returns the exit code.
fn relaunch(ranks: &str) -> i32 {
    let exe = std::env::current_exe().unwrap_or_default();
    let status = std::process::Command::new("mpirun")
        .args(["-n", ranks, "--oversubscribe"])
        .arg(exe)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .status();
    match status {
        Ok(s) => s.code().unwrap_or(1),
        Err(e) => {
            eprintln!("cannot run mpirun (install openmpi-bin): {e}");
            1
        }
    }
}

/// How the test tokens choose their experts.
#[derive(Debug, Clone, Copy)]
enum Routing {
    /// Pseudo-random, two distinct experts per token.
    Spread,
    /// Every token of every rank to experts 2 and 3 (the last EP index's): the other ranks
    /// receive no rows at all and their experts get zero gradients.
    AllToLastRank,
    /// Pseudo-random over experts 0, 2 and 3: expert 1 receives no token anywhere.
    ExpertOneUnused,
}

impl Routing {
    fn ids(self, rank: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(TOKENS * TOP_K);
        for t in 0..TOKENS {
            let h = (rank * 31 + t * 7 + 3) % 12;
            let (a, b) = match self {
                Routing::Spread => {
                    let a = h % EXPERTS;
                    (a, (a + 1 + h % (EXPERTS - 1)) % EXPERTS)
                }
                Routing::AllToLastRank => (2 + t % 2, 3 - t % 2),
                Routing::ExpertOneUnused => {
                    let allowed = [0, 2, 3];
                    (allowed[h % 3], allowed[(h + 1) % 3])
                }
            };
            out.extend([a as u32, b as u32]);
        }
        out
    }
}

/// Deterministic values in [-1, 1) (the shared SplitMix64 stream).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = moelab_io::rng::SplitMix64::new(seed);
    (0..n).map(|_| rng.symmetric()).collect()
}

fn tensor(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(values(n, seed), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// One rank's test inputs: its tokens, gates and the loss probe (seeded by the rank).
struct RankInputs {
    x: Var,
    gates: Var,
    probe: Tensor,
    ids: Vec<u32>,
}

fn rank_inputs(rank: usize, routing: Routing, dtype: DType) -> RankInputs {
    let seed = 100 * rank as u64;
    RankInputs {
        x: Var::from_tensor(&tensor(&[TOKENS, D], seed + 1, dtype)).unwrap(),
        gates: Var::from_tensor(&tensor(&[TOKENS, TOP_K], seed + 2, dtype)).unwrap(),
        probe: tensor(&[TOKENS, D], seed + 3, dtype),
        ids: routing.ids(rank),
    }
}

/// Every expert's weights, the same on every rank: gate, up (E, FF, D) and down (E, D, FF).
fn full_weights(dtype: DType) -> [Tensor; 3] {
    [
        tensor(&[EXPERTS, FF, D], 7, dtype),
        tensor(&[EXPERTS, FF, D], 8, dtype),
        tensor(&[EXPERTS, D, FF], 9, dtype),
    ]
}

const NAMES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn assert_close(what: &str, rank: usize, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "rank {rank}: {what}");
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1.0);
    let diff = max_diff(got, want);
    assert!(
        diff <= tol * scale,
        "rank {rank}: {what} differs by {diff} (scale {scale})"
    );
}

/// EP over the world (groups of 2) against one process running every expert on the tokens of
/// all ranks: outputs of this rank's tokens, their x and gate gradients, and this rank's
/// experts' gradients after the expert-DP sum.
fn matches_one_process(comm: &dyn Collective, routing: Routing, dtype: DType, tol: f64) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let ep = ExpertParallel::new(comm, 2, EXPERTS).unwrap();
    let local = ep.local_experts();
    let full = full_weights(dtype);
    let local_vars: Vec<Var> = full
        .iter()
        .map(|w| Var::from_tensor(&w.narrow(0, local.start, local.len()).unwrap()).unwrap())
        .collect();
    let mine = rank_inputs(rank, routing, dtype);
    let experts = LocalExperts {
        gate_proj: local_vars[0].as_tensor(),
        up_proj: local_vars[1].as_tensor(),
        down_proj: local_vars[2].as_tensor(),
    };
    let (out, stats) = ep
        .forward(
            mine.x.as_tensor(),
            &mine.ids,
            mine.gates.as_tensor(),
            &experts,
        )
        .unwrap();
    let mut grads = (&out * &mine.probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut expert_grads: HashMap<String, Tensor> = NAMES
        .iter()
        .zip(&local_vars)
        .filter_map(|(name, v)| Some((name.to_string(), grads.remove(v)?)))
        .collect();
    let params: Vec<(String, Var)> = NAMES
        .iter()
        .zip(&local_vars)
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    all_reduce_gradients(ep.expert_dp_group().as_ref(), &params, &mut expert_grads).unwrap();

    // The reference: every rank's tokens in one process, every expert local.
    let all: Vec<RankInputs> = (0..world).map(|r| rank_inputs(r, routing, dtype)).collect();
    let cat = |f: &dyn Fn(&RankInputs) -> Tensor| {
        Tensor::cat(&all.iter().map(f).collect::<Vec<_>>(), 0).unwrap()
    };
    let x_all = Var::from_tensor(&cat(&|r| r.x.as_tensor().clone())).unwrap();
    let gates_all = Var::from_tensor(&cat(&|r| r.gates.as_tensor().clone())).unwrap();
    let probe_all = cat(&|r| r.probe.clone());
    let ids_all: Vec<u32> = all.iter().flat_map(|r| r.ids.clone()).collect();
    let full_vars: Vec<Var> = full.iter().map(|w| Var::from_tensor(w).unwrap()).collect();
    let single = ExpertParallel::new(&Single, 1, EXPERTS).unwrap();
    let (want_out, want_stats) = single
        .forward(
            x_all.as_tensor(),
            &ids_all,
            gates_all.as_tensor(),
            &LocalExperts {
                gate_proj: full_vars[0].as_tensor(),
                up_proj: full_vars[1].as_tensor(),
                down_proj: full_vars[2].as_tensor(),
            },
        )
        .unwrap();
    let want_grads = (&want_out * &probe_all)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let rows = |t: &Tensor| t.narrow(0, rank * TOKENS, TOKENS).unwrap();
    assert_close("output", rank, &out, &rows(&want_out), tol);
    assert_close(
        "x gradient",
        rank,
        grads.get(&mine.x).unwrap(),
        &rows(want_grads.get(&x_all).unwrap()),
        tol,
    );
    assert_close(
        "gate gradient",
        rank,
        grads.get(&mine.gates).unwrap(),
        &rows(want_grads.get(&gates_all).unwrap()),
        tol,
    );
    // The expert-DP sum goes through `all_reduce_tensor`, which sums in f32 (training
    // gradients are f32): with replicas, f64 gradients come back rounded to f32.
    let weight_tol = if ep.expert_dp_group().world_size() > 1 {
        tol.max(1e-6)
    } else {
        tol
    };
    for (name, v) in NAMES.iter().zip(&full_vars) {
        let want = want_grads
            .get(v)
            .unwrap()
            .narrow(0, local.start, local.len())
            .unwrap();
        let got = expert_grads
            .get(*name)
            .cloned()
            .unwrap_or_else(|| want.zeros_like().unwrap());
        assert_close(name, rank, &got, &want, weight_tol);
    }
    check_stats(comm, routing, &stats, &want_stats.tokens_per_expert);
}

/// The counts: this rank's per-expert counts are what one process counts for its tokens, the
/// sums over ranks are the reference's, and the rows received match the routing.
fn check_stats(
    comm: &dyn Collective,
    routing: Routing,
    stats: &moelab_train::dist::expert_parallel::DispatchStats,
    all_ranks: &[usize],
) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut own = vec![0usize; EXPERTS];
    for &e in &routing.ids(rank) {
        own[e as usize] += 1;
    }
    assert_eq!(stats.tokens_per_expert, own, "rank {rank}");
    let summed: Vec<u64> = stats.tokens_per_expert.iter().map(|&c| c as u64).collect();
    let mut summed_f: Vec<f64> = summed.iter().map(|&c| c as f64).collect();
    comm.all_reduce_f64(&mut summed_f);
    let summed: Vec<usize> = summed_f.iter().map(|&c| c as usize).collect();
    assert_eq!(summed, all_ranks, "rank {rank}");
    assert_eq!(stats.rows_sent.iter().sum::<usize>(), TOKENS * TOP_K);
    if let Routing::AllToLastRank = routing {
        // Even EP indices hold experts 0 and 1, which nobody chose.
        let expected = if rank % 2 == 0 { 0 } else { 2 * TOKENS * TOP_K };
        assert_eq!(
            stats.rows_received.iter().sum::<usize>(),
            expected,
            "rank {rank} of {world}"
        );
        assert_eq!(
            stats.remote_rows_sent(rank % 2),
            if rank % 2 == 0 { TOKENS * TOP_K } else { 0 }
        );
    }
}

/// Central differences of the global loss (the sum over ranks of each rank's probe-weighted
/// output) in f64: one rank at a time bumps one coordinate of one of its inputs while the
/// others keep theirs, every rank runs the forward (the exchange needs all of them), and the
/// bumping rank compares with its autograd gradient, which includes what the other ranks'
/// losses send back through the exchange.
fn gradient_check(comm: &dyn Collective) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let ep = ExpertParallel::new(comm, 2, EXPERTS).unwrap();
    let local = ep.local_experts();
    let mine = rank_inputs(rank, Routing::Spread, DType::F64);
    let weights: Vec<Var> = full_weights(DType::F64)
        .iter()
        .map(|w| Var::from_tensor(&w.narrow(0, local.start, local.len()).unwrap()).unwrap())
        .collect();
    let inputs: Vec<&Var> = [&mine.x, &mine.gates]
        .into_iter()
        .chain(weights.iter())
        .collect();
    let local_loss = || {
        let experts = LocalExperts {
            gate_proj: weights[0].as_tensor(),
            up_proj: weights[1].as_tensor(),
            down_proj: weights[2].as_tensor(),
        };
        let (out, _) = ep
            .forward(
                mine.x.as_tensor(),
                &mine.ids,
                mine.gates.as_tensor(),
                &experts,
            )
            .unwrap();
        (&out * &mine.probe).unwrap().sum_all().unwrap()
    };
    let global_loss = || {
        let mut value = [local_loss().to_scalar::<f64>().unwrap()];
        comm.all_reduce_f64(&mut value);
        value[0]
    };
    let grads = local_loss().backward().unwrap();
    let eps = 1e-6;
    let mut worst = 0f64;
    let mut checked = 0;
    for bumping in 0..world {
        for (i, var) in inputs.iter().enumerate() {
            let original = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let analytic = grads
                .get(var.as_tensor())
                .map(|g| g.flatten_all().unwrap().to_vec1::<f64>().unwrap())
                .unwrap_or_else(|| vec![0.0; original.len()]);
            // The same coordinates on every rank, so every rank runs the same forwards.
            let coords: Vec<usize> = (0..5).map(|j| (j * 7 + i) % original.len()).collect();
            for &c in &coords {
                let mut numeric = 0.0;
                for sign in [1.0, -1.0] {
                    if rank == bumping {
                        let mut bumped = original.clone();
                        bumped[c] += sign * eps;
                        var.set(
                            &Tensor::from_vec(bumped, var.shape().clone(), &Device::Cpu).unwrap(),
                        )
                        .unwrap();
                    }
                    numeric += sign * global_loss() / (2.0 * eps);
                }
                if rank == bumping {
                    var.set(
                        &Tensor::from_vec(original.clone(), var.shape().clone(), &Device::Cpu)
                            .unwrap(),
                    )
                    .unwrap();
                    let err = (numeric - analytic[c]).abs()
                        / numeric.abs().max(analytic[c].abs()).max(1e-3);
                    assert!(
                        err < 1e-6,
                        "rank {rank}, input {i}, coordinate {c}: autograd {} vs finite differences {numeric}",
                        analytic[c]
                    );
                    worst = worst.max(err);
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 5 * inputs.len());
    if rank == 0 {
        println!(
            "  gradient check: {checked} coordinates per rank, worst relative error {worst:.2e}"
        );
    }
}

/// `ExpertParallel::all_reduce_gradients`: a replicated parameter's gradient is summed over all
/// ranks, an expert's over the ranks holding the same experts (the expert-DP group).
fn gradient_groups(comm: &dyn Collective) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let ep = ExpertParallel::new(comm, 2, EXPERTS).unwrap();
    let var = |n: usize| Var::zeros(n, DType::F32, &Device::Cpu).unwrap();
    let params = vec![
        ("blocks.0.attn.q_proj.weight".to_string(), var(2)),
        ("blocks.0.moe.experts.gate_proj".to_string(), var(3)),
    ];
    let r = rank as f32 + 1.0;
    let mut grads: HashMap<String, Tensor> = params
        .iter()
        .map(|(name, v)| {
            let g = Tensor::full(r, v.shape(), &Device::Cpu).unwrap();
            (name.clone(), g)
        })
        .collect();
    ep.all_reduce_gradients(comm, &params, &mut grads, &|name: &str| {
        name.contains(".experts.")
    })
    .unwrap();
    let all: f32 = (1..=world).map(|r| r as f32).sum();
    // Ranks with the same index in their EP group: rank % 2, rank % 2 + 2, ...
    let replicas: f32 = (0..world)
        .filter(|other| other % 2 == rank % 2)
        .map(|other| other as f32 + 1.0)
        .sum();
    let value = |name: &str| grads[name].to_vec1::<f32>().unwrap();
    assert_eq!(
        value("blocks.0.attn.q_proj.weight"),
        [all; 2],
        "rank {rank}"
    );
    assert_eq!(
        value("blocks.0.moe.experts.gate_proj"),
        [replicas; 3],
        "rank {rank}"
    );
}
