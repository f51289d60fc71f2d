//! The MPI collective under a real `mpirun -n 2` (feature `mpi`). Run directly, the test starts
//! itself under mpirun; each rank then checks every collective against values it can compute.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use moelab_train::dist::{self, Collective};
use moelab_train::TrainError;

fn main() {
    if dist::launch_env().is_none() {
        std::process::exit(relaunch());
    }
    let comm = match dist::launch() {
        Ok(comm) => comm,
        Err(e) => {
            eprintln!("launch failed: {e}");
            std::process::exit(1);
        }
    };
    type Check = fn(&dyn Collective);
    let checks: [(&str, Check); 10] = [
        ("all_reduce", all_reduce),
        (
            "reduce_scatter_and_all_gather",
            reduce_scatter_and_all_gather,
        ),
        ("broadcast", broadcast),
        ("agree_names_the_failing_rank", agree_names_the_failing_rank),
        ("check_same_lists_every_rank", check_same_lists_every_rank),
        ("tensors", tensors),
        ("global_balance_counts", global_balance_counts),
        ("sharded_adamw_matches_adamw", sharded_adamw_matches_adamw),
        ("all_to_all_with_uneven_and_zero_counts", all_to_all),
        ("split_makes_sub_communicators", split),
    ];
    for (name, check) in checks {
        check(comm.as_ref());
        comm.barrier();
        if comm.rank() == 0 {
            println!("test {name} ... ok");
        }
    }
}

