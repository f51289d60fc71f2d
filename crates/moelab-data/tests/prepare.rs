//! prepare -> shards -> Dataset: formats, bad input, corruption, re-runs, token widths.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{corpus, jsonl, options, text, write};
use moelab_data::manifest::{Split, TokenDtype};
use moelab_data::{prepare, DataConfig, DataError, Dataset, PrepareEvent, TokenizerChoice};

#[test]
fn prepares_domains_sources_and_a_validation_split() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path(), 30);
    let out = tmp.path().join("out");
    let report = prepare(&options(&corpus, &out), &|_| {}).unwrap();
    let ds = Dataset::open(&out).unwrap();
    ds.verify().unwrap();
    assert_eq!(ds.domains(), ["code", "math", "web"]);
    assert_eq!(ds.sources(1), ["plain", "structured"]);
    assert_eq!(ds.sources(2), ["default"]);
    assert_eq!(ds.manifest().dtype, TokenDtype::U16);
    assert!(ds.vocab_size() <= 300 && ds.vocab_size() > 256);
    assert_eq!(
        report.ignored_files.len(),
        0,
        "README.md at the corpus root is not data"
    );
    for d in 0..3 {
        let docs: u64 = (0..ds.sources(d).len())
            .map(|s| ds.train_counts(d, s).documents)
            .sum::<u64>()
            + ds.validation_counts(d).documents;
        let expected = if d == 1 { 60 } else { 30 };
        assert_eq!(docs, expected, "domain {d}");
        assert!(
            ds.validation_counts(d).documents >= 1,
            "every domain gets validation documents"
        );
    }
    // Every document ends with EOS: the count of EOS ids equals the document count.
    let batches = ds.validation_batches(0, 16, 1 << 30, 4).unwrap();
    assert!(!batches.is_empty());
    // The tokenizer is saved with the data and round-trips text.
    let tok = tokenizers::Tokenizer::from_file(ds.tokenizer_path()).unwrap();
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(ds.eos_id()));
    let ids = tok.encode("the river stone", false).unwrap();
    assert_eq!(tok.decode(ids.get_ids(), false).unwrap(), "the river stone");
}

#[test]
fn split_is_deterministic_and_rerun_reuses_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path(), 20);
    let out = tmp.path().join("out");
    let first = prepare(&options(&corpus, &out), &|_| {}).unwrap();
    assert_eq!(first.reused_units, 0);
    let events = std::sync::Mutex::new(Vec::new());
    let second = prepare(&options(&corpus, &out), &|e| {
        events.lock().unwrap().push(e.clone())
    })
    .unwrap();
    assert_eq!(
        second.written_units, 0,
        "nothing changed: every unit is reused"
    );
    assert_eq!(first.manifest, second.manifest);
    assert!(!events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, PrepareEvent::TrainingTokenizer { .. })));
    // With a fixed tokenizer, changing one source rebuilds only its unit (a trained tokenizer
    // would change with the corpus, and with it every shard).
    let tok = tmp.path().join("tokenizer.json");
    std::fs::copy(out.join("tokenizer.json"), &tok).unwrap();
    let mut fixed = options(&corpus, &out);
    fixed.tokenizer = TokenizerChoice::File(tok);
    write(
        &corpus.join("code/programs.jsonl"),
        jsonl(&[text(7, 50), text(8, 60)]),
    );
    let third = prepare(&fixed, &|_| {}).unwrap();
    assert_eq!((third.written_units, third.reused_units), (1, 3));
    // Fresh outputs from the same corpus get the same manifest (same tokenizer, same split).
    fixed.out = tmp.path().join("out2");
    let fourth = prepare(&fixed, &|_| {}).unwrap();
    fixed.out = tmp.path().join("out3");
    let fifth = prepare(&fixed, &|_| {}).unwrap();
    assert_eq!(fourth.manifest, fifth.manifest);
    // The reused units kept their shards: same files, same hashes as in the first run.
    let shards = |m: &moelab_data::Manifest, domain: &str| -> Vec<String> {
        m.domains
            .iter()
            .filter(|d| d.name == domain)
            .flat_map(|d| &d.sources)
            .flat_map(|s| &s.shards)
            .map(|s| format!("{} {}", s.tokens_file, s.tokens_sha256))
            .collect()
    };
    for domain in ["web", "math"] {
        assert_eq!(
            shards(&first.manifest, domain),
            shards(&third.manifest, domain)
        );
    }
    assert_ne!(
        shards(&first.manifest, "code"),
        shards(&third.manifest, "code")
    );
}

