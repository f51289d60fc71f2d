//! CPU benchmarks of our differentiable ops against candle's own (the peer, measured in the same
//! run): forward + backward where both sides have a backward, forward only where candle's op has
//! none. Shapes are those of configs/tiny.toml (d 128, 4 heads, seq 256, micro-batch 16).
//!
//! Run: `cargo bench -p moelab-benches --bench ops`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, Criterion};

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

fn matmul(c: &mut Criterion) {
    // The tiny step's dense matmuls: the LM head forward (1024 x 128 -> 4096), its input
    // gradient (1024 x 4096 -> 128) and an attention projection (1024 x 128 -> 128), through
    // candle's matmul against a direct call of the gemm crate on the same buffers and threads.
    let threads = candle_core::utils::get_num_threads();
    for (m, k, n) in [(1024, 128, 4096), (1024, 4096, 128), (1024, 128, 128)] {
        let a = randn(&[m, k]);
        let w = randn(&[n, k]); // nn.Linear layout: y = a w^T
        let mut g = c.benchmark_group(format!("matmul {m}x{k} @ ({n}x{k})^T"));
        g.bench_function("candle matmul", |b| {
            b.iter(|| a.matmul(&w.t().unwrap()).unwrap())
        });
        let (av, wv) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let mut dst = vec![0f32; m * n];
        g.bench_function(format!("gemm crate, {threads} threads"), |b| {
            b.iter(|| {
                // SAFETY: every pointer covers its matrix at the strides given.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        av.as_ptr(),
                        1,
                        k as isize,
                        wv.as_ptr(),
                        k as isize,
                        1,
                        0f32,
                        1f32,
                        false,
                        false,
                        false,
                        if threads > 1 {
                            gemm::Parallelism::Rayon(threads)
                        } else {
                            gemm::Parallelism::None
                        },
                    )
                }
            })
        });
        g.finish();
    }
}

fn fused_elementwise(c: &mut Criterion) {
    // The tiny step's expert activations: 2048 rows (1024 tokens x top-2) x 256.
    let gate = Var::from_tensor(&randn(&[2048, 256])).unwrap();
    let up = Var::from_tensor(&randn(&[2048, 256])).unwrap();
    let mut g = c.benchmark_group("swiglu_fwd_bwd 2048x256");
    g.bench_function("moelab swiglu", |b| {
        b.iter(|| {
            moelab_kernels::swiglu(&gate, &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.bench_function("candle silu * up", |b| {
        b.iter(|| {
            (gate.silu().unwrap() * up.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.finish();

    // AdamW on the tiny model's largest tensor (the 4096 x 128 embedding), in place against the
    // composed tensor expression.
    let n = 4096 * 128;
    let (p, m, v) = (
        randn(&[n]),
        randn(&[n]).abs().unwrap(),
        randn(&[n]).abs().unwrap(),
    );
    let grad = randn(&[n]);
    let update = moelab_kernels::AdamWUpdate {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        decay: 1e-4,
        correction1: 0.5,
        correction2: 0.5,
        grad_scale: 1.0,
    };
    let mut g = c.benchmark_group("adamw 524288 params");
    g.bench_function("moelab adamw_update (in place)", |b| {
        b.iter(|| moelab_kernels::adamw_update(&p, &m, &v, &grad, &update).unwrap())
    });
    g.bench_function("composed tensor ops", |b| {
        b.iter(|| {
            let m2 = ((&m * 0.9).unwrap() + (&grad * 0.1).unwrap()).unwrap();
            let v2 = ((&v * 0.95).unwrap() + (grad.sqr().unwrap() * 0.05).unwrap()).unwrap();
            let step = ((&m2 / 0.5).unwrap()
                / ((&v2 / 0.5).unwrap().sqrt().unwrap() + 1e-8).unwrap())
            .unwrap();
            ((&p * (1.0 - 1e-4)).unwrap() - (step * 1e-3).unwrap()).unwrap()
        })
    });
    g.finish();

    // Un-permute with the gate-weighted combine: 2048 expert rows back onto 1024 tokens.
    let tokens: Vec<u32> = (0..2048u32).map(|r| (r * 7919) % 1024).collect();
    let routing = moelab_kernels::moe_dispatch::Routing::new(tokens.clone(), 1024).unwrap();
    let index = Tensor::from_vec(tokens, 2048, &Device::Cpu).unwrap();
    let rows = Var::from_tensor(&randn(&[2048, 128])).unwrap();
    let gates = Var::from_tensor(&randn(&[2048])).unwrap();
    let mut g = c.benchmark_group("moe_unpermute_fwd_bwd 2048x128 -> 1024");
    g.bench_function("moelab unpermute", |b| {
        b.iter(|| {
            moelab_kernels::moe_dispatch::unpermute(&rows, &gates, &routing)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.bench_function("candle broadcast_mul + index_add", |b| {
        b.iter(|| {
            let weighted = rows.broadcast_mul(&gates.unsqueeze(1).unwrap()).unwrap();
            Tensor::zeros((1024, 128), DType::F32, &Device::Cpu)
                .unwrap()
                .index_add(&index, &weighted, 0)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(3));
    targets = softmax, rms_norm, cross_entropy, grouped_matmul, attention, flash_attention, matmul,
        fused_elementwise
}
/// criterion's main, after the CPU settings `moelab` itself starts with.
fn main() {
    moelab_kernels::tune_cpu_runtime();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
