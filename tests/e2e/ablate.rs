//! `moelab ablate`, `moelab trace` and `moelab analyze`: a three-variant ablation on a scratch
//! corpus with its comparison, skipping finished variants on a re-run, deterministic traces, and
//! a report over a run and a trace.

use std::path::PathBuf;

use moelab_trace::Trace;

use crate::corpus::{Corpus, RunConfig};
use crate::util::{arg, fails, moelab, ok, Scratch};

/// A scratch folder with a three-domain corpus (math with two sources), a run config and an
/// ablation file.
struct Fixture {
    dir: Scratch,
    ablation: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = Scratch::new(&format!("ablate-{name}"));
        Corpus::with_math_sources().write(&dir.join("corpus"));
        RunConfig::small(dir.path())
            .set_all(&[
                "run.name=\"base\"",
                "run.seed=11",
                "data.mixture.prose=0.4",
                "data.mixture.math=0.3",
                "train.steps=100",
                "train.warmup_steps=2",
                "log.router_interval=3",
            ])
            .write(&dir.join("run.toml"));
        std::fs::create_dir_all(dir.join("ablations")).unwrap();
        let ablation = dir.join("ablations").join("study.toml");
        std::fs::write(
            &ablation,
            r#"
base = "../run.toml"
out_dir = "unused-because-of---out"
set = ["train.steps=6"]

[[variant]]
name = "baseline"

[[variant]]
name = "no_code"
set = ["data.mixture.code=0.0"]

[[variant]]
name = "structured_math"
set = ["data.source_mixture.math.structured=0.9", "data.source_mixture.math.plain=0.1"]
"#,
        )
        .unwrap();
        Self { dir, ablation }
    }

    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }
}

