//! The training step's hot paths on CPU: forward + backward of one micro-batch of the tiny
//! config, and the router-activation logging added to it (its overhead is the ratio of the two).
//!
//! Run: `cargo bench -p moelab-benches --bench step`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, Criterion};
use moelab_model::{ForwardOptions, ModelConfig, MoeTransformer};
use moelab_train::loss::LossWeights;
use moelab_train::router_logger::RouterLogger;

fn tiny() -> ModelConfig {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tiny.toml"))
            .unwrap();
    let table: toml::Table = text.parse().unwrap();
    table["model"].clone().try_into().unwrap()
}

fn step(c: &mut Criterion) {
    let cfg = tiny();
    let (batch, seq) = (8, 128);
    let (model, _) = MoeTransformer::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (i * 7919 % cfg.vocab_size) as u32)
        .collect();
    let tokens = Tensor::from_vec(ids.clone(), (batch, seq), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(
        ids.iter()
            .map(|t| (t + 1) % cfg.vocab_size as u32)
            .collect::<Vec<_>>(),
        (batch, seq),
        &Device::Cpu,
    )
    .unwrap();
    let layers: Vec<usize> = (0..cfg.n_layers).filter(|&l| cfg.is_moe_layer(l)).collect();
    let domains: Vec<String> = (0..5).map(|d| format!("d{d}")).collect();
    let domain_ids: Vec<u32> = (0..batch as u32).map(|s| s % 5).collect();

    c.bench_function("tiny micro-batch 8x128 forward+backward", |b| {
        b.iter(|| {
            let out = model
                .forward(&tokens, Some(&targets), ForwardOptions::default())
                .unwrap();
            moelab_train::loss::objective(&out, LossWeights::new(&cfg.moe), None)
                .unwrap()
                .loss
                .backward()
                .unwrap()
        })
    });
    let out = model
        .forward(&tokens, Some(&targets), ForwardOptions::default())
        .unwrap();
    let mut log = RouterLogger::new(
        layers,
        domains,
        cfg.moe.n_experts,
        cfg.moe.top_k,
        &Device::Cpu,
    )
    .unwrap();
    c.bench_function("tiny micro-batch 8x128 router-log record", |b| {
        b.iter(|| log.record(1, &out.routing, &domain_ids, seq).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(5));
    targets = step
}
/// criterion's main, after the CPU settings `moelab` itself starts with.
fn main() {
    moelab_kernels::tune_cpu_runtime();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