fn bad_corpus(root: &Path) -> std::path::PathBuf {
    let dir = root.join("bad");
    let good = serde_json::json!({"text": text(1, 40)}).to_string();
    let mut lines = Vec::new();
    lines.extend_from_slice(good.as_bytes());
    lines.extend_from_slice(b"\n{\"text\": \"unterminated\n");
    lines.extend_from_slice(b"{\"text\": \"\xff\xfe bad utf8\"}\n");
    lines.extend_from_slice(b"{\"text\": \"   \"}\n");
    lines.extend_from_slice(b"{\"title\": \"no text field\"}\n");
    lines.extend_from_slice(good.replace("the", "a").as_bytes());
    lines.push(b'\n');
    write(&dir.join("web/mixed.jsonl"), &lines);
    write(&dir.join("web/empty.txt"), "");
    write(&dir.join("web/latin1.txt"), b"caf\xe9 au lait\n");
    write(&dir.join("web/ok.txt"), text(5, 40));
    dir
}

#[test]
fn bad_documents_are_counted_per_file_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = bad_corpus(tmp.path());
    let out = tmp.path().join("out");
    let report = prepare(&options(&dir, &out), &|_| {}).unwrap();
    let inputs = &report.manifest.inputs;
    let by_name = |n: &str| inputs.iter().find(|i| i.path.ends_with(n)).unwrap();
    let mixed = by_name("mixed.jsonl");
    let skipped = mixed.skipped;
    assert_eq!(
        (
            mixed.documents,
            skipped.malformed_json,
            skipped.no_text,
            skipped.invalid_utf8,
            skipped.empty
        ),
        (2, 1, 1, 1, 1)
    );
    assert_eq!(skipped.total(), 4);
    assert_eq!(by_name("empty.txt").skipped.empty, 1);
    assert_eq!(by_name("latin1.txt").skipped.invalid_utf8, 1);
    assert_eq!(by_name("ok.txt").documents, 1);
    let ds = Dataset::open(&out).unwrap();
    let total = ds.train_counts(0, 0).documents + ds.validation_counts(0).documents;
    assert_eq!(total, 3);
}

#[test]
fn strict_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = bad_corpus(tmp.path());
    std::fs::remove_file(dir.join("web/empty.txt")).unwrap();
    std::fs::remove_file(dir.join("web/latin1.txt")).unwrap();
    let mut opts = options(&dir, &tmp.path().join("out"));
    opts.strict = true;
    let err = prepare(&opts, &|_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Input { line: 2, .. }), "{msg}");
    assert!(
        msg.contains("mixed.jsonl:2") && msg.contains("malformed JSON"),
        "{msg}"
    );

    let dir2 = tmp.path().join("bad2");
    write(&dir2.join("web/latin1.txt"), b"line one\ncaf\xe9\n");
    let mut opts = options(&dir2, &tmp.path().join("out2"));
    opts.strict = true;
    let msg = prepare(&opts, &|_| {}).unwrap_err().to_string();
    assert!(
        msg.contains("latin1.txt:2") && msg.contains("UTF-8"),
        "{msg}"
    );
}

#[test]
fn jsonl_files_with_domain_field_and_compression() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..30u64 {
        let domain = ["web", "code", "math"][i as usize % 3];
        let mut rec = serde_json::json!({"domain": domain, "text": text(i, 60)});
        if domain == "math" {
            rec["source"] = serde_json::json!(if i % 2 == 0 { "structured" } else { "plain" });
        }
        lines.push_str(&(rec.to_string() + "\n"));
    }
    lines.push_str("{\"text\": \"no domain\"}\n");
    let zst = tmp.path().join("mixed.jsonl.zst");
    std::fs::write(&zst, zstd::stream::encode_all(lines.as_bytes(), 3).unwrap()).unwrap();
    let out = tmp.path().join("out");
    let mut opts = options(&zst, &out);
    opts.inputs = vec![zst.clone()];
    let report = prepare(&opts, &|_| {}).unwrap();
    assert_eq!(report.manifest.inputs[0].skipped.no_domain, 1);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.domains(), ["code", "math", "web"]);
    assert_eq!(ds.sources(1), ["plain", "structured"]);

    // A truncated compressed file is an error naming it, never silently short data.
    let bytes = std::fs::read(&zst).unwrap();
    let cut = tmp.path().join("cut.jsonl.zst");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    opts.inputs = vec![cut];
    opts.out = tmp.path().join("out_cut");
    let msg = prepare(&opts, &|_| {}).unwrap_err().to_string();
    assert!(msg.contains("cut.jsonl.zst"), "{msg}");
}

