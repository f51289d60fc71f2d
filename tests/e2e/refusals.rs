//! Refuse before work and say the right thing (issue 27): an ablation checks every variant
//! before the first trains, a finished run is left alone, a resumed run's NaN guard still knows
//! its good checkpoint, `--set` errors name the override, export-hf without a tokenizer fails,
//! and a variant interrupted in its final evaluation is evaluated again.

use std::path::{Path, PathBuf};

use crate::corpus::{Corpus, RunConfig};
use crate::fixture::{read, Fixture};
use crate::util::{arg, fails, moelab, ok, stdout, Scratch};

/// The complete checkpoints of a run folder, by step.
fn steps_of(run_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("state.json").is_file())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

/// A scratch folder with the three-domain corpus, a 4-step base config and an ablation file of
/// `variants` (TOML `[[variant]]` tables after the baseline).
fn ablation(name: &str, variants: &str) -> (Scratch, PathBuf) {
    let dir = Scratch::new(&format!("refuse-{name}"));
    Corpus::three_domains().write(&dir.join("corpus"));
    RunConfig::small(dir.path())
        .set_all(&["train.steps=4", "train.warmup_steps=1"])
        .write(&dir.join("run.toml"));
    let file = dir.join("study.toml");
    std::fs::write(
        &file,
        format!("base = \"run.toml\"\n\n[[variant]]\nname = \"baseline\"\n{variants}"),
    )
    .unwrap();
    (dir, file)
}

#[test]
fn ablate_checks_every_variant_before_the_first_trains() {
    for (name, variant, needles) in [
        (
            "domain",
            "[[variant]]\nname = \"typo\"\nset = [\"data.mixture.cod=0.5\"]\n",
            &["`typo`", "data.mixture.cod", "unknown domain"][..],
        ),
        (
            "vocab",
            "[[variant]]\nname = \"small_vocab\"\nset = [\"model.vocab_size=300\"]\n",
            &["`small_vocab`", "model.vocab_size", "300"][..],
        ),
    ] {
        let (dir, file) = ablation(name, variant);
        let out = dir.join("out");
        let err = fails(&moelab(&["ablate", arg(&file), "--out", arg(&out)]));
        for needle in needles {
            assert!(err.contains(needle), "{name}: {needle}: {err}");
        }
        // Refused before the baseline's first step: it has no checkpoint and no metrics.
        assert!(
            steps_of(&out.join("baseline")).is_empty(),
            "{name}: the baseline trained before the refusal"
        );
        assert!(
            !out.join("baseline").join("metrics.jsonl").exists(),
            "{name}"
        );
    }
}

/// The final evaluation lines (`"eval": true` or a `val_loss` key) of a run's metrics.jsonl.
fn eval_lines(run_dir: &Path) -> Vec<String> {
    String::from_utf8_lossy(&read(&run_dir.join("metrics.jsonl")))
        .lines()
        .filter(|l| l.contains("val_loss") || l.contains("\"eval\""))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_variant_interrupted_in_its_final_evaluation_is_evaluated_again() {
    let (dir, file) = ablation("final-eval", "");
    let out = dir.join("out");
    ok(&moelab(&["ablate", arg(&file), "--out", arg(&out)]));
    let run = out.join("baseline");
    let evals = eval_lines(&run);
    assert_eq!(evals.len(), 1, "{evals:?}");
    // What a kill during the final evaluation leaves: the final checkpoint, no evaluation.
    std::fs::remove_file(run.join("eval").join("step-00000004.json")).unwrap();
    std::fs::remove_dir_all(run.join("eval").join("step-00000004")).unwrap();
    let metrics = String::from_utf8_lossy(&read(&run.join("metrics.jsonl"))).into_owned();
    let kept: String = metrics
        .lines()
        .filter(|l| !evals.contains(&l.to_string()))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(run.join("metrics.jsonl"), kept).unwrap();

    let again = ok(&moelab(&["ablate", arg(&file), "--out", arg(&out)]));
    assert!(!again.contains("skip"), "{again}");
    assert!(run.join("eval").join("step-00000004.json").is_file());
    assert_eq!(
        eval_lines(&run).len(),
        1,
        "the final evaluation line is back"
    );
    // Now it is finished: a third run skips it and changes nothing.
    let before = read(&run.join("metrics.jsonl"));
    let third = ok(&moelab(&["ablate", arg(&file), "--out", arg(&out)]));
    assert!(third.contains("skip"), "{third}");
    assert_eq!(read(&run.join("metrics.jsonl")), before);
}

#[test]
fn resume_auto_on_a_finished_run_says_so_and_changes_nothing() {
    let fx = Fixture::new(
        "refuse-finished",
        &["train.steps=4", "checkpoint.interval=2"],
    );
    ok(&fx.train("run", &[]));
    let run = fx.run_dir("run");
    let metrics = read(&run.join("metrics.jsonl"));
    let eval = read(&run.join("eval").join("step-00000004.json"));
    for _ in 0..2 {
        let out = fx.train("run", &["--resume", "auto"]);
        let said = ok(&out) + &String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("already finished"), "{said}");
        assert!(!said.contains("steps 5..4"), "{said}");
        assert_eq!(
            read(&run.join("metrics.jsonl")),
            metrics,
            "metrics.jsonl changed"
        );
        assert_eq!(read(&run.join("eval").join("step-00000004.json")), eval);
        assert_eq!(steps_of(&run), vec![2, 4]);
    }
    // More steps: the run continues.
    let out = stdout(&fx.train("run", &["--resume", "auto", "--set", "train.steps=6"]));
    assert!(!out.contains("already finished"), "{out}");
    assert_eq!(steps_of(&run), vec![2, 4, 6]);
}