#[test]
fn ablation_compares_variants_skips_finished_ones_and_traces_deterministically() {
    let fx = Fixture::new("e2e");
    let out = fx.out();
    let stdout = ok(&moelab(&["ablate", arg(&fx.ablation), "--out", arg(&out)]));
    for (i, name) in ["baseline", "no_code", "structured_math"]
        .iter()
        .enumerate()
    {
        assert!(
            stdout.contains(&format!("[{}/3] {name}: training", i + 1)),
            "{stdout}"
        );
        let config = std::fs::read_to_string(out.join(name).join("config.toml")).unwrap();
        assert!(config.contains(&format!("name = \"{name}\"")), "{config}");
        assert!(out
            .join(name)
            .join("checkpoints")
            .join("step-00000006")
            .join("state.json")
            .is_file());
    }
    let no_code = std::fs::read_to_string(out.join("no_code").join("config.toml")).unwrap();
    assert!(no_code.contains("code = 0.0"), "{no_code}");
    // The compact table: one line per domain.
    for domain in ["prose", "code", "math"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(domain)),
            "{domain}: {stdout}"
        );
    }

    let comparison = out.join("comparison");
    for file in ["comparison.md", "comparison.csv", "comparison.json"] {
        assert!(comparison.join(file).is_file(), "{file} missing");
    }
    let pngs = std::fs::read_dir(&comparison)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count();
    assert!(pngs >= 1, "no PNG in {}", comparison.display());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(comparison.join("comparison.json")).unwrap())
            .unwrap();
    assert_eq!(json["baseline"], "baseline");
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 9, "3 variants x 3 domains: {rows:?}");
    for row in rows {
        assert!(row["val_loss"].as_f64().unwrap().is_finite(), "{row}");
        if row["variant"] == "baseline" {
            assert_eq!(row["delta_loss"].as_f64(), Some(0.0), "{row}");
            assert_eq!(row["mean_jsd"].as_f64(), Some(0.0), "{row}");
        }
    }
    let variants = json["jsd"]["variants"].as_array().unwrap();
    let no_code_jsd = variants.iter().find(|v| v["name"] == "no_code").unwrap();
    let max_jsd = no_code_jsd["jsd"]["per_layer"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|layer| layer.as_array().unwrap().iter())
        .filter_map(|v| v.as_f64())
        .fold(0.0, f64::max);
    assert!(max_jsd > 0.0, "no routing shift for no_code: {no_code_jsd}");

    // Re-running skips every finished variant and leaves its files alone.
    let metrics = out.join("baseline").join("metrics.jsonl");
    let before = std::fs::metadata(&metrics).unwrap().modified().unwrap();
    let again = ok(&moelab(&["ablate", arg(&fx.ablation), "--out", arg(&out)]));
    assert_eq!(again.matches(": skip").count(), 3, "{again}");
    assert!(!again.contains("training in"), "{again}");
    assert_eq!(
        std::fs::metadata(&metrics).unwrap().modified().unwrap(),
        before
    );

    // Tracing the same checkpoint twice gives the same trace (compared parsed: the safetensors
    // header's metadata order is not fixed).
    let checkpoint = out
        .join("baseline")
        .join("checkpoints")
        .join("step-00000006");
    let (t1, t2) = (fx.dir.join("trace1"), fx.dir.join("trace2"));
    for t in [&t1, &t2] {
        ok(&moelab(&["trace", arg(&checkpoint), "--out", arg(t)]));
    }
    let trace = Trace::read(&t1).unwrap();
    assert!(
        trace == Trace::read(&t2).unwrap(),
        "two traces of one checkpoint differ"
    );
    assert_eq!(trace.step, 6);
    assert_eq!(
        trace.n_tokens(),
        3 * 256,
        "every domain, validation_tokens each"
    );
    assert!(trace.router_probs.is_none());

    // A subset of domains, fewer tokens, router probabilities; a run folder means its newest
    // checkpoint.
    let t3 = fx.dir.join("trace3");
    ok(&moelab(&[
        "trace",
        arg(&out.join("no_code")),
        "--domains",
        "code,math",
        "--tokens",
        "64",
        "--probs",
        "--out",
        arg(&t3),
    ]));
    let subset = Trace::read(&t3).unwrap();
    assert_eq!(subset.n_tokens(), 2 * 64);
    let code = subset.domains.iter().position(|d| d == "code").unwrap() as u32;
    let math = subset.domains.iter().position(|d| d == "math").unwrap() as u32;
    assert!(subset.domain_ids.iter().all(|&d| d == code || d == math));
    assert_eq!(
        subset.router_probs.as_ref().map(Vec::len),
        Some(subset.n_layers() * subset.n_tokens() * subset.n_experts)
    );
    let math_sources: std::collections::BTreeSet<u32> = subset
        .domain_ids
        .iter()
        .zip(&subset.source_ids)
        .filter(|(&d, _)| d == math)
        .map(|(_, &s)| s)
        .collect();
    assert!(!math_sources.is_empty());

    let bad = moelab(&[
        "trace",
        arg(&checkpoint),
        "--domains",
        "prose,nope",
        "--out",
        arg(&fx.dir.join("trace-bad")),
    ]);
    let err = fails(&bad);
    assert!(
        err.contains("unknown domain `nope`") && err.contains("prose") && err.contains("math"),
        "{err}"
    );

    // A report over a run folder and a trace.
    let report = fx.dir.join("report");
    let stdout = ok(&moelab(&[
        "analyze",
        arg(&out.join("baseline")),
        arg(&t1),
        "--out",
        arg(&report),
        "--json",
    ]));
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["runs"].as_array().unwrap().len(), 2, "{summary}");
    assert!(report.join("report.md").is_file());
}