/// Runs this binary as 2 MPI ranks; returns the exit code.
fn relaunch() -> i32 {
    let exe = std::env::current_exe().unwrap_or_default();
    let status = std::process::Command::new("mpirun")
        .args(["-n", "2", "--oversubscribe"])
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

fn all_reduce(comm: &dyn Collective) {
    assert_eq!(comm.world_size(), 2);
    let r = comm.rank() as f32;
    let mut values = vec![r, 10.0 + r, -1.0];
    comm.all_reduce_f32(&mut values);
    assert_eq!(values, [1.0, 21.0, -2.0]);
    let mut wide = vec![0.25f64 * (comm.rank() + 1) as f64; 5];
    comm.all_reduce_f64(&mut wide);
    assert_eq!(wide, [0.75; 5]);
    let mut max = [comm.rank() as u64 * 7, 3];
    comm.all_reduce_max_u64(&mut max);
    assert_eq!(max, [7, 3]);
    assert!(dist::any(comm, comm.rank() == 1));
    assert!(!dist::any(comm, false));
}

fn reduce_scatter_and_all_gather(comm: &dyn Collective) {
    let r = comm.rank() as f32;
    // Rank r sends [r, r+1, r+2, r+3]; the sum is [1, 3, 5, 7].
    let values: Vec<f32> = (0..4).map(|i| r + i as f32).collect();
    let block = comm.reduce_scatter_f32(&values);
    let want: &[f32] = if comm.rank() == 0 {
        &[1.0, 3.0]
    } else {
        &[5.0, 7.0]
    };
    assert_eq!(block, want);
    assert_eq!(comm.all_gather_f32(&block), [1.0, 3.0, 5.0, 7.0]);
    assert_eq!(comm.all_gather_u64(&[comm.rank() as u64 + 40]), [40, 41]);
}

fn broadcast(comm: &dyn Collective) {
    let mut bytes = if comm.rank() == 1 {
        b"from rank one".to_vec()
    } else {
        vec![9; 100]
    };
    comm.broadcast_bytes(&mut bytes, 1);
    assert_eq!(bytes, b"from rank one");
}

fn agree_names_the_failing_rank(comm: &dyn Collective) {
    let mine: Result<u32, TrainError> = if comm.rank() == 1 {
        Err(TrainError::Argument("no data on this node".into()))
    } else {
        Ok(5)
    };
    let err = dist::agree(comm, mine).unwrap_err().to_string();
    assert_eq!(err, "distributed: rank 1 of 2: no data on this node");
    assert_eq!(dist::agree(comm, Ok::<_, TrainError>(3)).unwrap(), 3);
}

fn check_same_lists_every_rank(comm: &dyn Collective) {
    dist::check_same(comm, "config", 42, dist::Shown::Fingerprint).unwrap();
    let err = dist::check_same(
        comm,
        "config hash",
        comm.rank() as u64,
        dist::Shown::Fingerprint,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("disagree on the config hash"), "{err}");
    assert!(err.contains("rank 0: 0000000000000000"), "{err}");
    assert!(err.contains("rank 1: 0000000000000001"), "{err}");
    let err = dist::check_same(
        comm,
        "checkpoint step",
        100 + comm.rank() as u64,
        dist::Shown::Count,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("rank 0: 100, rank 1: 101"), "{err}");
}

fn tensors(comm: &dyn Collective) {
    use candle_core::{Device, Tensor};
    let r = comm.rank() as f32;
    let t = Tensor::new(&[[r, 1.0], [2.0, r]], &Device::Cpu).unwrap();
    let sum = comm.all_reduce_tensor(&t).unwrap();
    assert_eq!(sum.dims(), [2, 2]);
    assert_eq!(sum.to_vec2::<f32>().unwrap(), [[1.0, 2.0], [4.0, 1.0]]);
    let flat = Tensor::new(&[r, r, 1.0, 1.0], &Device::Cpu).unwrap();
    let block = comm.reduce_scatter_tensor(&flat).unwrap();
    let gathered = comm.all_gather_tensor(&block).unwrap();
    assert_eq!(gathered.to_vec1::<f32>().unwrap(), [1.0, 1.0, 2.0, 2.0]);
}

/// Global-batch balancing over 2 micro-batches x 2 ranks: one MoE layer, 4 experts, top-2,
/// 2 tokens per micro-batch.
fn global_balance_counts(comm: &dyn Collective) {
    use moelab_train::balance::ExpertCounts;
    let micro_batches: [[u32; 4]; 2] = match comm.rank() {
        0 => [[0, 1, 0, 1], [0, 2, 1, 0]],
        _ => [[3, 2, 0, 3], [1, 0, 0, 2]],
    };
    let mut counts = ExpertCounts::new(1, 4);
    for choices in micro_batches {
        counts.add(&[choices.to_vec()]).unwrap();
    }
    // Rank 0: expert 0 x4, 1 x3, 2 x1; rank 1: 0 x3, 1 x1, 2 x2, 3 x2. Together 7, 4, 3, 2 of 16.
    let want = [7.0 / 16.0, 4.0 / 16.0, 3.0 / 16.0, 2.0 / 16.0];
    assert_eq!(counts.global_fractions(comm), [want]);
}

/// ZeRO-1 on 2 ranks: the same weights as AdamW on the summed gradients, half the state each.
fn sharded_adamw_matches_adamw(comm: &dyn Collective) {
    use candle_core::{Device, Tensor, Var};
    use moelab_train::optim::{AdamW, AdamWParams, ShardedAdamW};
    use std::collections::HashMap;
    let hyper = AdamWParams {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    // 7 + 3 elements in one bucket: padded to 10, 5 per rank.
    let vars = || {
        vec![
            (
                "a".to_string(),
                Var::new(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &Device::Cpu).unwrap(),
            ),
            (
                "norm".to_string(),
                Var::new(&[0.5f32, -0.5, 1.5], &Device::Cpu).unwrap(),
            ),
        ]
    };
    let grads_of = |rank: usize, step: usize| {
        let s = (rank + 2 * step) as f32;
        HashMap::from([
            (
                "a".to_string(),
                Tensor::new(&[s, -1.0, 0.5, s * s, 2.0, -s, 0.25], &Device::Cpu).unwrap(),
            ),
            (
                "norm".to_string(),
                Tensor::new(&[1.0f32, s, -2.0], &Device::Cpu).unwrap(),
            ),
        ])
    };
    let no_decay = ["norm".to_string()];
    let (full_vars, shard_vars) = (vars(), vars());
    let mut full = AdamW::new(full_vars.clone(), hyper.clone(), &no_decay).unwrap();
    let mut sharded = ShardedAdamW::new(
        shard_vars.clone(),
        hyper,
        &no_decay,
        (comm.rank(), comm.world_size()),
        1 << 20,
    )
    .unwrap();
    for step in 0..3 {
        let (g0, g1) = (grads_of(0, step), grads_of(1, step));
        let summed: HashMap<String, Tensor> = g0
            .iter()
            .map(|(n, t)| (n.clone(), (t + &g1[n]).unwrap()))
            .collect();
        let norm = full.grad_norm(&summed).unwrap();
        full.step(&summed, 0.01, 1.0 / norm).unwrap();
        let shards = sharded
            .reduce_scatter(comm, &grads_of(comm.rank(), step))
            .unwrap();
        let sharded_norm = sharded.grad_norm(comm, &shards).unwrap();
        assert!(
            (sharded_norm - norm).abs() <= 1e-6 * norm,
            "{sharded_norm} vs {norm}"
        );
        sharded.step(comm, &shards, 0.01, 1.0 / norm).unwrap();
    }
    for ((name, a), (_, b)) in full_vars.iter().zip(&shard_vars) {
        let a = a.as_tensor().to_vec1::<f32>().unwrap();
        let b = b.as_tensor().to_vec1::<f32>().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{name}: {a:?} vs {b:?}"
            );
        }
    }
    // Per-rank optimizer state: 2 moments x 5 f32 = 40 bytes, half of the full 80.
    assert_eq!(full.state_bytes(), 80);
    assert_eq!(sharded.state_bytes(), 40);
    // The gathered state is the full optimizer's.
    let (_, gathered) = sharded.state(comm).unwrap();
    let (_, whole) = full.state().unwrap();
    let whole: HashMap<String, Tensor> = whole.into_iter().collect();
    for (name, t) in gathered {
        let (x, y) = (
            t.to_vec1::<f32>().unwrap(),
            whole[&name].to_vec1::<f32>().unwrap(),
        );
        for (x, y) in x.iter().zip(&y) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "{name}");
        }
    }
}

