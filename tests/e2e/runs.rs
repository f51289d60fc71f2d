//! Trustworthy runs: a resumed run owns its results, one process per run folder, refused runs
//! change nothing, the non-finite stop names only a good checkpoint, a closed stdout never
//! kills a command, and the messages a new user meets name what and where.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::fixture::{read, wait_for, Fixture};
use crate::util::{self, arg, fails, moelab, ok, stdout};

/// Validation losses of `moelab eval TARGET --json`.
fn eval_losses(target: &Path) -> Vec<f64> {
    let json: serde_json::Value =
        serde_json::from_str(&ok(&moelab(&["eval", arg(target), "--json"]))).unwrap();
    json["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["loss"].as_f64().unwrap_or(f64::NAN))
        .collect()
}

#[test]
fn resuming_from_an_older_checkpoint_replaces_what_came_after_it() {
    let fx = Fixture::new("runs-older", &[]);
    ok(&fx.train("run", &[]));
    let original = read(&fx.checkpoint("run", 40).join("model.safetensors"));

    // Back to step 20 with another learning rate: the new continuation owns step 40.
    let from = fx.checkpoint("run", 20);
    let out = ok(&fx.train("run", &["--resume", arg(&from), "--set", "train.lr=1e-2"]));
    assert!(out.contains("moved to"), "{out}");
    let resumed = read(&fx.checkpoint("run", 40).join("model.safetensors"));
    assert!(resumed != original, "step 40 is still the old run's model");
    assert!(eval_losses(&fx.checkpoint("run", 40))
        .iter()
        .all(|l| l.is_finite()));
    // The old continuation is set aside, not lost.
    let abandoned = fx
        .run_dir("run")
        .join("abandoned/after-step-00000020-1/step-00000040/model.safetensors");
    assert_eq!(read(&abandoned), original);
    // Everything logged past step 20 is the new run's: one line per step, the new rate.
    let metrics = std::fs::read_to_string(fx.run_dir("run").join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>());
    let config = std::fs::read_to_string(fx.run_dir("run").join("config.toml")).unwrap();
    assert!(config.contains("lr = 0.01"), "{config}");
    assert!(fx.run_dir("run").join("config.previous-1.toml").exists());
}

#[test]
fn a_second_trainer_on_a_run_folder_is_refused_and_the_first_is_undisturbed() {
    let fx = Fixture::new("runs-lock", &[]);
    let mut first = fx
        .command("shared", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&fx.run_dir("shared").join("metrics.jsonl"), &mut first);
    let err = fails(&fx.train("shared", &[]));
    assert!(
        err.contains(&format!("in use by process {}", first.id())),
        "{err}"
    );
    let err = fails(&fx.train("shared", &["--resume", "auto"]));
    assert!(err.contains("in use by process"), "{err}");
    assert!(first.wait().unwrap().success());
    ok(&fx.train("alone", &[]));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            read(&fx.checkpoint("shared", 40).join(file))
                == read(&fx.checkpoint("alone", 40).join(file)),
            "{file} differs from an undisturbed run"
        );
    }
}

