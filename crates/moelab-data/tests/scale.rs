//! Preparing at scale: many shards per source, output independent of the thread count,
//! `--part` + `merge` equal to one prepare, incremental prepare touching only new files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{corpus, jsonl, options, text, write};
use moelab_data::manifest::Split;
use moelab_data::{merge, prepare, DataConfig, Dataset, MixtureStream, TokenizerChoice};

/// Every file under `dir` (relative path -> bytes).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A bigger corpus for shard tests: more and longer documents in every source.
fn wide_corpus(root: &Path) -> PathBuf {
    let dir = corpus(root, 60);
    let long: Vec<String> = (0..8).map(|i| text(7000 + i, 1500)).collect();
    write(&dir.join("books/long.jsonl"), jsonl(&long));
    dir
}

#[test]
fn many_shards_load_and_mix_exactly_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = wide_corpus(tmp.path());
    let one = tmp.path().join("one");
    let many = tmp.path().join("many");
    prepare(&options(&corpus, &one), &|_| {}).unwrap();
    let mut opts = options(&corpus, &many);
    opts.tokenizer = TokenizerChoice::File(one.join("tokenizer.json"));
    opts.max_shard_bytes = 4096;
    prepare(&opts, &|_| {}).unwrap();

    let a = Arc::new(Dataset::open(&one).unwrap());
    let b = Arc::new(Dataset::open(&many).unwrap());
    b.verify().unwrap();
    assert_eq!(a.domains(), b.domains());
    let mut shards = 0;
    for (d, (da, db)) in a
        .manifest()
        .domains
        .iter()
        .zip(&b.manifest().domains)
        .enumerate()
    {
        for (sa, sb) in da.sources.iter().zip(&db.sources) {
            assert_eq!((sa.train, sa.validation), (sb.train, sb.validation));
            assert!(sb.shards.len() > sa.shards.len(), "{}/{}", da.name, sa.name);
            for shard in &sb.shards {
                let bytes = shard.counts.tokens * 2;
                // A shard over the cap holds one document longer than it.
                assert!(bytes <= 4096 || shard.counts.documents == 1, "{shard:?}");
            }
            shards += sb.shards.len();
        }
        let _ = d;
    }
    assert!(shards > 40, "{shards} shards");
    let listed: usize = tree(&many.join("shards")).len();
    assert_eq!(
        listed,
        2 * shards,
        "every shard is a token file and an index"
    );

    // Streams, validation batches and fingerprints' inputs are the same token for token.
    for (seed, mixture) in [
        (
            0,
            vec![("web", 1.0), ("code", 1.0), ("math", 2.0), ("books", 1.0)],
        ),
        (7, vec![("books", 3.0), ("web", 1.0)]),
    ] {
        let cfg = |ds: &Dataset| {
            let mut c = DataConfig::new(ds.dir(), 32);
            c.mixture = mixture.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            c
        };
        let sa = MixtureStream::new(a.clone(), &cfg(&a), seed).unwrap();
        let sb = MixtureStream::new(b.clone(), &cfg(&b), seed).unwrap();
        for start in [0u64, 17, 250] {
            let (x, y) = (sa.batch(start, 24).unwrap(), sb.batch(start, 24).unwrap());
            assert_eq!(x.tokens, y.tokens);
            assert_eq!(x.targets, y.targets);
            assert_eq!(x.domain_ids, y.domain_ids);
            assert_eq!(x.source_ids, y.source_ids);
        }
    }
    for d in 0..a.domains().len() {
        let x = a.validation_batches(d, 16, 1 << 20, 8).unwrap();
        let y = b.validation_batches(d, 16, 1 << 20, 8).unwrap();
        assert_eq!(x.len(), y.len());
        for (x, y) in x.iter().zip(&y) {
            assert_eq!(x.tokens, y.tokens);
        }
    }
}

#[test]
fn output_is_identical_whatever_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = wide_corpus(tmp.path());
    let mut trees = Vec::new();
    for threads in [1, 2, 3] {
        let out = tmp.path().join(format!("t{threads}"));
        let mut opts = options(&corpus, &out);
        opts.threads = Some(threads);
        opts.max_shard_bytes = 8192;
        prepare(&opts, &|_| {}).unwrap();
        trees.push(tree(&out));
    }
    assert!(trees[0].keys().any(|k| k.ends_with(".tokens")));
    assert!(trees[0].contains_key("tokenizer.json"));
    for t in &trees[1..] {
        assert_eq!(
            t.keys().collect::<Vec<_>>(),
            trees[0].keys().collect::<Vec<_>>()
        );
        for (name, bytes) in t {
            assert!(
                bytes == &trees[0][name],
                "{name} differs between thread counts"
            );
        }
    }
}

