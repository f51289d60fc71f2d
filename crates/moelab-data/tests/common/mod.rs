//! Helpers shared by the integration tests: small deterministic corpora.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moelab_data::{prepare, Dataset, PrepareOptions, TokenizerChoice};

const WORDS: &[&str] = &[
    "the", "of", "river", "stone", "light", "number", "prime", "sum", "fn", "let", "return", "x",
    "=", "+", "if", "else", "while", "city", "green", "seven", "print", "(", ")", "{", "}",
    "theorem", "proof", "and",
];

/// Deterministic pseudo-random text of `words` words (xorshift, seeded).
pub fn text(seed: u64, words: usize) -> String {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = String::new();
    for i in 0..words {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        if i > 0 {
            out.push(if i % 13 == 0 { '\n' } else { ' ' });
        }
        out.push_str(WORDS[(s % WORDS.len() as u64) as usize]);
    }
    out
}

pub fn write(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

pub fn jsonl(docs: &[String]) -> String {
    docs.iter()
        .map(|d| serde_json::json!({ "text": d }).to_string() + "\n")
        .collect()
}

/// A corpus folder: web (txt files), code (jsonl), math/structured + math/plain (jsonl, gz).
pub fn corpus(root: &Path, docs_per_source: usize) -> PathBuf {
    let dir = root.join("corpus");
    for i in 0..docs_per_source {
        write(
            &dir.join(format!("web/page{i:03}.txt")),
            text(1000 + i as u64, 150),
        );
    }
    let code: Vec<String> = (0..docs_per_source)
        .map(|i| text(2000 + i as u64, 120))
        .collect();
    write(&dir.join("code/programs.jsonl"), jsonl(&code));
    let structured: Vec<String> = (0..docs_per_source)
        .map(|i| text(3000 + i as u64, 100))
        .collect();
    write(&dir.join("math/structured/a.jsonl"), jsonl(&structured));
    let plain: Vec<String> = (0..docs_per_source)
        .map(|i| text(4000 + i as u64, 80))
        .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, jsonl(&plain).as_bytes()).unwrap();
    write(&dir.join("math/plain/b.jsonl.gz"), gz.finish().unwrap());
    write(&dir.join("README.md"), "not data");
    dir
}

pub fn options(corpus: &Path, out: &Path) -> PrepareOptions {
    let mut opts = PrepareOptions::new(
        vec![corpus.to_path_buf()],
        out.to_path_buf(),
        TokenizerChoice::Train(300),
    );
    opts.validation_fraction = 0.1;
    opts
}

/// A prepared small corpus in `root/out`.
pub fn prepared(root: &Path) -> Arc<Dataset> {
    let corpus = corpus(root, 40);
    let out = root.join("out");
    prepare(&options(&corpus, &out), &|_| {}).unwrap();
    Arc::new(Dataset::open(&out).unwrap())
}
