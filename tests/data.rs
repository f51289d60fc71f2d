//! End-to-end tests of `moelab prepare`, `moelab data inspect` and `moelab data mix`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn moelab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moelab"))
        .args(args)
        .output()
        .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moelab-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (domain, source) in [("prose", ""), ("math", "plain"), ("math", "structured")] {
        let folder = dir.join("corpus").join(domain).join(source);
        std::fs::create_dir_all(&folder).unwrap();
        let mut text = String::new();
        for doc in 0..40 {
            let body: Vec<String> = (0..30)
                .map(|i| format!("{domain} {source} word{} {}", (doc * 31 + i) % 17, i))
                .collect();
            text += &format!("{{\"text\": \"{}\"}}\n", body.join(" "));
        }
        if domain == "prose" {
            text += "{ this line is not json\n";
        }
        std::fs::write(folder.join("part.jsonl"), text).unwrap();
    }
    dir
}

#[test]
fn prepare_inspect_and_mix_a_corpus() {
    let dir = scratch("cli");
    let corpus = dir.join("corpus");
    let prepared = dir.join("prepared");
    let (corpus_s, prepared_s) = (corpus.to_str().unwrap(), prepared.to_str().unwrap());

    // --strict refuses the malformed line, naming file and line.
    let out = moelab(&[
        "prepare",
        corpus_s,
        "--out",
        prepared_s,
        "--train-tokenizer",
        "320",
        "--strict",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("part.jsonl") && err.contains("41"), "{err}");

    // Without it the line is counted and skipped.
    let out = moelab(&[
        "prepare",
        corpus_s,
        "--out",
        prepared_s,
        "--train-tokenizer",
        "320",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = moelab(&["data", "inspect", prepared_s, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sources = info["sources"].as_array().unwrap();
    let names: Vec<String> = sources
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s["domain"].as_str().unwrap(),
                s["source"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        vec!["math/plain", "math/structured", "prose/default"]
    );
    for s in sources {
        let docs = s["documents"].as_u64().unwrap() + s["validation_documents"].as_u64().unwrap();
        assert_eq!(
            docs, 40,
            "every good document lands in train or validation: {s}"
        );
        assert!(s["tokens"].as_u64().unwrap() > 0);
    }

    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"m\"\nseed = 3\n[data]\ndataset = \"{prepared_s}\"\nseq_len = 16\nshuffle_block = 1\n[data.mixture]\nprose = 0.25\nmath = 0.75\n[data.source_mixture.math]\nplain = 0.5\nstructured = 0.5\n"
        ),
    )
    .unwrap();
    let out = moelab(&[
        "data",
        "mix",
        config.to_str().unwrap(),
        "--sequences",
        "400",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mix: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        mix["max_prefix_deviation"].as_f64().unwrap() <= 1.0 + 1e-9,
        "{mix}"
    );
    let prose = mix["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == "prose" && r["source"].is_null())
        .unwrap();
    assert_eq!(prose["sequences"], 100);
}