#[test]
fn ablation_with_two_seeds_writes_intervals_and_the_noise_floor() {
    let fx = Fixture::new("seeds");
    // A hand-made task of each shape, scored at the final evaluation of every run.
    let task = fx.dir.join("task.jsonl");
    std::fs::write(
        &task,
        "{\"prompt\": \"two plus two is\", \"answer\": \" four\"}\n\
         {\"prompt\": \"the sky is\", \"choices\": [\" blue\", \" green\"], \"label\": 0}\n",
    )
    .unwrap();
    std::fs::write(
        &fx.ablation,
        format!(
            r#"
base = "../run.toml"
set = ["train.steps=3", "eval.tasks=[{{name = 'tiny', path = '{}'}}]"]
seeds = [5, 6]

[[variant]]
name = "baseline"

[[variant]]
name = "no_code"
set = ["data.mixture.code=0.0"]
"#,
            task.display()
        ),
    )
    .unwrap();
    let out = fx.out();
    let stdout = ok(&moelab(&["ablate", arg(&fx.ablation), "--out", arg(&out)]));
    assert!(stdout.contains("4 runs x 2 seeds"), "{stdout}");
    // Task scores in eval/, metrics.jsonl and the comparison.
    let eval: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("baseline/seed-5/eval/step-00000003.json")).unwrap(),
    )
    .unwrap();
    let bpb = eval["tasks"]["tiny"]["bpb"].as_f64().unwrap();
    assert!(bpb.is_finite() && bpb > 0.0, "{eval}");
    let accuracy = eval["tasks"]["tiny"]["accuracy"].as_f64().unwrap();
    assert!(
        accuracy == 0.0 || accuracy == 1.0,
        "one multiple-choice example: {eval}"
    );
    assert!(eval["tasks"]["tiny"]["exact_match"].is_number(), "{eval}");
    let metrics = std::fs::read_to_string(out.join("baseline/seed-5/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"tiny/bpb\""), "{metrics}");
    for (i, run) in [
        "baseline/seed-5",
        "no_code/seed-5",
        "baseline/seed-6",
        "no_code/seed-6",
    ]
    .iter()
    .enumerate()
    {
        assert!(
            stdout.contains(&format!("[{}/4] {run}: training", i + 1)),
            "{stdout}"
        );
        let config = std::fs::read_to_string(out.join(run).join("config.toml")).unwrap();
        let seed = &run[run.len() - 1..];
        assert!(config.contains(&format!("seed = {seed}")), "{config}");
    }
    assert!(stdout.contains("jsd noise"), "{stdout}");
    let comparison = out.join("comparison");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(comparison.join("comparison.json")).unwrap())
            .unwrap();
    assert_eq!(json["seeds"], serde_json::json!([5, 6]));
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "2 variants x 3 domains: {rows:?}");
    for row in rows.iter().filter(|r| r["variant"] == "no_code") {
        assert_eq!(row["seeds"], 2, "{row}");
        let (lo, hi) = (
            row["delta_interval"]["lo"].as_f64().unwrap(),
            row["delta_interval"]["hi"].as_f64().unwrap(),
        );
        let delta = row["delta_loss"].as_f64().unwrap();
        assert!(lo <= delta && delta <= hi, "{row}");
        assert_eq!(
            row["delta_within_noise"].as_bool(),
            Some(lo <= 0.0 && 0.0 <= hi)
        );
        // Baseline seed 5 against baseline seed 6, raw and with experts matched.
        let noise = row["noise_jsd"].as_f64().unwrap();
        let aligned_noise = row["noise_aligned_jsd"].as_f64().unwrap();
        assert!(noise > 0.0, "two seeds route differently: {row}");
        // Matching maximises the validation tokens two experts share, which is not the same as
        // minimising the JSD, so the aligned value may lie above the raw one (align.rs tests that
        // a permuted copy aligns to 0); it is a JSD in bits all the same.
        assert!(
            (0.0..=1.0).contains(&aligned_noise),
            "an aligned JSD in bits: {row}"
        );
        let aligned = row["aligned_jsd"].as_f64().unwrap();
        assert_eq!(
            row["jsd_within_noise"].as_bool(),
            Some(aligned <= aligned_noise)
        );
    }
    let scores = json["scores"].as_array().unwrap();
    assert!(
        scores.iter().any(|s| s["variant"] == "no_code"
            && s["metric"] == "tiny/bpb"
            && s["delta_interval"].is_object()),
        "{scores:?}"
    );
    let md = std::fs::read_to_string(comparison.join("comparison.md")).unwrap();
    for needle in [
        "95% interval",
        "noise floor (raw)",
        "noise floor (aligned)",
        "Seeds: 5, 6",
    ] {
        assert!(md.contains(needle), "{needle}: {md}");
    }
    let csv = std::fs::read_to_string(comparison.join("comparison.csv")).unwrap();
    assert!(
        csv.starts_with("variant,domain,seeds,val_loss,val_loss_std"),
        "{csv}"
    );
    // Curves with the variants overlaid (mean over seeds), and `moelab plot` over run folders.
    for stem in [
        "loss_train",
        "loss_math",
        "aux_loss",
        "load_imbalance",
        "task_tiny_bpb",
    ] {
        assert!(
            comparison
                .join("curves")
                .join(format!("{stem}.png"))
                .is_file(),
            "{stem}"
        );
    }
    let curves = fx.dir.join("curves");
    let plot: serde_json::Value = serde_json::from_str(&ok(&moelab(&[
        "plot",
        arg(&out.join("baseline/seed-5")),
        arg(&out.join("no_code/seed-5")),
        "--out",
        arg(&curves),
        "--json",
    ])))
    .unwrap();
    assert!(plot["plots"].as_array().unwrap().len() >= 5, "{plot}");
    let svg = std::fs::read_to_string(curves.join("loss_train.svg")).unwrap();
    assert!(
        svg.contains("baseline/seed-5") && svg.contains("no_code/seed-5"),
        "run labels"
    );
    let err = fails(&moelab(&[
        "plot",
        arg(&fx.dir.join("nowhere")),
        "--out",
        arg(&curves),
    ]));
    assert!(err.contains("metrics.jsonl"), "{err}");
}