/// Rank 0 sends 1 value to itself and 3 to rank 1; rank 1 sends 0 to rank 0 and 2 to itself.
fn all_to_all(comm: &dyn Collective) {
    let r = comm.rank();
    let counts = comm
        .all_to_all_u64(&[10 * r as u64, 10 * r as u64 + 1])
        .unwrap();
    let want: &[u64] = if r == 0 { &[0, 10] } else { &[1, 11] };
    assert_eq!(counts, want);
    let (send, send_counts, recv_counts): (Vec<f32>, [usize; 2], [usize; 2]) = if r == 0 {
        (vec![0.5, 1.0, 2.0, 3.0], [1, 3], [1, 0])
    } else {
        (vec![-1.0, -2.0], [0, 2], [3, 2])
    };
    let got = comm
        .all_to_all_v_f32(&send, &send_counts, &recv_counts)
        .unwrap();
    let want: &[f32] = if r == 0 {
        &[0.5]
    } else {
        &[1.0, 2.0, 3.0, -1.0, -2.0]
    };
    assert_eq!(got, want);
    // f64 keeps every bit: rank r sends r + 1 + eps to rank 0 and its negative to rank 1.
    let value = |rank: usize| rank as f64 + 1.0 + f64::EPSILON;
    let sign = if r == 0 { 1.0 } else { -1.0 };
    let got = comm
        .all_to_all_v_f64(&[value(r), -value(r)], &[1, 1], &[1, 1])
        .unwrap();
    assert_eq!(got, [sign * value(0), sign * value(1)]);
    // Counts that do not add up are refused before any message.
    let err = comm
        .all_to_all_v_f32(&[1.0], &[1, 1], &[1, 1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("add up to 2 elements but 1"), "{err}");
    let err = comm.all_to_all_u64(&[1, 2, 3]).unwrap_err().to_string();
    assert!(err.contains("3 values"), "{err}");
}

fn split(comm: &dyn Collective) {
    let r = comm.rank();
    // Each rank alone: every collective is local.
    let alone = comm.split(r, r).unwrap();
    assert_eq!((alone.rank(), alone.world_size()), (0, 1));
    let mut v = [r as f32 + 1.0];
    alone.all_reduce_f32(&mut v);
    assert_eq!(v, [r as f32 + 1.0]);
    // Both, ordered by the key in reverse: world rank 1 becomes rank 0.
    let both = comm.split(7, 1 - r).unwrap();
    assert_eq!((both.rank(), both.world_size()), (1 - r, 2));
    assert_eq!(both.all_gather_u64(&[r as u64]), [1, 0]);
    let moved = both
        .all_to_all_v_f32(&[r as f32, r as f32], &[1, 1], &[1, 1])
        .unwrap();
    assert_eq!(moved, [1.0, 0.0]);
}