#[test]
fn parts_merge_into_exactly_the_single_prepare() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = wide_corpus(tmp.path());
    // Files whose records name domain and source, at the corpus root.
    let mixed: String = (0..12u64)
        .map(|i| {
            let domain = ["web", "news"][i as usize % 2];
            serde_json::json!({"text": text(9000 + i, 60), "domain": domain, "source": "crawl/2024"})
            .to_string()
                + "\n"
        })
        .collect();
    write(&corpus.join("dump-a.jsonl"), &mixed);
    write(&corpus.join("dump-b.jsonl"), mixed.replace("crawl", "feed"));
    let tok_dir = tmp.path().join("tok");
    prepare(&options(&corpus, &tok_dir), &|_| {}).unwrap();
    let with_tokenizer = |out: &Path| {
        let mut o = options(&corpus, out);
        o.tokenizer = TokenizerChoice::File(tok_dir.join("tokenizer.json"));
        o.max_shard_bytes = 8192;
        // Topping sources up to --min-validation-tokens needs the whole corpus, so parts
        // keep the first, byte-based shares: the single prepare compared must too.
        o.min_validation_tokens = 0;
        o
    };
    let single = tmp.path().join("single");
    prepare(&with_tokenizer(&single), &|_| {}).unwrap();

    let n = 3;
    let mut parts = Vec::new();
    let mut units = 0;
    for i in 0..n {
        let dir = tmp.path().join(format!("part{i}"));
        let mut o = with_tokenizer(&dir);
        o.part = Some(format!("{i}/{n}").parse().unwrap());
        let report = prepare(&o, &|_| {}).unwrap();
        assert!(report.written_units > 0, "part {i} got work");
        units += report.written_units;
        parts.push(dir);
    }
    let single_units = std::fs::read_dir(single.join("units")).unwrap().count();
    assert_eq!(units, single_units, "every unit in exactly one part");

    // A missing part is refused, naming it.
    let merged = tmp.path().join("merged");
    let err = merge(&merged, &parts[..2]).unwrap_err().to_string();
    assert!(err.contains("parts 2/3 are missing"), "{err}");
    assert!(!merged.exists());

    merge(&merged, &parts).unwrap();
    let a = tree(&single);
    let b = tree(&merged);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        assert!(
            bytes == &b[name],
            "{name} differs between merged and single prepare"
        );
    }
    Dataset::open(&merged).unwrap().verify().unwrap();
    // A part with no unit (more parts than files) is an empty, valid part.
    let mut o = with_tokenizer(&tmp.path().join("empty-part"));
    o.part = Some("40/41".parse().unwrap());
    let report = prepare(&o, &|_| {}).unwrap();
    assert_eq!((report.written_units, report.reused_units), (0, 0));
    assert!(report.manifest.domains.is_empty());
    // Merging again into the dataset is refused.
    let err = merge(&merged, &parts).unwrap_err().to_string();
    assert!(err.contains("already holds a dataset"), "{err}");
}

/// (inode, modification time, content) of every shard file.
#[cfg(unix)]
fn shard_files(dir: &Path) -> BTreeMap<String, (u64, std::time::SystemTime, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    tree(&dir.join("shards"))
        .into_iter()
        .map(|(name, bytes)| {
            let meta = std::fs::metadata(dir.join("shards").join(&name)).unwrap();
            (name, (meta.ino(), meta.modified().unwrap(), bytes))
        })
        .collect()
}

#[cfg(unix)]
#[test]
fn incremental_prepare_encodes_only_new_and_changed_files() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path(), 20);
    let out = tmp.path().join("out");
    let opts = options(&corpus, &out);
    prepare(&opts, &|_| {}).unwrap();
    let tokenizer = std::fs::read(out.join("tokenizer.json")).unwrap();
    let before = shard_files(&out);
    let first = Dataset::open(&out).unwrap().manifest().clone();

    // New files: one more source of math, a new domain. The trained tokenizer is pinned.
    write(
        &corpus.join("math/extra/c.jsonl"),
        jsonl(&[text(77, 90), text(78, 90)]),
    );
    write(&corpus.join("news/day1.txt"), text(79, 200));
    let events = std::sync::Mutex::new(Vec::new());
    let report = prepare(&opts, &|e| events.lock().unwrap().push(e.clone())).unwrap();
    assert_eq!((report.written_units, report.reused_units), (2, 4));
    assert!(!events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, moelab_data::PrepareEvent::TrainingTokenizer { .. })));
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        tokenizer
    );
    let after = shard_files(&out);
    for (name, file) in &before {
        assert!(
            after.get(name) == Some(file),
            "{name} was rewritten or removed"
        );
    }
    assert!(after.keys().any(|k| k.starts_with("news/")));
    assert!(after.keys().any(|k| k.starts_with("math/extra/")));
    let second = Dataset::open(&out).unwrap().manifest().clone();
    assert_eq!(
        second.validation_ppm["web/default"],
        first.validation_ppm["web/default"]
    );
    let ds = Dataset::open(&out).unwrap();
    ds.verify().unwrap();
    let math = ds.domain_id("math").unwrap();
    assert_eq!(ds.sources(math), ["extra", "plain", "structured"]);

    // A changed file: only its unit is encoded again; its old shards are removed.
    write(&corpus.join("code/programs.jsonl"), jsonl(&[text(80, 50)]));
    let report = prepare(&opts, &|_| {}).unwrap();
    assert_eq!((report.written_units, report.reused_units), (1, 5));
    let third = shard_files(&out);
    for (name, file) in &after {
        if name.starts_with("code/") {
            assert!(!third.contains_key(name), "stale shard {name} kept");
        } else {
            assert!(third.get(name) == Some(file), "{name} was rewritten");
        }
    }
    let ds = Dataset::open(&out).unwrap();
    let code = ds.domain_id("code").unwrap();
    let code_docs = ds.train_counts(code, 0).documents + ds.validation_counts(code).documents;
    assert_eq!(code_docs, 1);

    // A removed file drops out of the dataset with its shards.
    std::fs::remove_dir_all(corpus.join("news")).unwrap();
    prepare(&opts, &|_| {}).unwrap();
    let ds = Dataset::open(&out).unwrap();
    assert!(ds.domain_id("news").is_none());
    assert!(!shard_files(&out).keys().any(|k| k.starts_with("news/")));
    assert!(ds
        .manifest()
        .domains
        .iter()
        .flat_map(|d| &d.sources)
        .flat_map(|s| &s.shards)
        .any(|s| s.split == Split::Validation));
}