#[test]
fn bad_ablation_files_are_refused_naming_the_key() {
    let fx = Fixture::new("bad");
    let cases = [
        (
            "base = \"../run.toml\"\nstep = 3\n[[variant]]\nname = \"a\"\n",
            "step",
        ),
        (
            "base = \"../run.toml\"\n[[variant]]\nname = \"a\"\n[[variant]]\nname = \"a\"\n",
            "unique",
        ),
        (
            "base = \"../run.toml\"\n[[variant]]\nname = \"../escape\"\n",
            "variant[0].name",
        ),
        (
            "base = \"../run.toml\"\n[[variant]]\nname = \"a\"\nset = [\"data.mixture.prose=-1\"]\n",
            "data.mixture.prose",
        ),
    ];
    for (text, needle) in cases {
        std::fs::write(&fx.ablation, text).unwrap();
        let out = moelab(&["ablate", arg(&fx.ablation), "--out", arg(&fx.out())]);
        let err = fails(&out);
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(!fx.out().exists(), "nothing is written for a bad file");
    }
    for command in ["trace", "analyze", "ablate"] {
        let help = ok(&moelab(&[command, "--help"]));
        assert!(
            help.contains(&format!("Example: moelab {command}")),
            "{help}"
        );
    }
}

#[test]
fn ctrl_c_stops_ablate_in_its_evaluation_phase_and_a_rerun_resumes() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let fx = Fixture::new("sigint");
    let out = fx.out();
    // --json: stdout is one JSON document, the progress went to stderr.
    let json = ok(&moelab(&[
        "ablate",
        arg(&fx.ablation),
        "--out",
        arg(&out),
        "--json",
    ]));
    let parsed: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("stdout of --json is not one JSON document ({e}): {json}"));
    assert!(parsed["rows"].as_array().is_some_and(|r| !r.is_empty()));

    // Every variant is trained: a re-run goes straight to the final evaluations and the
    // comparison. Ctrl-C there stops it (it was ignored before). The evaluation is short, so
    // the child is paused while the signal is sent, and a run that outran the signal is retried.
    let signal = |name: &str, pid: u32| {
        let status = std::process::Command::new("kill")
            .args([name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name} {pid}");
    };
    let mut stopped = false;
    for _attempt in 0..5 {
        for variant in ["baseline", "no_code", "structured_math"] {
            let _ = std::fs::remove_dir_all(out.join(variant).join("eval"));
        }
        let _ = std::fs::remove_dir_all(out.join("comparison"));
        let mut child = crate::util::command(&["ablate", arg(&fx.ablation), "--out", arg(&out)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut text = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            text += &line;
            text.push('\n');
            if line.starts_with("[3/3]") {
                signal("-STOP", child.id());
                signal("-INT", child.id());
                signal("-CONT", child.id());
                break;
            }
        }
        for line in lines {
            text += &line.unwrap();
            text.push('\n');
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "exit {status:?}: {text}");
        if text.contains("stopped by signal") {
            assert!(!out.join("comparison").exists(), "{text}");
            stopped = true;
            break;
        }
    }
    assert!(
        stopped,
        "Ctrl-C during the evaluations never stopped ablate"
    );
    let again = ok(&moelab(&["ablate", arg(&fx.ablation), "--out", arg(&out)]));
    assert!(
        out.join("comparison").join("comparison.md").is_file(),
        "{again}"
    );
}

/// A variant's logged losses without the timing fields.
fn losses(run_dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for timing in ["tokens_per_s", "mfu", "time", "elapsed_s"] {
                v.as_object_mut().unwrap().remove(timing);
            }
            v
        })
        .collect()
}