#[test]
fn truncated_shard_and_corrupt_manifest_are_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let out = ds.dir().to_path_buf();
    let shard = ds.manifest().domains[0].sources[0]
        .shards
        .iter()
        .find(|s| s.split == Split::Train)
        .unwrap()
        .tokens_file
        .clone();
    drop(ds);
    let path = out.join(&shard);
    let bytes = std::fs::read(&path).unwrap();

    // Same size, flipped byte: open passes (size check), verify names the file.
    let mut flipped = bytes.clone();
    flipped[10] ^= 0xff;
    std::fs::write(&path, &flipped).unwrap();
    let err = Dataset::open(&out)
        .unwrap()
        .verify()
        .unwrap_err()
        .to_string();
    assert!(err.contains(&shard) && err.contains("sha256"), "{err}");

    std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
    let err = Dataset::open(&out).unwrap_err().to_string();
    assert!(err.contains(&shard) && err.contains("truncated"), "{err}");

    // Re-running prepare repairs it (the unit's shards are no longer intact).
    let corpus = tmp.path().join("corpus");
    let report = prepare(&options(&corpus, &out), &|_| {}).unwrap();
    assert_eq!(report.written_units, 1);
    Dataset::open(&out).unwrap().verify().unwrap();

    let manifest = out.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();
    let err = Dataset::open(&out).unwrap_err().to_string();
    assert!(err.contains("manifest.json"), "{err}");
}

#[test]
fn ensure_prepared_prepares_once_then_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path(), 10);
    let mut cfg = DataConfig::new(tmp.path().join("prepared"), 16);
    let err = moelab_data::ensure_prepared(&cfg).unwrap_err().to_string();
    assert!(err.contains("data.dataset"), "{err}");
    cfg.sources = Some(corpus);
    cfg.tokenizer_vocab = 300;
    let a = moelab_data::ensure_prepared(&cfg).unwrap();
    let b = moelab_data::ensure_prepared(&cfg).unwrap();
    assert_eq!(a.manifest(), b.manifest());
    cfg.tokenizer_vocab = 400;
    let err = moelab_data::ensure_prepared(&cfg).unwrap_err().to_string();
    assert!(err.contains("data.tokenizer_vocab"), "{err}");
}

/// A word-level tokenizer.json with more than 65536 ids, so shards must hold u32.
fn big_vocab_tokenizer(path: &Path) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for i in 1..70_000u32 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    write(path, tok.to_string());
}

#[test]
fn u32_shards_for_large_vocabularies_and_u16_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("big.json");
    big_vocab_tokenizer(&tok);
    let dir = tmp.path().join("c");
    let docs: Vec<String> = (0..5)
        .map(|i| format!("w{} w69999 w65536 w3 w{}", 66000 + i, 1 + i))
        .collect();
    write(&dir.join("web/a.jsonl"), jsonl(&docs));
    let out = tmp.path().join("out");
    let mut opts = options(&dir, &out);
    opts.tokenizer = TokenizerChoice::File(tok);
    opts.validation_fraction = 0.0;
    prepare(&opts, &|_| {}).unwrap();
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.manifest().dtype, TokenDtype::U32);
    assert_eq!(ds.eos_id(), 70_000, "EOS is added after the existing ids");
    assert_eq!(ds.vocab_size(), 70_001);
    let cfg = {
        let mut c = DataConfig::new(&out, 4);
        c.shuffle_block = 1;
        c
    };
    let stream = moelab_data::MixtureStream::new(std::sync::Arc::new(ds), &cfg, 0).unwrap();
    let batch = stream.batch(0, 6).unwrap();
    let mut all: Vec<u32> = batch.tokens.clone();
    all.extend(&batch.targets);
    assert!(all.contains(&69_999) && all.contains(&65_536) && all.contains(&70_000));

    // The same data with a small vocabulary is stored as u16: half the bytes per token.
    let out16 = tmp.path().join("out16");
    let mut opts = options(&dir, &out16);
    opts.validation_fraction = 0.0;
    prepare(&opts, &|_| {}).unwrap();
    let ds16 = Dataset::open(&out16).unwrap();
    assert_eq!(ds16.manifest().dtype, TokenDtype::U16);
    let shard = &ds16.manifest().domains[0].sources[0].shards[0];
    let size = std::fs::metadata(out16.join(&shard.tokens_file))
        .unwrap()
        .len();
    assert_eq!(size, shard.counts.tokens * 2);
}

