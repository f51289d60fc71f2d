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

/// A Dolma-style gzipped JSONL dump: the domain in `metadata.domain`, sources with `/`.
fn write_dolma(path: &std::path::Path, files: usize) -> Vec<std::path::PathBuf> {
    std::fs::create_dir_all(path).unwrap();
    let words = ["the", "proof", "sum", "river", "fn", "let", "city", "prime"];
    (0..files)
        .map(|f| {
            let mut lines = String::new();
            for i in 0..30usize {
                let text: Vec<&str> = (0..40).map(|k| words[(i * 7 + k * (f + 3)) % 8]).collect();
                let (domain, source) = [("web", "cc/2019"), ("web", "cc/2020"), ("math", "arxiv")][i % 3];
                lines.push_str(
                    &(serde_json::json!({"id": format!("{f}-{i}"), "text": text.join(" "), "source": source,
                                         "metadata": {"domain": domain}})
                    .to_string()
                        + "\n"),
                );
            }
            lines.push_str("{\"id\": \"broken\"\n");
            let file = path.join(format!("part-{f}.json.gz"));
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, lines.as_bytes()).unwrap();
            std::fs::write(&file, gz.finish().unwrap()).unwrap();
            file
        })
        .collect()
}

#[test]
fn prepare_a_dolma_dump_in_parts_and_merge_it() {
    let dir = Scratch::new("data-dolma");
    let files = write_dolma(&dir.join("dolma"), 4);
    let inputs: Vec<&str> = files.iter().map(|f| arg(f)).collect();
    let prepare = |extra: &[&str]| {
        let mut args = vec!["prepare"];
        args.extend(&inputs);
        args.extend(["--domain-field", "metadata.domain"]);
        args.extend(extra);
        moelab(&args)
    };
    // A single prepare trains the tokenizer; its per-file counts and reasons are printed.
    let single = dir.join("single");
    let out = prepare(&["--out", arg(&single), "--train-tokenizer", "300"]);
    ok(&out);
    let err = crate::util::stderr(&out);
    assert!(
        err.contains("part-0.json.gz: 30 kept, 1 skipped (1 malformed JSON)"),
        "{err}"
    );
    assert!(
        err.contains("4 files: 120 documents kept, 4 skipped"),
        "{err}"
    );

    // Without the nested field path: no document has a domain, and nothing is left behind.
    let failed = dir.join("failed");
    let err = fails(&moelab(&[
        "prepare",
        inputs[0],
        "--out",
        arg(&failed),
        "--train-tokenizer",
        "300",
    ]));
    assert!(
        err.contains("no string `domain`") && err.contains("metadata.domain"),
        "{err}"
    );
    assert!(!failed.exists());

    // Two array tasks and a merge give the single prepare's dataset, byte for byte. Topping
    // sources up to --min-validation-tokens needs the whole corpus, so parts keep the first,
    // byte-based shares: the single prepare compared does too.
    let tokenizer = single.join("tokenizer.json");
    let again = dir.join("again");
    ok(&prepare(&[
        "--out",
        arg(&again),
        "--tokenizer",
        arg(&tokenizer),
        "--min-validation-tokens",
        "0",
    ]));
    let mut parts = Vec::new();
    for i in 0..2 {
        let part = dir.join(format!("parts/{i}"));
        let slice = format!("{i}/2");
        ok(&prepare(&[
            "--out",
            arg(&part),
            "--tokenizer",
            arg(&tokenizer),
            "--part",
            &slice,
        ]));
        parts.push(part);
    }
    let merged = dir.join("merged");
    ok(&moelab(&[
        "prepare",
        "merge",
        arg(&merged),
        arg(&parts[0]),
        arg(&parts[1]),
    ]));
    let read = |p: &std::path::Path| std::fs::read(p.join("manifest.json")).unwrap();
    assert!(read(&merged) == read(&again), "merged manifest differs");
    let info: serde_json::Value = serde_json::from_str(&ok(&moelab(&[
        "data",
        "inspect",
        arg(&merged),
        "--verify",
        "--json",
    ])))
    .unwrap();
    let names: Vec<String> = info["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s["domain"].as_str().unwrap(),
                s["source"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, ["math/arxiv", "web/cc/2019", "web/cc/2020"]);
}

#[test]
fn classify_train_score_and_a_selected_share_in_data_mix() {
    let dir = Scratch::new("data-classify");
    let corpus = Corpus::with_math_sources().write(&dir.join("corpus"));
    let prepared = dir.join("prepared");
    ok(&moelab(&[
        "prepare",
        arg(&corpus),
        "--out",
        arg(&prepared),
        "--train-tokenizer",
        "400",
    ]));
    let model = dir.join("code.bin");
    let train: serde_json::Value = serde_json::from_str(&ok(&moelab(&[
        "data",
        "classify",
        "train",
        "--positive",
        arg(&corpus.join("code")),
        "--negative",
        arg(&corpus.join("prose")),
        "--out",
        arg(&model),
        "--json",
    ])))
    .unwrap();
    for key in ["accuracy", "precision", "recall"] {
        let v = train[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key}: {train}");
    }
    assert_eq!(
        train["accuracy"], 1.0,
        "code and prose are separable: {train}"
    );
    assert!(model.is_file());
    let score = |expect_scored: bool| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&ok(&moelab(&[
            "data",
            "classify",
            "score",
            arg(&model),
            arg(&prepared),
            "--name",
            "code_like",
            "--json",
        ])))
        .unwrap();
        assert_eq!(
            v["shards_scored"].as_u64().unwrap() > 0,
            expect_scored,
            "{v}"
        );
        v
    };
    let first = score(true);
    assert!(first["documents"].as_u64().unwrap() > 0);
    // A second run keeps every side file.
    assert_eq!(score(false)["shards_kept"], first["shards_scored"]);
    assert!(prepared.join("scores").join("code_like").is_dir());

    let config = crate::corpus::RunConfig::small(dir.path())
        .set_all(&[
            "data.select.math.scores=\"code_like\"",
            "data.select.math.threshold=0.0",
            "data.select.math.share=1.0",
        ])
        .write(&dir.join("run.toml"));
    let mix = ok(&moelab(&[
        "data",
        "mix",
        arg(&config),
        "--sequences",
        "500",
    ]));
    let row = mix
        .lines()
        .find(|l| l.contains("math/[code_like >= 0]"))
        .unwrap_or_else(|| panic!("{mix}"));
    assert!(
        row.contains("20.0000%"),
        "all of math (20%) is selected: {row}"
    );
    let missing = crate::corpus::RunConfig::small(dir.path())
        .set_all(&[
            "data.select.math.scores=\"nope\"",
            "data.select.math.threshold=0.5",
            "data.select.math.share=0.5",
        ])
        .write(&dir.join("bad.toml"));
    let err = fails(&moelab(&[
        "data",
        "mix",
        arg(&missing),
        "--sequences",
        "10",
    ]));
    assert!(err.contains("moelab data classify score"), "{err}");
}
