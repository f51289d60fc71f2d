//! CPU benchmarks of our differentiable ops against candle's own (the peer, measured in the same
//! run): forward + backward where both sides have a backward, forward only where candle's op has
//! none. Shapes are those of configs/tiny.toml (d 128, 4 heads, seq 256, micro-batch 16).
//!
//! Run: `cargo bench -p moelab-benches --bench ops`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn softmax(c: &mut Criterion) {
    let x = randn(&[16 * 4, 256, 256]);
    let mut g = c.benchmark_group("softmax_fwd 64x256x256");
    g.bench_function("moelab", |b| {
        b.iter(|| moelab_kernels::softmax_last_dim(&x).unwrap())
    });
    g.bench_function("moelab causal", |b| {
        b.iter(|| moelab_kernels::causal_softmax(&x).unwrap())
    });
    g.bench_function("candle", |b| {
        b.iter(|| candle_nn::ops::softmax_last_dim(&x).unwrap())
    });
    g.finish();
}

fn rms_norm(c: &mut Criterion) {
    let x = randn(&[16 * 256, 128]);
    let w = Tensor::ones(128, DType::F32, &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("rms_norm_fwd 4096x128");
    g.bench_function("moelab", |b| {
        b.iter(|| moelab_kernels::rms_norm(&x, &w, 1e-5).unwrap())
    });
    g.bench_function("candle", |b| {
        b.iter(|| candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap())
    });
    g.finish();
    let xv = Var::from_tensor(&x).unwrap();
    let wv = Var::from_tensor(&w).unwrap();
    c.bench_function("rms_norm_fwd_bwd 4096x128 moelab", |b| {
        b.iter(|| {
            moelab_kernels::rms_norm(&xv, &wv, 1e-5)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
}

fn cross_entropy(c: &mut Criterion) {
    let logits = Var::from_tensor(&randn(&[4096, 4096])).unwrap();
    let targets = Tensor::arange(0u32, 4096, &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("cross_entropy_fwd_bwd 4096x4096");
    g.bench_function("moelab", |b| {
        b.iter(|| {
            moelab_kernels::cross_entropy(&logits, &targets)
                .unwrap()
                .mean_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.bench_function("candle_nn::loss", |b| {
        b.iter(|| {
            candle_nn::loss::cross_entropy(&logits, &targets)
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.finish();
}

fn grouped_matmul(c: &mut Criterion) {
    // 4096 tokens x top-2 over 8 experts, d 128 -> ff 256.
    let sizes = [1100, 900, 1200, 1000, 1150, 950, 850, 1042];
    let n: usize = sizes.iter().sum();
    let x = Var::from_tensor(&randn(&[n, 128])).unwrap();
    let w = Var::from_tensor(&randn(&[8, 256, 128])).unwrap();
    let mut g = c.benchmark_group("expert_gemm_fwd_bwd 8192x128->256 over 8 experts");
    g.bench_function("moelab grouped_matmul", |b| {
        b.iter(|| {
            moelab_kernels::grouped_matmul(&x, &w, &sizes)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.bench_function("candle narrow+matmul per expert", |b| {
        b.iter(|| {
            let mut start = 0;
            let mut outs = Vec::new();
            for (e, &len) in sizes.iter().enumerate() {
                let xe = x.narrow(0, start, len).unwrap();
                outs.push(xe.matmul(&w.get(e).unwrap().t().unwrap()).unwrap());
                start += len;
            }
            Tensor::cat(&outs, 0)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.finish();
}

fn attention(c: &mut Criterion) {
    let q = Var::from_tensor(&randn(&[16, 4, 256, 32])).unwrap();
    let k = Var::from_tensor(&randn(&[16, 2, 256, 32])).unwrap();
    let v = Var::from_tensor(&randn(&[16, 2, 256, 32])).unwrap();
    c.bench_function("causal_attention_fwd_bwd b16 h4 kv2 t256 d32 moelab", |b| {
        b.iter(|| {
            moelab_kernels::causal_attention(&q, &k, &v, 0.17)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
}

/// flash_attention (tiled, no T x T scores) against causal_attention (materialised scores), at
/// tiny.toml's attention shape and at a longer sequence with a wider head.
fn flash_attention(c: &mut Criterion) {
    use moelab_kernels::flash_attention::flash_attention;
    type Attn = fn(&Tensor, &Tensor, &Tensor, f64) -> candle_core::Result<Tensor>;
    let peers: [(&str, Attn); 2] = [
        ("flash_attention", flash_attention),
        ("causal_attention", moelab_kernels::causal_attention),
    ];
    for (t, d) in [(128, 32), (512, 64)] {
        let q = Var::from_tensor(&randn(&[8, 4, t, d])).unwrap();
        let k = Var::from_tensor(&randn(&[8, 2, t, d])).unwrap();
        let v = Var::from_tensor(&randn(&[8, 2, t, d])).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let mut g = c.benchmark_group(format!("attention_fwd b8 h4 kv2 t{t} d{d}"));
        for (name, attn) in peers {
            g.bench_function(name, |b| b.iter(|| attn(&q, &k, &v, scale).unwrap()));
        }
        g.finish();
        let mut g = c.benchmark_group(format!("attention_fwd_bwd b8 h4 kv2 t{t} d{d}"));
        for (name, attn) in peers {
            g.bench_function(name, |b| {
                b.iter(|| {
                    attn(&q, &k, &v, scale)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap()
                })
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(3));
    targets = softmax, rms_norm, cross_entropy, grouped_matmul, attention, flash_attention
}
criterion_main!(benches);
