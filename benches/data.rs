//! Data benchmarks: batch assembly from memory-mapped shards (tokens/s on one core) and
//! `prepare` throughput (MB/s of corpus) with 1 and 2 worker threads.
//!
//! Run: `cargo bench -p moelab-benches --bench data -- --measurement-time 3 --warm-up-time 1`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moelab_data::{prepare, DataConfig, Dataset, MixtureStream, PrepareOptions, TokenizerChoice};

fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/sample")
}

fn corpus_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            total += corpus_bytes(&path);
        } else if path.parent() != Some(sample_dir().as_path()) {
            total += std::fs::metadata(&path).unwrap().len();
        }
    }
    total
}

fn prepared_sample(out: &Path) -> Arc<Dataset> {
    let opts = PrepareOptions::new(
        vec![sample_dir()],
        out.to_path_buf(),
        TokenizerChoice::Train(4096),
    );
    prepare(&opts, &|_| {}).unwrap();
    Arc::new(Dataset::open(out).unwrap())
}

fn batch_assembly(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = prepared_sample(tmp.path());
    let mut group = c.benchmark_group("batch_assembly");
    for (seq_len, n) in [(256usize, 16usize), (1024, 8), (2048, 4)] {
        let mut cfg = DataConfig::new(dataset.dir(), seq_len);
        cfg.mixture = [
            ("web", 0.3),
            ("code", 0.15),
            ("code_text", 0.1),
            ("math", 0.15),
            ("encyclopedia", 0.1),
            ("books", 0.1),
            ("multilingual", 0.1),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        let stream = MixtureStream::new(dataset.clone(), &cfg, 1234).unwrap();
        group.throughput(Throughput::Elements((seq_len * n) as u64));
        let mut step = 0u64;
        group.bench_function(
            BenchmarkId::new("sequential", format!("{n}x{seq_len}")),
            |b| {
                b.iter(|| {
                    step += 1;
                    stream.rank_batch(step, n, 0, 1).unwrap()
                })
            },
        );
        // Random access (resume, eval): the greedy blend restarts from a checkpoint.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        group.bench_function(BenchmarkId::new("random", format!("{n}x{seq_len}")), |b| {
            b.iter(|| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                stream.batch(x % 1_000_000, n).unwrap()
            })
        });
    }
    group.finish();
}

fn prepare_throughput(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = prepared_sample(&tmp.path().join("ref"));
    let tokenizer = dataset.tokenizer_path();
    let bytes = corpus_bytes(&sample_dir());
    let mut group = c.benchmark_group("prepare");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    for threads in [1usize, 2] {
        let mut run = 0;
        group.bench_function(
            BenchmarkId::new("sample_given_tokenizer", format!("{threads}_threads")),
            |b| {
                b.iter(|| {
                    run += 1;
                    let out = tmp.path().join(format!("t{threads}_{run}"));
                    let mut opts = PrepareOptions::new(
                        vec![sample_dir()],
                        out.clone(),
                        TokenizerChoice::File(tokenizer.clone()),
                    );
                    opts.threads = Some(threads);
                    prepare(&opts, &|_| {}).unwrap();
                    std::fs::remove_dir_all(out).unwrap();
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, batch_assembly, prepare_throughput);
criterion_main!(benches);