#[test]
fn bundled_sample_prepares() {
    let tmp = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
    let mut opts = moelab_data::PrepareOptions::new(
        vec![sample],
        tmp.path().to_path_buf(),
        TokenizerChoice::Train(1024),
    );
    opts.strict = true;
    let report = prepare(&opts, &|_| {}).unwrap();
    let ds = Dataset::open(tmp.path()).unwrap();
    // The study's seven domains (PROVENANCE.md), each with two or three sources.
    assert_eq!(
        ds.domains(),
        [
            "books",
            "code",
            "code_text",
            "encyclopedia",
            "math",
            "multilingual",
            "web"
        ]
    );
    let math = ds.domain_id("math").unwrap();
    assert_eq!(ds.sources(math), ["plain", "structured", "text"]);
    // Every source holds out at least the default minimum, so every domain 16,384 or more.
    assert!(
        report.short_validation.is_empty(),
        "{:?}",
        report.short_validation
    );
    for d in &ds.manifest().domains {
        for s in &d.sources {
            assert!(
                s.validation.tokens >= moelab_data::prepare::DEFAULT_MIN_VALIDATION_TOKENS,
                "{}/{}: {} validation tokens",
                d.name,
                s.name,
                s.validation.tokens
            );
            assert!(
                s.train.tokens > 3 * s.validation.tokens,
                "{}/{}",
                d.name,
                s.name
            );
        }
        let id = ds.domain_id(&d.name).unwrap();
        assert!(ds.validation_counts(id).tokens >= 16_384, "{}", d.name);
    }
    let example = include_str!("../src/config.rs");
    assert!(example.contains("[data.source_mixture.math]"));
}

