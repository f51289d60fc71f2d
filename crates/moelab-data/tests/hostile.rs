//! Decompression bombs and giant documents: prepare and the classifier's reader finish or
//! refuse within bounded memory and time. Each case runs in a child process (this test binary
//! again) so its peak RSS is its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use moelab_data::classify::read_documents_within;
use moelab_data::{prepare, Limits, PrepareOptions, TokenizerChoice};

/// Set in the child: `<case> <folder>`; the child writes `<folder>/<case>.result`.
const CHILD_ENV: &str = "MOELAB_DATA_BOMB_CHILD";

/// The one-line JSON bomb: a 512 MiB line that zstd packs into a few hundred KB.
const LINE_BYTES: usize = 512 << 20;
/// The text-file bomb: 128 MiB of text gzipped.
const TEXT_BYTES: usize = 128 << 20;
/// What a bomb may cost: far below holding the document (and its parsed copies).
const PEAK_RSS_LIMIT_BYTES: u64 = 1 << 30;
/// Lowered document cap for the cases that lift the expansion guard.
const SMALL_CAP: u64 = 1 << 20;

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Writes `total` bytes of `fill` framed by `head` and `tail` through `out`, 1 MiB at a time.
fn stream(out: &mut dyn Write, head: &[u8], fill: u8, total: usize, tail: &[u8]) {
    out.write_all(head).unwrap();
    let chunk = vec![fill; 1 << 20];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        out.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    out.write_all(tail).unwrap();
}

/// corpus/web: good pages and a zstd JSONL bomb; corpus/books: a good book and a gzip text bomb.
fn write_bombs(root: &Path) {
    let web = root.join("corpus/web");
    let books = root.join("corpus/books");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::create_dir_all(&books).unwrap();
    let good: Vec<String> = (0..20).map(|i| common::text(i, 200)).collect();
    common::write(&web.join("good.jsonl"), common::jsonl(&good));
    common::write(&books.join("good.txt"), common::text(99, 400));
    let file = std::fs::File::create(web.join("bomb.jsonl.zst")).unwrap();
    let mut zst = zstd::stream::write::Encoder::new(file, 3).unwrap();
    stream(&mut zst, b"{\"text\": \"", b'a', LINE_BYTES, b"\"}\n");
    zst.finish().unwrap();
    let file = std::fs::File::create(books.join("bomb.txt.gz")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    stream(&mut gz, b"", b'a', TEXT_BYTES, b"");
    gz.finish().unwrap();
}

/// One case, in the child: its outcome as a line of text.
fn run_case(case: &str, root: &Path) -> String {
    let mut opts = PrepareOptions::new(
        vec![root.join("corpus")],
        root.join(format!("out-{case}")),
        TokenizerChoice::Train(300),
    );
    opts.threads = Some(2);
    let lifted = Limits {
        max_document_bytes: SMALL_CAP,
        max_expansion: 1 << 40,
    };
    match case {
        "prepare-guard" => match prepare(&opts, &|_| {}) {
            Ok(_) => "ok".into(),
            Err(e) => format!("err {e}"),
        },
        "prepare-cap" => {
            opts.limits = lifted;
            match prepare(&opts, &|_| {}) {
                Ok(r) => {
                    let too_long: u64 = r.manifest.inputs.iter().map(|i| i.skipped.too_long).sum();
                    let kept: u64 = r.manifest.inputs.iter().map(|i| i.documents).sum();
                    format!("ok too_long={too_long} kept={kept}")
                }
                Err(e) => format!("err {e}"),
            }
        }
        "classify-guard" => match read_documents_within(&root.join("corpus"), &Limits::default()) {
            Ok(d) => format!("ok {}", d.documents.len()),
            Err(e) => format!("err {e}"),
        },
        "classify-cap" => match read_documents_within(&root.join("corpus"), &lifted) {
            Ok(d) => format!("ok too_long={} kept={}", d.too_long, d.documents.len()),
            Err(e) => format!("err {e}"),
        },
        other => format!("unknown case {other}"),
    }
}

#[test]
fn bombs_finish_or_are_refused_in_bounded_memory_and_time() {
    if let Some(spec) = std::env::var_os(CHILD_ENV) {
        let spec = spec.to_string_lossy().into_owned();
        let (case, root) = spec.split_once(' ').unwrap();
        let start = Instant::now();
        let outcome = run_case(case, Path::new(root));
        let line = format!(
            "{}\n{}\n{}",
            peak_rss_bytes().unwrap_or(0),
            start.elapsed().as_secs_f64(),
            outcome
        );
        std::fs::write(Path::new(root).join(format!("{case}.result")), line).unwrap();
        return;
    }
    if peak_rss_bytes().is_none() {
        eprintln!("skipped: no /proc/self/status VmHWM on this platform");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    write_bombs(tmp.path());
    let mut outcomes = Vec::new();
    for case in [
        "prepare-guard",
        "prepare-cap",
        "classify-guard",
        "classify-cap",
    ] {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "bombs_finish_or_are_refused_in_bounded_memory_and_time",
                "--exact",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{case} {}", tmp.path().display()))
            .status()
            .unwrap();
        assert!(status.success(), "{case}: the child failed: {status}");
        let text = std::fs::read_to_string(tmp.path().join(format!("{case}.result"))).unwrap();
        let mut lines = text.splitn(3, '\n');
        let peak: u64 = lines.next().unwrap().parse().unwrap();
        let seconds: f64 = lines.next().unwrap().parse().unwrap();
        let outcome = lines.next().unwrap().to_string();
        eprintln!(
            "{case}: peak RSS {} MiB, {seconds:.1} s: {outcome}",
            peak >> 20
        );
        assert!(
            peak < PEAK_RSS_LIMIT_BYTES,
            "{case} peaked at {} MiB RSS",
            peak >> 20
        );
        assert!(seconds < 120.0, "{case} took {seconds:.0} s");
        outcomes.push((case, outcome));
    }
    let outcome = |case: &str| &outcomes.iter().find(|(c, _)| *c == case).unwrap().1;
    // The expansion guard names the first bomb met (books/bomb.txt.gz) and the option.
    for case in ["prepare-guard", "classify-guard"] {
        let o = outcome(case);
        assert!(
            o.starts_with("err")
                && o.contains("decompression bomb")
                && o.contains("--max-expansion"),
            "{case}: {o}"
        );
        assert!(
            o.contains("bomb.txt.gz") || o.contains("bomb.jsonl.zst"),
            "{o}"
        );
    }
    // With the guard lifted, both giant documents are skipped as too long; the rest is kept
    // (the classifier reads no .txt.gz, so it meets only the JSON line).
    assert_eq!(outcome("prepare-cap"), "ok too_long=2 kept=21");
    assert_eq!(outcome("classify-cap"), "ok too_long=1 kept=21");
}
