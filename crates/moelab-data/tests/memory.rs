//! Peak memory of prepare on one very long document, measured in a child process so the
//! figure is that of prepare alone (the test harness and other tests share no heap with it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use moelab_data::{prepare, Dataset, PrepareOptions, TokenizerChoice};

/// Set in the child: the folder holding the corpus; the child writes its peak RSS there.
const CHILD_ENV: &str = "MOELAB_DATA_MEMORY_CHILD";

/// Size of the generated document. Tokenized whole (before pieces) it peaked at 3801 MiB RSS,
/// in 1 MiB pieces at 363 MiB, in 64 KiB pieces with the streaming prepare at 132 MiB
/// (2 threads, 2-core machine).
const DOCUMENT_BYTES: usize = 32 << 20;

/// Peak RSS allowed for preparing it (tokenizer training and encoding): the document itself,
/// its ids and a bounded per-piece overhead, far below the ~130x of tokenizing it whole.
const PEAK_RSS_LIMIT_BYTES: u64 = 1 << 30;

/// Peak resident set of this process (Linux: VmHWM of /proc/self/status), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The child's work: train a tokenizer on and encode the one long document.
fn child(root: &Path) {
    let mut opts = PrepareOptions::new(
        vec![root.join("corpus")],
        root.join("out"),
        TokenizerChoice::Train(1000),
    );
    opts.threads = Some(2);
    prepare(&opts, &|_| {}).unwrap();
    let peak = peak_rss_bytes().unwrap();
    std::fs::write(root.join("peak_rss"), peak.to_string()).unwrap();
}

#[test]
fn one_long_document_has_bounded_peak_memory() {
    if let Some(root) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&root));
        return;
    }
    if peak_rss_bytes().is_none() {
        eprintln!("skipped: no /proc/self/status VmHWM on this platform");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut doc = String::with_capacity(DOCUMENT_BYTES + 4096);
    let mut seed = 0;
    while doc.len() < DOCUMENT_BYTES {
        doc.push_str(&common::text(seed, 4000));
        doc.push('\n');
        seed += 1;
    }
    common::write(&tmp.path().join("corpus/books/huge.txt"), &doc);
    // A second, small domain so the dataset has more than the one document.
    common::write(
        &tmp.path().join("corpus/web/page.txt"),
        common::text(7, 500),
    );
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "one_long_document_has_bounded_peak_memory",
            "--exact",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, tmp.path())
        .status()
        .unwrap();
    assert!(status.success(), "the child prepare failed: {status}");
    let peak: u64 = std::fs::read_to_string(tmp.path().join("peak_rss"))
        .unwrap()
        .parse()
        .unwrap();
    eprintln!(
        "peak RSS preparing a {} MiB document: {} MiB",
        doc.len() >> 20,
        peak >> 20
    );
    assert!(
        peak < PEAK_RSS_LIMIT_BYTES,
        "prepare of one {} MiB document peaked at {} MiB RSS, above the {} MiB bound",
        doc.len() >> 20,
        peak >> 20,
        PEAK_RSS_LIMIT_BYTES >> 20
    );
    // The long document was encoded whole, not dropped.
    let ds = Dataset::open(&tmp.path().join("out")).unwrap();
    let books = ds.domain_id("books").unwrap();
    assert!(ds.train_counts(books, 0).tokens > (DOCUMENT_BYTES / 8) as u64);
}
