//! `moelab train` / `moelab eval` / `moelab bench`: exact resume after SIGKILL, SIGTERM
//! checkpoints, the NaN guard, refused resumes, checkpoint pruning, bf16 and the bench report.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moelab_trace::router_log::read_dir;

use crate::fixture::{read, wait_for, Fixture};
use crate::util::{arg, fails, moelab, ok};

/// The train tests' runs update the expert biases (auxiliary-loss-free balancing) too.
const EXPERT_BIAS: &[&str] = &["model.moe.expert_bias=true"];

fn steps_of(run_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let path = e.ok()?.path();
                    let name = path.file_name()?.to_str()?.to_string();
                    path.join("state.json").exists().then_some(())?;
                    name.strip_prefix("step-")?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps
}

/// metrics.jsonl without the timing fields, which legitimately differ between runs.
fn metrics_without_timing(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(obj) = v.as_object_mut() {
                for timing in ["tokens_per_s", "mfu", "time", "elapsed_s"] {
                    obj.remove(timing);
                }
            }
            v
        })
        .collect()
}

#[test]
fn resume_after_sigkill_is_bit_identical_to_an_uninterrupted_run() {
    let fx = Fixture::new("train-kill", EXPERT_BIAS);
    ok(&fx.train("straight", &[]));

    let mut child = fx
        .command("killed", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        &fx.run_dir("killed")
            .join("checkpoints/step-00000020/state.json"),
        &mut child,
    );
    child.kill().unwrap(); // SIGKILL: no chance to save anything
    child.wait().unwrap();
    let before = steps_of(&fx.run_dir("killed"));
    assert!(
        before.contains(&20) && !before.contains(&40),
        "killed mid-run: {before:?}"
    );

    ok(&fx.train("killed", &["--resume", "auto"]));
    let (a, b) = (fx.run_dir("straight"), fx.run_dir("killed"));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let path = format!("checkpoints/step-00000040/{file}");
        assert!(
            read(&a.join(&path)) == read(&b.join(&path)),
            "{file} differs after resume"
        );
    }
    assert_eq!(metrics_without_timing(&a), metrics_without_timing(&b));
    let losses: Vec<f64> = metrics_without_timing(&a)
        .iter()
        .filter_map(|m| m["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 40);
    assert!(
        losses[35..].iter().sum::<f64>() < losses[..5].iter().sum::<f64>(),
        "loss falls: {losses:?}"
    );
    // Router logs: the same chunks with the same numbers (the files' metadata order may differ).
    let (chunks_a, chunks_b) = (
        read_dir(&a.join("router")).unwrap(),
        read_dir(&b.join("router")).unwrap(),
    );
    assert_eq!(chunks_a.len(), 8, "a chunk every 5 steps");
    assert_eq!(chunks_a, chunks_b);
    assert!(a.join("eval/step-00000040.json").exists());
}

#[test]
fn sigterm_saves_a_checkpoint_and_exits_cleanly() {
    let fx = Fixture::new("train-term", EXPERT_BIAS);
    let child = fx
        .command(
            "run",
            &["--set", "checkpoint.interval=0", "--set", "train.steps=400"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = fx.run_dir("run").join("metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |t| t.lines().count() < 3) {
        assert!(start.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    ok(&out);
    let steps = steps_of(&fx.run_dir("run"));
    assert_eq!(steps.len(), 1, "one checkpoint saved on SIGTERM: {steps:?}");
    assert!(steps[0] >= 3 && steps[0] < 400, "{steps:?}");
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let fx = Fixture::new("train-nan", EXPERT_BIAS);
    let out = fx.train(
        "skip",
        &[
            "--set",
            "train.steps=6",
            "--set",
            "train.debug_nan_steps=[3]",
        ],
    );
    ok(&out);
    let metrics = metrics_without_timing(&fx.run_dir("skip"));
    let skipped: Vec<&serde_json::Value> =
        metrics.iter().filter(|m| m["skipped"] == true).collect();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0]["step"], 3);
    assert_eq!(metrics.iter().filter(|m| m["loss"].is_number()).count(), 5);

    let out = fx.train(
        "stop",
        &[
            "--set",
            "train.steps=10",
            "--set",
            "checkpoint.interval=2",
            "--set",
            "train.debug_nan_steps=[4,5,6]",
        ],
    );
    let err = fails(&out);
    assert!(
        err.contains("3 consecutive steps") && err.contains("step-00000002"),
        "{err}"
    );
    // No checkpoint is written on a non-finite step; the last good one is intact.
    assert_eq!(steps_of(&fx.run_dir("stop")), vec![2]);
    ok(&fx.train(
        "stop",
        &[
            "--resume",
            "auto",
            "--set",
            "train.steps=4",
            "--set",
            "checkpoint.interval=2",
        ],
    ));
}

#[test]
fn incompatible_resumes_and_foreign_run_dirs_are_refused() {
    let fx = Fixture::new("train-refuse", EXPERT_BIAS);
    ok(&fx.train(
        "run",
        &["--set", "train.steps=2", "--set", "checkpoint.interval=2"],
    ));
    // Another config in the same folder without --resume.
    let out = fx.train("run", &["--set", "train.steps=2", "--set", "train.lr=1e-3"]);
    let err = fails(&out);
    assert!(err.contains("another run's config"), "{err}");
    // Same config, but checkpoints exist.
    let out = fx.train(
        "run",
        &["--set", "train.steps=2", "--set", "checkpoint.interval=2"],
    );
    let err = fails(&out);
    assert!(err.contains("--resume auto"), "{err}");
    // A checkpoint whose shapes do not fit the config.
    let out = fx.train(
        "run",
        &[
            "--resume",
            "auto",
            "--set",
            "train.steps=4",
            "--set",
            "model.moe.expert_ff=48",
        ],
    );
    let err = fails(&out);
    assert!(
        err.contains("moe.experts.") && err.contains("shape"),
        "{err}"
    );
    // A changed mixture needs the explicit flag...
    let changed = [
        "--resume",
        "auto",
        "--set",
        "train.steps=4",
        "--set",
        "data.mixture.math=0.6",
    ];
    let err = fails(&fx.train("run", &changed));
    assert!(err.contains("mixture"), "{err}");
    // ...with which it continues as a new data stage.
    let mut allowed = changed.to_vec();
    allowed.push("--allow-mixture-change");
    ok(&fx.train("run", &allowed));
    assert_eq!(steps_of(&fx.run_dir("run")), vec![2, 4]);
}

#[test]
fn keep_last_prunes_old_checkpoints_but_keeps_milestones() {
    let fx = Fixture::new("train-prune", EXPERT_BIAS);
    ok(&fx.train(
        "run",
        &[
            "--set",
            "train.steps=6",
            "--set",
            "checkpoint.interval=1",
            "--set",
            "checkpoint.keep_last=2",
            "--set",
            "checkpoint.milestones=[1]",
        ],
    ));
    assert_eq!(steps_of(&fx.run_dir("run")), vec![1, 5, 6]);
    // eval on demand for a checkpoint.
    let checkpoint = fx.run_dir("run").join("checkpoints/step-00000006");
    let out = moelab(&["eval", "--json", arg(&checkpoint)]);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(report["step"], 6);
    assert_eq!(report["domains"].as_array().unwrap().len(), 3);
    let shares = &report["expert_share"]["0"]["code"];
    let total: f64 = shares
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((total - 2.0).abs() < 1e-9, "shares sum to top_k: {total}");
}

#[test]
fn bf16_precision_tracks_the_f32_run_and_checkpoints_stay_f32() {
    let fx = Fixture::new("train-bf16", EXPERT_BIAS);
    let short = ["--set", "train.steps=8", "--set", "checkpoint.interval=0"];
    ok(&fx.train("f32", &short));
    let mut bf16 = short.to_vec();
    bf16.extend(["--set", "train.precision=\"bf16\""]);
    ok(&fx.train("bf16", &bf16));
    let loss = |run: &str| -> Vec<f64> {
        metrics_without_timing(&fx.run_dir(run))
            .iter()
            .filter_map(|m| m["loss"].as_f64())
            .collect()
    };
    let (a, b) = (loss("f32"), loss("bf16"));
    assert_eq!(a.len(), 8);
    assert_eq!(a.len(), b.len());
    assert_ne!(
        a, b,
        "bf16 compute changed nothing: was the precision applied?"
    );
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() < 0.02 * x.abs(),
            "step {}: f32 {x} vs bf16 {y}",
            step + 1
        );
    }
    // Master weights are saved in f32 whatever the compute precision.
    let ckpt = fx
        .run_dir("bf16")
        .join("checkpoints/step-00000008/model.safetensors");
    let tensors = candle_core::safetensors::load(&ckpt, &candle_core::Device::Cpu).unwrap();
    assert!(!tensors.is_empty());
    for (name, tensor) in tensors {
        assert_eq!(tensor.dtype(), candle_core::DType::F32, "{name}");
    }
}

#[test]
fn bench_reports_json_and_cuda_without_the_feature_is_a_clear_error() {
    let fx = Fixture::new("train-bench", EXPERT_BIAS);
    let out = moelab(&[
        "bench",
        arg(&fx.config),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["steps"], 2);
    assert!(report["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["last_loss"].as_f64().unwrap().is_finite());
    // One thread (the fixture's): micro-batches in turn, forward and backward timed apart.
    assert_eq!(report["concurrent_micro_batches"], 1);
    let ms = |r: &serde_json::Value, key: &str| r[key].as_f64();
    let (forward, backward) = (ms(&report, "forward_ms"), ms(&report, "backward_ms"));
    assert!(
        forward.unwrap() > 0.0 && backward.unwrap() > 0.0,
        "{report}"
    );
    assert!(
        ms(&report, "forward_backward_ms").unwrap() > 0.0,
        "{report}"
    );

    // Two threads: its two micro-batches overlap, so only their sum is given.
    let out = moelab(&[
        "bench",
        arg(&fx.config),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--set",
        "run.threads=2",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(report["concurrent_micro_batches"], 2);
    assert!(
        ms(&report, "forward_backward_ms").unwrap() > 0.0,
        "{report}"
    );
    for split in ["forward_ms", "backward_ms"] {
        assert!(report.get(split).is_none(), "{split} given: {report}");
    }
    let step = ms(&report, "step_ms").unwrap();
    let parts = ms(&report, "forward_backward_ms").unwrap() + ms(&report, "optimizer_ms").unwrap();
    assert!(parts > 0.3 * step && parts < 3.0 * step, "{report}");
    if !cfg!(feature = "cuda") {
        let stderr = fails(&moelab(&[
            "bench",
            arg(&fx.config),
            "--set",
            "run.device=cuda",
        ]));
        assert!(
            stderr.contains("run.device") && stderr.contains("--features cuda"),
            "{stderr}"
        );
    }
}

/// The `f64` field `key` of every metrics.jsonl line that has it, by step.
fn logged(run_dir: &Path, key: &str) -> Vec<(u64, f64)> {
    metrics_without_timing(run_dir)
        .iter()
        .filter_map(|m| Some((m["step"].as_u64()?, m[key].as_f64()?)))
        .collect()
}

#[test]
fn logged_loss_is_the_mean_over_the_log_interval() {
    let fx = Fixture::new("train-mean", &["train.steps=10", "checkpoint.interval=0"]);
    ok(&fx.train("every", &[]));
    ok(&fx.train("fifth", &["--set", "log.interval=5"]));
    let (every, fifth) = (fx.run_dir("every"), fx.run_dir("fifth"));
    // With one step per line the mean is the step's own loss.
    assert_eq!(logged(&every, "loss"), logged(&every, "step_loss"));
    for key in ["loss", "lm_loss"] {
        let steps = logged(&every, key);
        let step_key = format!("step_{key}");
        let means: Vec<(u64, f64)> = [5u64, 10]
            .iter()
            .map(|&end| {
                let window = &steps[(end - 5) as usize..end as usize];
                (end, window.iter().map(|(_, v)| v).sum::<f64>() / 5.0)
            })
            .collect();
        assert_eq!(
            logged(&fifth, key),
            means,
            "{key}: the mean of the interval"
        );
        let own: Vec<(u64, f64)> = steps.iter().copied().filter(|(s, _)| s % 5 == 0).collect();
        assert_eq!(logged(&fifth, &step_key), own, "{step_key}: the step's own");
    }
}

#[test]
fn interval_means_are_bit_identical_after_a_resume_between_two_lines() {
    // Lines every 3 steps, a checkpoint at 20: steps 19 and 20 are in the window it saves.
    let fx = Fixture::new("train-mean-resume", &["log.interval=3"]);
    ok(&fx.train("run", &[]));
    let run = fx.run_dir("run");
    let straight = metrics_without_timing(&run);
    let checkpoint = fx.checkpoint("run", 20);
    ok(&fx.train("run", &["--resume", arg(&checkpoint)]));
    assert_eq!(metrics_without_timing(&run), straight);
    let line_21 = straight.iter().find(|m| m["step"] == 21).unwrap();
    assert_ne!(
        line_21["loss"], line_21["step_loss"],
        "a mean of three steps"
    );
}