#[test]
fn the_nan_guard_of_a_resumed_run_names_the_good_checkpoint_of_the_earlier_part() {
    let fx = Fixture::new(
        "refuse-nan",
        &[
            "train.steps=10",
            "checkpoint.interval=5",
            "train.max_nonfinite_steps=3",
        ],
    );
    ok(&fx.train("run", &[]));
    // Steps 11-13 are not finite: step-10 (resumed from) was never followed by a finite step,
    // but the first part proved step-5, which is still on disk.
    let err = fails(&fx.train(
        "run",
        &[
            "--resume",
            "auto",
            "--set",
            "train.steps=20",
            "--set",
            "train.debug_nan_steps=[11,12,13]",
        ],
    ));
    assert!(
        err.contains("3 consecutive steps") && err.contains("step-00000005"),
        "{err}"
    );
    assert!(!err.contains("none: no checkpoint"), "{err}");
}

#[test]
fn errors_from_set_values_name_the_override() {
    let fx = Fixture::new("refuse-set", &["train.steps=2"]);
    // Found only against the data (the tokenizer has 400 tokens).
    let err = fails(&fx.train("run", &["--set", "model.vocab_size=300"]));
    assert!(
        err.contains("--set model.vocab_size=300") && err.contains("tokenizer"),
        "{err}"
    );
    assert!(!err.contains("config.toml"), "{err}");
    // Found in the config itself.
    let err = fails(&fx.train("run", &["--set", "train.eps=0"]));
    assert!(
        err.contains("--set train.eps=0") && err.contains("`train.eps`"),
        "{err}"
    );
    assert!(!err.contains("run.toml"), "{err}");
}

#[test]
fn export_hf_without_its_tokenizer_fails_unless_asked_to() {
    let fx = Fixture::new("refuse-export", &["train.steps=2", "checkpoint.interval=2"]);
    ok(&fx.train("run", &[]));
    let ckpt = fx.checkpoint("run", 2);
    // The run's dataset moved away: its tokenizer cannot be found.
    let prepared = fx.dir.join("prepared");
    std::fs::rename(&prepared, fx.dir.join("moved")).unwrap();
    let export = fx.dir.join("export");
    let err = fails(&moelab(&["export-hf", arg(&ckpt), "--out", arg(&export)]));
    assert!(
        err.contains("tokenizer") && err.contains("--no-tokenizer"),
        "{err}"
    );
    assert!(
        !export.exists(),
        "a refused export left {}",
        export.display()
    );
    ok(&moelab(&[
        "export-hf",
        arg(&ckpt),
        "--out",
        arg(&export),
        "--no-tokenizer",
    ]));
    assert!(export.join("model.safetensors").is_file());
    assert!(!export.join("tokenizer.json").exists());
}
