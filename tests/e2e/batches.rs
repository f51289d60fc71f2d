//! `moelab data batches` and `moelab sample`: the exported batches are the ones the trainer
//! consumed (checked against what the run itself recorded: the domains of each step's metrics
//! line and the router log's tokens per domain), on one rank and split over two; greedy samples
//! are deterministic and follow the argmax of `eval --dump-logits` step by step.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use moelab_trace::router_log::read_dir;

use crate::fixture::Fixture;
use crate::util::{arg, fails, moelab, ok};

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// `data batches` of the fixture's config into `file` (extra arguments after), with its JSON
/// summary.
fn export(fx: &Fixture, file: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "data",
        "batches",
        arg(&fx.config),
        "--out",
        arg(file),
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&moelab(&args))).unwrap()
}

fn u32s3(t: &Tensor) -> Vec<Vec<Vec<u32>>> {
    t.to_vec3::<u32>().unwrap()
}

#[test]
fn data_batches_are_what_train_consumes_on_one_and_two_ranks() {
    let fx = Fixture::new("batches", &["train.steps=10", "checkpoint.interval=0"]);
    ok(&fx.train("run", &[]));
    let run = fx.run_dir("run");

    let one = fx.dir.join("one.safetensors");
    let summary = export(&fx, &one, &["--steps", "1..10"]);
    let domains: Vec<String> = serde_json::from_value(summary["domains"].clone()).unwrap();
    let t = tensors(&one);
    assert_eq!(t["tokens"].dims(), &[10, 8, 32]);
    assert_eq!(t["domain_ids"].dims(), &[10, 8]);
    assert_eq!(
        t["steps"].to_vec1::<i64>().unwrap(),
        (1..=10).collect::<Vec<_>>()
    );
    let (tokens, targets) = (u32s3(&t["tokens"]), u32s3(&t["targets"]));
    let domain_ids = t["domain_ids"].to_vec2::<u32>().unwrap();
    assert_eq!(
        t["source_ids"].to_vec2::<u32>().unwrap(),
        vec![vec![0; 8]; 10]
    );
    // Targets are the next tokens of the same text.
    for (seq_tokens, seq_targets) in tokens.iter().flatten().zip(targets.iter().flatten()) {
        assert_eq!(seq_tokens[1..], seq_targets[..31]);
    }

    // The run's own record: each step's metrics line names the domains of its batch ...
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut seen_steps = 0;
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (Some(step), Some(losses)) = (v["step"].as_u64(), v["domain_loss"].as_object()) else {
            continue;
        };
        let logged: BTreeSet<&str> = losses.keys().map(String::as_str).collect();
        let exported: BTreeSet<&str> = domain_ids[step as usize - 1]
            .iter()
            .map(|&d| domains[d as usize].as_str())
            .collect();
        assert_eq!(logged, exported, "step {step}");
        seen_steps += 1;
    }
    assert_eq!(seen_steps, 10);
    // ... and the router log counts each domain's tokens over its steps.
    let chunks = read_dir(&run.join("router")).unwrap();
    assert_eq!(chunks.len(), 2, "a chunk every 5 steps");
    for chunk in &chunks {
        assert_eq!(chunk.domains, domains);
        let mut expected = vec![0i64; domains.len()];
        for step in chunk.step_start..=chunk.step_end {
            for &d in &domain_ids[step as usize - 1] {
                expected[d as usize] += 32;
            }
        }
        assert_eq!(
            chunk.tokens, expected,
            "steps {}..{}",
            chunk.step_start, chunk.step_end
        );
    }

    // Two ranks: each gets its half of every step, rank 0 first, as `mpirun -n 2 train` does.
    let halves: Vec<HashMap<String, Tensor>> = (0..2)
        .map(|rank| {
            let file = fx.dir.join(format!("rank{rank}.safetensors"));
            let rank = rank.to_string();
            export(
                &fx,
                &file,
                &["--steps", "3..7", "--rank", &rank, "--ranks", "2"],
            );
            tensors(&file)
        })
        .collect();
    for (i, step) in (3..=7).enumerate() {
        let joined: Vec<Vec<u32>> = halves
            .iter()
            .flat_map(|h| u32s3(&h["tokens"])[i].clone())
            .collect();
        assert_eq!(joined, tokens[step - 1], "step {step}");
        let joined_domains: Vec<u32> = halves
            .iter()
            .flat_map(|h| h["domain_ids"].to_vec2::<u32>().unwrap()[i].clone())
            .collect();
        assert_eq!(joined_domains, domain_ids[step - 1], "step {step}");
    }

    // JSON lines hold the same batches.
    let lines = fx.dir.join("rank1.jsonl");
    export(
        &fx,
        &lines,
        &["--steps", "3..7", "--rank", "1", "--ranks", "2"],
    );
    let text = std::fs::read_to_string(&lines).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 5);
    let first: Vec<Vec<u32>> = serde_json::from_value(rows[0]["tokens"].clone()).unwrap();
    assert_eq!(first, u32s3(&halves[1]["tokens"])[0]);
    assert_eq!(rows[0]["step"], 3);

    // Steps past the run, an empty range and a rank outside the job are refused by name.
    for (extra, says) in [
        (&["--steps", "5..11"][..], "train.steps"),
        (&["--steps", "0..3"][..], "numbered from 1"),
        (&["--steps", "4..2"][..], "A <= B"),
        (
            &["--steps", "1..2", "--rank", "2", "--ranks", "2"][..],
            "--rank 2",
        ),
        (
            &["--steps", "1..2", "--ranks", "3"][..],
            "train.global_batch_tokens",
        ),
    ] {
        let mut args = vec![
            "data",
            "batches",
            arg(&fx.config),
            "--out",
            "unused.safetensors",
        ];
        args.extend_from_slice(extra);
        let err = fails(&moelab(&args));
        assert!(err.contains(says), "{extra:?}: {err}");
    }
}