#[test]
fn ablate_parallel_trains_variants_at_once_as_the_sequential_run_does() {
    let fx = Fixture::new("parallel");
    let (sequential, parallel) = (fx.dir.join("sequential"), fx.dir.join("parallel"));
    ok(&moelab(&[
        "ablate",
        arg(&fx.ablation),
        "--out",
        arg(&sequential),
    ]));
    let stdout = ok(&moelab(&[
        "ablate",
        arg(&fx.ablation),
        "--out",
        arg(&parallel),
        "--parallel",
        "2",
    ]));
    for name in ["baseline", "no_code", "structured_math"] {
        assert!(stdout.contains(&format!("{name}: done")), "{stdout}");
        assert!(parallel
            .join(".variants")
            .join(format!("{name}.log"))
            .is_file());
        // Separate processes, the same config and seed: the same numbers.
        assert_eq!(
            losses(&sequential.join(name)),
            losses(&parallel.join(name)),
            "{name}"
        );
    }
    let read = |dir: &std::path::Path| {
        std::fs::read_to_string(dir.join("comparison").join("comparison.csv")).unwrap()
    };
    assert_eq!(read(&sequential), read(&parallel));
    // A second run finds everything finished and only compares.
    let again = ok(&moelab(&[
        "ablate",
        arg(&fx.ablation),
        "--out",
        arg(&parallel),
        "--parallel",
        "2",
    ]));
    assert_eq!(again.matches(": skip").count(), 3, "{again}");
}

#[test]
fn ablate_slurm_dry_run_writes_a_job_array_whose_tasks_train_one_variant_each() {
    let fx = Fixture::new("slurm");
    let out = fx.out();
    let stdout = ok(&moelab(&[
        "ablate",
        arg(&fx.ablation),
        "--out",
        arg(&out),
        "--slurm",
        "--dry-run",
        "--ranks",
        "2",
    ]));
    let script = out.join(".variants").join("ablate.sbatch");
    assert!(stdout.contains("ablate.sbatch"), "{stdout}");
    let status = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(status.success(), "bash -n {}", script.display());
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(text.contains("#SBATCH --array=0-2\n"), "{text}");
    assert!(text.contains("#SBATCH --ntasks=2\n"), "{text}");
    assert!(
        text.contains("variants=( baseline no_code structured_math )"),
        "{text}"
    );
    let srun = text
        .lines()
        .find(|l| l.starts_with("srun "))
        .unwrap_or_else(|| panic!("no srun line: {text}"));
    assert!(
        srun.contains(" train ")
            && srun.contains("\"$name\".toml")
            && srun.contains("--resume auto"),
        "{srun}"
    );
    assert!(!out.join("no_code").exists(), "a dry run trains nothing");
    // The dataset was prepared once, before the array: its tasks only open it.
    assert!(stdout.contains(": ready ("), "{stdout}");
    assert!(
        fx.dir.join("prepared").join("manifest.json").is_file(),
        "no prepared dataset after --slurm --dry-run"
    );
    assert!(text.contains("prepared once"), "{text}");

    // Array task 1 under a stand-in srun (which runs its command once) trains `no_code`.
    let bin = fx.dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("srun");
    std::fs::write(
        &fake,
        "#!/bin/sh\nwhile [ \"${1#-}\" != \"$1\" ]; do shift; done\nexec \"$@\"\n",
    )
    .unwrap();
    let chmod = std::process::Command::new("chmod")
        .arg("+x")
        .arg(&fake)
        .status()
        .unwrap();
    assert!(chmod.success());
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let task = std::process::Command::new("bash")
        .arg(&script)
        .env("PATH", path)
        .env("SLURM_ARRAY_TASK_ID", "1")
        .current_dir(crate::util::repo_root())
        .output()
        .unwrap();
    ok(&task);
    assert!(out
        .join("no_code/checkpoints/step-00000006/state.json")
        .is_file());
    assert!(!out.join("baseline").exists());
    // --compare names the variants still missing.
    let err = fails(&moelab(&[
        "ablate",
        arg(&fx.ablation),
        "--out",
        arg(&out),
        "--compare",
    ]));
    assert!(
        err.contains("baseline, structured_math not finished"),
        "{err}"
    );
}