/// Little-endian u16 ids of a shard's token file.
fn shard_ids(out: &Path, tokens_file: &str) -> Vec<u32> {
    std::fs::read(out.join(tokens_file))
        .unwrap()
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

#[test]
fn documents_get_the_ids_of_their_whole_text_even_when_encoded_in_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    let small = text(11, 3000);
    let mut long = String::new();
    let mut seed = 100;
    while long.len() < moelab_data::prepare::PIECE_BYTES * 5 / 2 {
        long.push_str(&text(seed, 2000));
        long.push_str(if seed % 3 == 0 { "\n\n" } else { "  " });
        seed += 1;
    }
    let dir = tmp.path().join("c");
    write(&dir.join("books/long.txt"), &long);
    write(&dir.join("web/small.txt"), &small);
    let out = tmp.path().join("out");
    let mut opts = options(&dir, &out);
    opts.validation_fraction = 0.0;
    prepare(&opts, &|_| {}).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let tok = tokenizers::Tokenizer::from_file(ds.tokenizer_path()).unwrap();
    for (domain, doc) in [("books", &long), ("web", &small)] {
        let d = ds.domain_id(domain).unwrap();
        let shard = &ds.manifest().domains[d].sources[0].shards[0];
        let mut expected = tok
            .encode_fast(doc.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        expected.push(ds.eos_id());
        let got = shard_ids(&out, &shard.tokens_file);
        assert_eq!(got.len(), expected.len(), "{domain}");
        assert!(
            got == expected,
            "{domain}: ids differ from the whole text's"
        );
    }
}

#[test]
fn out_of_range_ids_name_the_shard_the_offset_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let out = ds.dir().to_path_buf();
    let code = ds.domain_id("code").unwrap();
    let shard = ds.manifest().domains[code].sources[0]
        .shards
        .iter()
        .find(|s| s.split == Split::Train)
        .unwrap()
        .tokens_file
        .clone();
    drop(ds);
    // Token 7 becomes an id no tokenizer of this dataset has; the size stays right.
    let path = out.join(&shard);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[14..16].copy_from_slice(&65535u16.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let ds = Dataset::open(&out).unwrap();

    let err = ds.verify().unwrap_err().to_string();
    for part in [
        shard.as_str(),
        "token 7 (document 0) is id 65535",
        "re-run `moelab prepare`",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }

    // Reading it in a stream fails on that chunk, naming shard, offset and the check to run.
    let mut cfg = DataConfig::new(&out, 8);
    cfg.mixture.insert("code".into(), 1.0);
    let chunks = ds.train_counts(code, 0).tokens / 9;
    let stream = moelab_data::MixtureStream::new(std::sync::Arc::new(ds), &cfg, 0).unwrap();
    let err = stream.batch(0, chunks as usize).unwrap_err().to_string();
    for part in [
        shard.as_str(),
        "token 7 is id 65535",
        "moelab data inspect",
        "--verify",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
}

#[test]
fn no_documents_lists_each_file_and_why_its_lines_were_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    write(
        &dir.join("web/a.jsonl"),
        "{\"body\": \"wrong field\"}\nnot json\n{\"text\": \"  \"}\n",
    );
    write(&dir.join("web/b.txt"), b"caf\xe9\n");
    let err = prepare(&options(&dir, &tmp.path().join("out")), &|_| {})
        .unwrap_err()
        .to_string();
    for part in [
        "no documents found in the 2 input files",
        "a.jsonl: 0 kept, skipped: 1 malformed JSON, 1 no string `text`, 1 empty",
        "b.txt: 0 kept, skipped: 1 invalid UTF-8",
        "--text-field (now `text`)",
        "--strict",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
}

#[test]
fn a_disordered_document_index_is_found_by_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let out = ds.dir().to_path_buf();
    let shard = ds.manifest().domains[0].sources[0].shards[0].clone();
    drop(ds);
    let path = out.join(&shard.docs_file);
    let mut index = std::fs::read(&path).unwrap();
    assert!(index.len() >= 16, "at least two documents");
    // Document 0 now ends after document 1; the last entry (checked on open) is intact.
    let second: [u8; 8] = index[8..16].try_into().unwrap();
    index[..8].copy_from_slice(&(u64::from_le_bytes(second) + 1).to_le_bytes());
    std::fs::write(&path, &index).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let err = ds.verify().unwrap_err().to_string();
    assert!(
        err.contains(&shard.docs_file) && err.contains("document 1 ends at"),
        "{err}"
    );
}

#[test]
fn a_given_tokenizer_keeps_its_special_tokens_and_its_own_end_of_document_token() {
    let tmp = tempfile::tempdir().unwrap();
    // A word-level tokenizer with its own special tokens, </s> among them.
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[UNK]", "<s>", "</s>", "the", "river", "stone", "<|user|>"]
        .iter()
        .enumerate()
    {
        vocab.insert(w.to_string(), i.into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(1, "<s>"), special(2, "</s>"), special(6, "<|user|>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let tok_path = tmp.path().join("tok.json");
    write(&tok_path, tok.to_string());
    let dir = tmp.path().join("c");
    write(
        &dir.join("web/a.jsonl"),
        jsonl(&["the river <|user|> stone".into(), "stone the".into()]),
    );
    let out = tmp.path().join("out");
    let mut opts = options(&dir, &out);
    opts.tokenizer = TokenizerChoice::File(tok_path);
    opts.validation_fraction = 0.0;
    opts.eos_token = "</s>".into();
    prepare(&opts, &|_| {}).unwrap();
    let ds = Dataset::open(&out).unwrap();
    ds.verify().unwrap();
    assert_eq!(ds.eos_id(), 2);
    assert_eq!(ds.vocab_size(), 7, "no token was added");
    assert_eq!(ds.manifest().tokenizer.eos_token, "</s>");
    let shard = &ds.manifest().domains[0].sources[0].shards[0];
    // The special token in the text is one id, as the tokenizer defines it.
    assert_eq!(
        shard_ids(&out, &shard.tokens_file),
        [3, 4, 6, 5, 2, 5, 3, 2]
    );
}

#[test]
fn a_small_domain_gets_validation_documents_or_a_warning_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let big: Vec<String> = (0..400).map(|i| text(500 + i, 120)).collect();
    write(&dir.join("web/pages.jsonl"), jsonl(&big));
    // The user's small domain: 17 documents of 30 words.
    let small: Vec<String> = (0..17).map(|i| text(900 + i, 30)).collect();
    write(&dir.join("notes/all.jsonl"), jsonl(&small));
    let out = tmp.path().join("out");
    let mut opts = options(&dir, &out);
    opts.validation_fraction = 0.01;
    opts.min_validation_tokens = 2048;
    let report = prepare(&opts, &|_| {}).unwrap();
    let ds = Dataset::open(&out).unwrap();

    let notes = ds.domain_id("notes").unwrap();
    let val = ds.validation_counts(notes);
    let total = ds.train_counts(notes, 0).tokens + val.tokens;
    assert!(
        val.documents >= 1,
        "the small domain gets validation documents"
    );
    assert!(
        val.tokens * 2 <= total,
        "training keeps most of it: {} of {total} tokens held out",
        val.tokens
    );
    // It cannot spare 2048 tokens: a warning names the domain and the count.
    let short: Vec<_> = report.short_validation.iter().collect();
    assert_eq!(short.len(), 1, "{short:?}");
    assert_eq!(
        (short[0].domain.as_str(), short[0].source.as_str()),
        ("notes", "default")
    );
    assert_eq!(
        (short[0].tokens, short[0].documents),
        (val.tokens, val.documents)
    );
    assert_eq!((short[0].total_documents, short[0].wanted), (17, 2048));
    let message = short[0].to_string();
    for part in [
        "`notes`".to_string(),
        format!("{} validation tokens", val.tokens),
        format!("{} of its 17 documents", val.documents),
        "--min-validation-tokens".to_string(),
    ] {
        assert!(message.contains(&part), "{part}: {message}");
    }
    // The large domain reaches the minimum at 1%'s share or above.
    let web = ds.domain_id("web").unwrap();
    assert!(ds.validation_counts(web).tokens >= 2048);

    // The shares are pinned: a re-run reuses every unit and reports the same.
    let again = prepare(&opts, &|_| {}).unwrap();
    assert_eq!(again.written_units, 0);
    assert_eq!(again.manifest, report.manifest);
    assert_eq!(again.short_validation, report.short_validation);
}

/// Documents whose words the tokenizer learns whole: many bytes per token, so a share guessed
/// from file sizes falls short and only counting tokens reaches the minimum.
fn long_word_docs(first: u64, n: u64) -> Vec<String> {
    const LONG: [&str; 6] = [
        "extraordinarily",
        "incomprehensibilities",
        "counterrevolutionaries",
        "uncharacteristically",
        "internationalization",
        "disproportionately",
    ];
    (first..first + n)
        .map(|i| {
            let mut s = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            (0..40)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    LONG[(s % 6) as usize]
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn sources_short_after_a_first_pass_are_topped_up_to_the_minimum() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    write(&dir.join("words/a.jsonl"), jsonl(&long_word_docs(0, 600)));
    write(
        &dir.join("words/b/b.jsonl"),
        jsonl(&long_word_docs(1000, 5)),
    );
    let prepared = |min: u64, name: &str| {
        let mut opts = options(&dir, &tmp.path().join(name));
        // Room for every long word as one token.
        opts.tokenizer = TokenizerChoice::Train(1000);
        opts.validation_fraction = 0.001;
        opts.min_validation_tokens = min;
        let report = prepare(&opts, &|_| {}).unwrap();
        (report, Dataset::open(&tmp.path().join(name)).unwrap())
    };
    let (plain, plain_ds) = prepared(0, "plain");
    assert!(plain.short_validation.is_empty(), "0 asks for nothing");
    let (report, ds) = prepared(3000, "topped");
    let sources = ds.sources(0).to_vec();
    assert_eq!(sources, ["b", "default"]);
    let big = ds.manifest().domains[0].sources[1].clone();
    let plain_big = plain_ds.manifest().domains[0].sources[1].clone();
    assert!(
        plain_big.validation.tokens < 3000,
        "the byte-based share alone falls short ({}), so this exercises the top-up",
        plain_big.validation.tokens
    );
    assert!(big.validation.tokens >= 3000, "{}", big.validation.tokens);
    // Just enough: removing the last document added would fall short again.
    let per_doc = (big.validation.tokens + big.train.tokens) / 600;
    assert!(big.validation.tokens < 3000 + 2 * per_doc);
    // Topping up only moves documents from train to validation.
    assert_eq!(
        big.validation.documents + big.train.documents,
        plain_big.validation.documents + plain_big.train.documents
    );
    // The 5-document source has one validation document and a warning; the big one none.
    let small = &ds.manifest().domains[0].sources[0];
    assert!(small.validation.documents >= 1);
    assert_eq!(report.short_validation.len(), 1);
    assert_eq!(report.short_validation[0].source, "b");
    assert_eq!(
        report.manifest.validation_ppm.keys().collect::<Vec<_>>(),
        ["words/b", "words/default"]
    );
}