/// `moelab sample CKPT --prompt-ids IDS --max-tokens N --json ARGS...`: the generated ids.
fn sample_ids(ckpt: &Path, prompt: &[u32], max_tokens: usize, extra: &[&str]) -> Vec<u32> {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let (ids, max) = (ids.join(","), max_tokens.to_string());
    let mut args = vec![
        "sample",
        arg(ckpt),
        "--prompt-ids",
        &ids,
        "--max-tokens",
        &max,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out: serde_json::Value = serde_json::from_str(&ok(&moelab(&args))).unwrap();
    serde_json::from_value(out["generated_ids"].clone()).unwrap()
}

#[test]
fn greedy_sample_is_deterministic_and_the_argmax_of_the_dumped_logits() {
    let fx = Fixture::new("sample", &["train.steps=10", "checkpoint.interval=10"]);
    ok(&fx.train("run", &[]));
    let ckpt = fx.checkpoint("run", 10);
    let dump = fx.dir.join("dump.safetensors");
    ok(&moelab(&[
        "eval",
        arg(&ckpt),
        "--dump-logits",
        arg(&dump),
        "--tokens",
        "12",
    ]));
    let dumped = tensors(&dump);
    let ids: Vec<u32> = dumped["input_ids"].to_vec2::<i64>().unwrap()[0]
        .iter()
        .map(|&t| t as u32)
        .collect();
    let logits = dumped["logits"].to_vec3::<f32>().unwrap();

    // Step by step: after each prefix of the dumped sequence, greedy picks the dumped argmax
    // (within float noise of a forward over another batch shape).
    let mut agreed = 0;
    for t in 1..=8 {
        let row = &logits[0][t - 1];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        match sample_ids(&ckpt, &ids[..t], 1, &[]).as_slice() {
            [next] => {
                assert!(
                    row[*next as usize] >= max - 1e-4,
                    "prefix {t}: {next} is not the argmax"
                );
                agreed += 1;
            }
            // The argmax was the end-of-document token, which ends generation.
            [] => {}
            more => panic!("asked for one token, got {more:?}"),
        }
    }
    assert!(agreed >= 4, "most prefixes generate a token");

    // Deterministic, and N tokens at once are N single steps chained.
    let prompt = &ids[..4];
    let greedy = sample_ids(&ckpt, prompt, 6, &[]);
    assert_eq!(greedy, sample_ids(&ckpt, prompt, 6, &[]));
    let mut chained = prompt.to_vec();
    for _ in 0..greedy.len() {
        let next = sample_ids(&ckpt, &chained, 1, &[]);
        chained.extend(next);
    }
    assert_eq!(chained[4..], greedy[..]);

    // Sampling: the same seed gives the same tokens; top-k 1 is greedy.
    let hot = ["--temperature", "1.5", "--top-k", "20", "--seed", "3"];
    assert_eq!(
        sample_ids(&ckpt, prompt, 6, &hot),
        sample_ids(&ckpt, prompt, 6, &hot)
    );
    let top1 = ["--temperature", "1.0", "--top-k", "1"];
    assert_eq!(sample_ids(&ckpt, prompt, 6, &top1), greedy);

    // A text prompt on the run folder (its newest checkpoint) prints the prompt and its sequel.
    let run = fx.run_dir("run");
    let text = ok(&moelab(&[
        "sample",
        arg(&run),
        "--prompt",
        "def f(x):",
        "--max-tokens",
        "5",
    ]));
    assert!(text.starts_with("def f(x):"), "{text}");
    let again = ok(&moelab(&[
        "sample",
        arg(&run),
        "--prompt",
        "def f(x):",
        "--max-tokens",
        "5",
    ]));
    assert_eq!(text, again);
    let err = fails(&moelab(&[
        "sample",
        arg(&run),
        "--prompt",
        "x",
        "--temperature",
        "-1",
    ]));
    assert!(err.contains("--temperature"), "{err}");
}
