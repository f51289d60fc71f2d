//! `moelab prepare`, `moelab data inspect` and `moelab data mix`.

use crate::corpus::Corpus;
use crate::util::{arg, fails, moelab, ok, Scratch};

#[test]
fn prepare_inspect_and_mix_a_corpus() {
    let dir = Scratch::new("data-prepare");
    let corpus = Corpus::labelled_with_a_bad_line().write(&dir.join("corpus"));
    let prepared = dir.join("prepared");
    let (corpus_s, prepared_s) = (arg(&corpus), arg(&prepared));

    // --strict refuses the malformed line, naming file and line.
    let err = fails(&moelab(&[
        "prepare",
        corpus_s,
        "--out",
        prepared_s,
        "--train-tokenizer",
        "320",
        "--strict",
    ]));
    assert!(err.contains("part.jsonl") && err.contains("41"), "{err}");

    // Without it the line is counted and skipped.
    ok(&moelab(&[
        "prepare",
        corpus_s,
        "--out",
        prepared_s,
        "--train-tokenizer",
        "320",
    ]));

    let info: serde_json::Value =
        serde_json::from_str(&ok(&moelab(&["data", "inspect", prepared_s, "--json"]))).unwrap();
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
    let mix: serde_json::Value = serde_json::from_str(&ok(&moelab(&[
        "data",
        "mix",
        arg(&config),
        "--sequences",
        "400",
        "--json",
    ])))
    .unwrap();
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