#[test]
fn refused_runs_leave_the_run_folder_as_it_was() {
    let fx = Fixture::new("runs-refused", &["train.steps=2", "checkpoint.interval=2"]);
    // A run that fails before its first step does not keep (or block) its folder.
    let err = fails(&fx.train("run", &["--set", "model.vocab_size=64"]));
    assert!(err.contains("model.vocab_size"), "{err}");
    assert!(!fx.run_dir("run").exists());
    // Evaluation data that cannot give a sequence is refused before step 1, not after training.
    let err = fails(&fx.train("run", &["--set", "data.validation_tokens=8"]));
    assert!(err.contains("data.validation_tokens"), "{err}");
    assert!(!fx.run_dir("run").exists());
    // A model that cannot fit is refused before anything is allocated, naming both figures.
    let err = fails(&fx.train("run", &["--set", "model.d_model=65536"]));
    assert!(
        err.contains("needs about")
            && err.contains("available")
            && err.contains("--ignore-memory-check"),
        "{err}"
    );
    assert!(!fx.run_dir("run").exists());
    ok(&fx.train("run", &[]));
    let config = read(&fx.run_dir("run").join("config.toml"));
    let metrics = read(&fx.run_dir("run").join("metrics.jsonl"));

    let refusals: [(&[&str], &str); 3] = [
        (
            &[
                "--resume",
                "auto",
                "--set",
                "train.steps=4",
                "--set",
                "data.mixture.math=0.6",
            ],
            "--allow-mixture-change",
        ),
        (
            &[
                "--resume",
                "auto",
                "--set",
                "train.steps=4",
                "--set",
                "model.moe.expert_ff=48",
            ],
            "shape",
        ),
        (
            &[
                "--resume",
                "auto",
                "--set",
                "train.steps=4",
                "--set",
                "model.vocab_size=64",
            ],
            "model.vocab_size",
        ),
    ];
    for (args, needle) in refusals {
        let err = fails(&fx.train("run", args));
        assert!(err.contains(needle), "{needle}: {err}");
        assert_eq!(read(&fx.run_dir("run").join("config.toml")), config);
        assert_eq!(read(&fx.run_dir("run").join("metrics.jsonl")), metrics);
        assert!(!fx.run_dir("run").join("config.previous-1.toml").exists());
    }
    // A resume from a path that does not exist says so.
    let missing = fx.run_dir("run").join("checkpoints/step-00000099");
    let err = fails(&fx.train("run", &["--resume", arg(&missing)]));
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn the_nonfinite_stop_names_only_a_checkpoint_that_gives_a_finite_loss() {
    let fx = Fixture::new(
        "runs-nan",
        &[
            "train.steps=2",
            "checkpoint.interval=1",
            "train.max_nonfinite_steps=2",
        ],
    );
    ok(&fx.train("run", &[]));
    // A learning rate that ruins the weights: the loss of a step is finite, the update after
    // it is not, and the checkpoint written then gives non-finite losses.
    let err = fails(&fx.train(
        "run",
        &[
            "--resume",
            "auto",
            "--set",
            "train.steps=10",
            "--set",
            "train.lr=1e8",
            "--set",
            "train.warmup_steps=0",
        ],
    ));
    assert!(err.contains("non-finite"), "{err}");
    let named = err
        .split("finite loss: ")
        .nth(1)
        .map(|rest| PathBuf::from(rest.trim()))
        .unwrap_or_else(|| panic!("no checkpoint named: {err}"));
    assert!(eval_losses(&named).iter().all(|l| l.is_finite()), "{err}");
    // The newest checkpoint was written after a finite step whose update ruined the weights.
    let newest = std::fs::read_dir(fx.run_dir("run").join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    assert!(named != newest, "{err}");
    assert!(eval_losses(&newest).iter().any(|l| !l.is_finite()));
}

#[test]
fn a_closed_stdout_never_kills_a_command() {
    let fx = Fixture::new("runs-pipe", &["train.steps=30", "checkpoint.interval=10"]);
    // `moelab train ... | head -3`: the run goes on after its reader is gone.
    let mut child = fx
        .command("run", &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..3 {
            lines.next().unwrap().unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", util::stderr(&out));
    assert!(!util::stderr(&out).contains("panicked"));
    assert!(fx.checkpoint("run", 30).join("state.json").exists());

    // Commands whose reader is gone before they print anything.
    let run = fx.run_dir("run");
    let prepared = fx.dir.join("prepared");
    let commands: [&[&str]; 4] = [
        &["model-info", arg(&fx.config)],
        &["data", "inspect", arg(&prepared)],
        &["eval", arg(&run), "--json"],
        &["eval", arg(&run)],
    ];
    for args in commands {
        let mut child = util::command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && !util::stderr(&out).contains("panicked"),
            "{args:?}: {:?} {}",
            out.status,
            util::stderr(&out)
        );
    }
}

#[test]
fn checkpoints_are_read_written_and_found_as_a_user_expects() {
    let fx = Fixture::new("runs-ckpt", &["train.steps=4", "checkpoint.interval=2"]);
    ok(&fx.train("run", &[]));
    // Every file of a checkpoint has the permissions of the rest of the run folder.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let expected = mode(&fx.run_dir("run").join("config.toml"));
    for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert_eq!(
            mode(&fx.checkpoint("run", 4).join(file)),
            expected,
            "{file}"
        );
    }
    let export = fx.dir.join("export");
    ok(&moelab(&[
        "export-hf",
        arg(&fx.checkpoint("run", 4)),
        "--out",
        arg(&export),
    ]));
    assert_eq!(mode(&export.join("model.safetensors")), expected);
    // `eval` takes a run folder (its newest checkpoint), as `trace` does.
    assert_eq!(
        eval_losses(&fx.run_dir("run")),
        eval_losses(&fx.checkpoint("run", 4))
    );
    // A corrupt newest checkpoint: the error names the older one that loads.
    std::fs::write(
        fx.checkpoint("run", 4).join("model.safetensors"),
        b"garbage",
    )
    .unwrap();
    let err = fails(&fx.train("run", &["--resume", "auto", "--set", "train.steps=6"]));
    let older = fx.checkpoint("run", 2);
    assert!(
        err.contains("step-00000004") && err.contains(&format!("--resume {}", arg(&older))),
        "{err}"
    );
    ok(&fx.train("run", &["--resume", arg(&older), "--set", "train.steps=6"]));
    assert!(stdout(&moelab(&["eval", arg(&fx.run_dir("run"))])).contains("step 6"));
}

#[test]
fn eval_and_trace_from_another_folder_say_that_data_paths_are_relative() {
    let fx = Fixture::new("runs-relative", &["train.steps=2", "checkpoint.interval=2"]);
    // The run config with data paths relative to the scratch folder, trained from there.
    let text = std::fs::read_to_string(&fx.config)
        .unwrap()
        .replace(&format!("{}/", arg(fx.dir.path())), "");
    let config = fx.dir.join("relative.toml");
    std::fs::write(&config, text).unwrap();
    let run = fx.dir.join("rel-run");
    let train = |dir: &Path| {
        util::command(&["train", arg(&config), "--run-dir", arg(&run)])
            .current_dir(dir)
            .output()
            .unwrap()
    };
    ok(&train(fx.dir.path()));
    for command in ["eval", "trace"] {
        let mut args = vec![command, arg(&run)];
        let trace_out = fx.dir.join("trace");
        if command == "trace" {
            args.extend(["--out", arg(&trace_out)]);
        }
        let err = fails(&moelab(&args));
        assert!(
            err.contains("relative to the folder the run was started from")
                && err.contains("data.dataset"),
            "{command}: {err}"
        );
        ok(&util::command(&args)
            .current_dir(fx.dir.path())
            .output()
            .unwrap());
    }
}

#[test]
fn a_run_reports_what_a_user_expects_and_metrics_load_as_one_table() {
    let fx = Fixture::new(
        "runs-report",
        &["train.steps=4", "log.interval=2", "train.eval_interval=2"],
    );
    let out = ok(&fx.train("run", &[]));
    // Preparing on first use is said; a line per log.interval with the numbers that matter.
    assert!(out.contains("preparing the dataset"), "{out}");
    for step in ["step 2/4", "step 4/4"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(step))
            .unwrap_or_else(|| panic!("no `{step}` line: {out}"));
        for field in ["loss", "lr", "grad", "tok/s", "aux", "imbalance"] {
            assert!(line.contains(field), "{field}: {line}");
        }
    }
    // The closing summary: steps, wall time, throughput, validation loss, what to run next.
    assert!(out.contains("finished 4 steps"), "{out}");
    assert!(out.contains("validation loss (nats/token): "), "{out}");
    assert!(out.contains("next: moelab trace"), "{out}");

    // metrics.jsonl: every line has step, time and elapsed_s; evaluations are lines too.
    let metrics = std::fs::read_to_string(fx.run_dir("run").join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for line in &lines {
        assert!(
            line["step"].is_u64() && line["elapsed_s"].is_f64(),
            "{line}"
        );
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }
    let evals: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("eval").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![2, 4]);
    assert!(lines.iter().any(|l| l["eval"]["prose"].is_f64()));
}

#[test]
fn a_domain_too_small_for_validation_is_a_warning_at_startup_not_an_error() {
    let dir = util::Scratch::new("runs-small-domain");
    let corpus = crate::corpus::Corpus::three_domains().write(&dir.join("corpus"));
    // The user's small domain: 17 documents of three words, too few tokens for one validation
    // sequence of seq_len + 1 = 33 even when prepare holds out all it can spare.
    let notes: String = (0..17)
        .map(|i| format!("{{\"text\": \"note {i} ends\"}}\n"))
        .collect();
    std::fs::create_dir_all(corpus.join("notes")).unwrap();
    std::fs::write(corpus.join("notes/all.jsonl"), notes).unwrap();
    let config = crate::corpus::RunConfig::small(dir.path())
        .set_all(&["train.steps=2", "train.eval_interval=0"])
        .write(&dir.join("run.toml"));

    let out = moelab(&["train", arg(&config)]);
    let shown = ok(&out);
    let err = util::stderr(&out);
    // Never the error about a key the user did not set.
    assert!(!err.contains("Error") && !err.contains("error:"), "{err}");
    let warning = err
        .lines()
        .find(|l| l.starts_with("warning: domain `notes`"))
        .unwrap_or_else(|| panic!("no warning naming notes: {err}"));
    assert!(
        warning.contains("validation tokens in") && warning.contains("not measured"),
        "{warning}"
    );
    // The tokens behind each loss are shown at startup, before the first step.
    let line = shown
        .lines()
        .position(|l| l.starts_with("validation tokens per domain"))
        .unwrap_or_else(|| panic!("no validation line: {shown}"));
    let first_step = shown.lines().position(|l| l.starts_with("step ")).unwrap();
    assert!(line < first_step, "{shown}");
    let listed = shown.lines().nth(line).unwrap();
    assert!(
        listed.contains("notes 0") && listed.contains("prose 256"),
        "{listed}"
    );
    // The other domains are capped by this config's data.validation_tokens = 256.
    assert!(
        err.contains("data.validation_tokens = 256 caps it"),
        "{err}"
    );

    // The final evaluation leaves notes unmeasured and scores the others, in nats and bits
    // per byte.
    let run = dir.join("runs/e2e");
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("eval/step-00000002.json")).unwrap())
            .unwrap();
    for d in eval["domains"].as_array().unwrap() {
        let (loss, bpb) = (&d["loss"], &d["bpb"]);
        if d["domain"] == "notes" {
            assert!(loss.is_null() && bpb.is_null() && d["tokens"] == 0, "{d}");
        } else {
            let (loss, bpb) = (loss.as_f64().unwrap(), bpb.as_f64().unwrap());
            let bytes = d["bytes"].as_f64().unwrap();
            assert_eq!(d["tokens"], 256, "{d}");
            // bpb = summed nats / ln 2 / bytes.
            let want = loss * 256.0 / std::f64::consts::LN_2 / bytes;
            assert!((bpb - want).abs() < 1e-9 && bytes >= 256.0, "{d}");
        }
    }
    // `moelab eval` shows the same tokens and warning on stderr, keeping stdout JSON.
    let out = moelab(&["eval", arg(&run), "--json"]);
    let json: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(json["domains"].as_array().unwrap().len(), 4);
    let err = util::stderr(&out);
    assert!(
        err.contains("validation tokens per domain") && err.contains("warning: domain `notes`"),
        "{err}"
    );
    // Tracing and dumping logits leave notes out, saying so, instead of failing.
    let out = moelab(&["trace", arg(&run), "--out", arg(&dir.join("trace"))]);
    let shown = ok(&out);
    let err = util::stderr(&out);
    assert!(err.contains("warning: domain `notes` not traced"), "{err}");
    assert!(
        shown.contains("prose") && !shown.contains("notes"),
        "{shown}"
    );
    let logits = dir.join("logits.safetensors");
    let out = moelab(&[
        "eval",
        arg(&run),
        "--dump-logits",
        arg(&logits),
        "--tokens",
        "8",
    ]);
    let shown = ok(&out);
    assert!(
        shown.contains("wrote logits of 3 sequences x 8 tokens") && !shown.contains("notes"),
        "{shown}"
    );
}
