//! `moelab mix swarm|fit|propose`: a small swarm on a scratch corpus trained with `moelab ablate
//! --parallel`, fitted, a proposal written and trained against the base, and the report updated
//! with the measured result.

use std::path::{Path, PathBuf};

use crate::corpus::{Corpus, RunConfig};
use crate::util::{arg, fails, moelab, ok, Scratch};

/// A three-domain corpus and a base config of 4 steps (tiny runs: the test checks plumbing, not
/// laws).
fn fixture(name: &str) -> (Scratch, PathBuf) {
    let dir = Scratch::new(&format!("mix-{name}"));
    Corpus::three_domains().write(&dir.join("corpus"));
    let base = RunConfig::small(dir.path())
        .set_all(&[
            "train.steps=4",
            "train.warmup_steps=1",
            "log.router_interval=4",
        ])
        .write(&dir.join("base.toml"));
    (dir, base)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn swarm(base: &Path, out: &Path, runs: &str, seed: &str) -> serde_json::Value {
    json(&ok(&moelab(&[
        "mix",
        "swarm",
        arg(base),
        "--runs",
        runs,
        "--seed",
        seed,
        "--concentration",
        "8",
        "--out",
        arg(out),
        "--json",
    ])))
}

#[test]
fn swarm_fit_propose_and_measure_end_to_end() {
    let (dir, base) = fixture("e2e");
    let file = dir.join("ablations").join("swarm.toml");
    let drawn = swarm(&base, &file, "6", "3");
    let variants = drawn["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 6);
    assert_eq!(variants[0]["name"], "base");
    let max_epochs = drawn["max_epochs"].as_f64().unwrap();
    for v in variants {
        let shares: Vec<f64> = v["mixture"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{v}");
        for e in v["epochs"].as_array().unwrap() {
            assert!(e.as_f64().unwrap() <= max_epochs, "{v}");
        }
    }
    // Deterministic per seed: the same seed writes the same file.
    let first = std::fs::read_to_string(&file).unwrap();
    let again = dir.join("ablations").join("again.toml");
    swarm(&base, &again, "6", "3");
    assert_eq!(first, std::fs::read_to_string(&again).unwrap());
    assert!(first.contains("base = \"../base.toml\""), "{first}");

    // `moelab ablate` takes the file unchanged: a Slurm script, then two processes at a time.
    let out = dir.join("swarm-out");
    ok(&moelab(&[
        "ablate",
        arg(&file),
        "--out",
        arg(&out),
        "--slurm",
        "--dry-run",
    ]));
    assert!(out.join(".variants").join("ablate.sbatch").is_file());
    ok(&moelab(&[
        "ablate",
        arg(&file),
        "--out",
        arg(&out),
        "--parallel",
        "2",
    ]));

    let fit = json(&ok(&moelab(&["mix", "fit", arg(&out), "--json"])));
    assert_eq!(fit["runs"], 6);
    let targets = fit["targets"].as_array().unwrap();
    for domain in ["prose", "code", "math"] {
        let t = targets
            .iter()
            .find(|t| t["target"] == domain)
            .unwrap_or_else(|| panic!("{domain}: {fit}"));
        assert_eq!(t["runs"].as_array().unwrap().len(), 6);
        assert!(t["loo_rmse"].as_f64().unwrap().is_finite(), "{t}");
        assert_eq!(
            t["checks"].as_array().unwrap().len(),
            2,
            "both laws fit 6 runs over 3 domains: {t}"
        );
    }
    let mix = out.join("mix");
    for file in [
        "mix_report.md",
        "fit.json",
        "predicted_vs_measured.png",
        "predicted_vs_measured.svg",
        "interactions.png",
    ] {
        assert!(mix.join(file).is_file(), "{file} missing");
    }
    // An unknown target: the refusal names the measured ones.
    let err = fails(&moelab(&["mix", "fit", arg(&out), "--target", "nope"]));
    assert!(
        err.contains("--target nope") && err.contains("prose"),
        "{err}"
    );

    let proposal_file = dir.join("proposal.toml");
    let proposal = json(&ok(&moelab(&[
        "mix",
        "propose",
        arg(&out),
        "--objective",
        "mean",
        "--max-kl",
        "0.3",
        "--seeds",
        "1,2",
        "--bounds",
        "math=0.05:0.6",
        "--out",
        arg(&proposal_file),
        "--json",
    ])));
    let shares: Vec<f64> = proposal["proposal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(
        (shares.iter().sum::<f64>() - 1.0).abs() < 1e-6,
        "{proposal}"
    );
    assert!(
        proposal["kl_to_base"].as_f64().unwrap() <= 0.3 + 1e-4,
        "{proposal}"
    );
    let math = proposal["domains"]
        .as_array()
        .unwrap()
        .iter()
        .position(|d| d == "math")
        .unwrap();
    assert!(
        (0.05 - 1e-6..=0.6 + 1e-6).contains(&shares[math]),
        "{proposal}"
    );
    assert!(proposal["loo_rmse"].as_f64().unwrap() >= 0.0);
    let written = json(&std::fs::read_to_string(proposal_file.with_extension("json")).unwrap());
    assert_eq!(written["proposal"], proposal["proposal"]);

    // The proposal file runs with `moelab ablate` as it is, and the report then has measurements.
    let proposal_out = PathBuf::from(proposal["out_dir"].as_str().unwrap());
    ok(&moelab(&["ablate", arg(&proposal_file)]));
    for run in [
        "base/seed-1",
        "base/seed-2",
        "proposal/seed-1",
        "proposal/seed-2",
    ] {
        assert!(
            proposal_out.join(run).join("config.toml").is_file(),
            "{run}"
        );
    }
    ok(&moelab(&["mix", "fit", arg(&out)]));
    let report = std::fs::read_to_string(mix.join("mix_report.md")).unwrap();
    assert!(report.contains("Measured over 2 seeds"), "{report}");
    assert!(mix.join("proposal_vs_base.png").is_file());
}

#[test]
fn refusals_name_the_fix() {
    let (dir, base) = fixture("refuse");
    let file = dir.join("swarm.toml");
    let err = fails(&moelab(&[
        "mix",
        "swarm",
        arg(&base),
        "--runs",
        "4",
        "--out",
        arg(&file),
        "--max-epochs",
        "0.0000001",
    ]));
    assert!(err.contains("--max-epochs"), "{err}");
    assert!(!file.exists(), "a refused swarm writes no file");
    let err = fails(&moelab(&[
        "mix",
        "swarm",
        arg(&base),
        "--runs",
        "4",
        "--out",
        arg(&file),
        "--min-share",
        "0.5",
    ]));
    assert!(err.contains("--min-share"), "{err}");
    // Two finished runs cannot fit three domains.
    swarm(&base, &file, "2", "1");
    let out = dir.join("out");
    ok(&moelab(&["ablate", arg(&file), "--out", arg(&out)]));
    let err = fails(&moelab(&["mix", "fit", arg(&out)]));
    assert!(
        err.contains("parameters") && err.contains("--runs"),
        "{err}"
    );
    let err = fails(&moelab(&[
        "mix",
        "fit",
        dir.join("nowhere").to_str().unwrap(),
    ]));
    assert!(err.contains("not a folder"), "{err}");
}
