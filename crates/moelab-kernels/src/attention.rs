//! Causal (grouped-query) self-attention built from differentiable pieces.

use crate::softmax::causal_softmax;
use candle_core::{bail, Result, Tensor};

/// Causal attention: `q (B, H, T, D)`, `k`/`v (B, KV, T, D)` with `H % KV == 0`, each kv head
/// serving `H/KV` consecutive query heads; returns `(B, H, T, D)`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, kv, t, d) = check_inputs("causal_attention", q, k, v)?;
    let rep = h / kv;
    // Broadcast-then-reshape keeps autograd: the broadcast's backward sums the head copies.
    let expand = |x: &Tensor| -> Result<Tensor> {
        if rep == 1 {
            return Ok(x.clone());
        }
        x.unsqueeze(2)?
            .broadcast_as((b, kv, rep, t, d))?
            .reshape((b, h, t, d))
    };
    let (k, v) = (expand(k)?, expand(v)?);
    // Scaling q (T x D) instead of the scores (T x T) saves two passes over the largest tensor.
    let scores = (q * scale)?.contiguous()?.matmul(&k.t()?)?;
    causal_softmax(&scores)?.matmul(&v)
}

/// The shape and dtype checks every causal attention op makes, with errors naming `op`:
/// q (B, H, T, D), k and v (B, KV, T, D), H a multiple of KV, one dtype; returns (B, H, KV, T, D).
pub(crate) fn check_inputs(
    op: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(usize, usize, usize, usize, usize)> {
    let Ok((b, h, t, d)) = q.dims4() else {
        bail!("{op}: q must be (B, H, T, D), got shape {:?}", q.dims());
    };
    let Ok((kb, kv, tk, kd)) = k.dims4() else {
        bail!("{op}: k must be (B, KV, T, D), got shape {:?}", k.dims());
    };
    if v.dims() != k.dims() {
        bail!(
            "{op}: v shape {:?} differs from k shape {:?}",
            v.dims(),
            k.dims()
        );
    }
    if kb != b || kd != d || tk != t {
        bail!(
            "{op}: k/v {:?} do not match q {:?} in B, T or D",
            k.dims(),
            q.dims()
        );
    }
    if kv == 0 || h % kv != 0 {
        bail!("{op}: {h} query heads are not a multiple of {kv} kv heads");
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!(
            "{op}: dtypes differ (q {:?}, k {:?}, v {:?})",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    Ok((b, h, kv, t, d))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::gradcheck::check_gradients;
    use crate::test_util::{max_abs_diff, rand, to_f64_vec};
    use candle_core::{DType, Device, Var};

    /// Plain loops, f64.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let kv = k.dim(1).unwrap();
        let (q, k, v) = (to_f64_vec(q), to_f64_vec(k), to_f64_vec(v));
        let mut out = vec![0.0; b * h * t * d];
        for bi in 0..b {
            for hi in 0..h {
                let ki = hi / (h / kv);
                let qo = (bi * h + hi) * t * d;
                let ko = (bi * kv + ki) * t * d;
                for i in 0..t {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..d)
                                .map(|c| q[qo + i * d + c] * k[ko + j * d + c])
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (j, sj) in s.iter().enumerate() {
                        let p = (sj - m).exp() / z;
                        for c in 0..d {
                            out[qo + i * d + c] += p * v[ko + j * d + c];
                        }
                    }
                }
            }
        }
        Tensor::from_vec(out, (b, h, t, d), &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_matches_reference() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            for (h, kv) in [(4, 2), (4, 4), (4, 1)] {
                let q = rand(1, (2, h, 5, 8), 1.0, dtype);
                let k = rand(2, (2, kv, 5, 8), 1.0, dtype);
                let v = rand(3, (2, kv, 5, 8), 1.0, dtype);
                let scale = 1.0 / 8f64.sqrt();
                let d = max_abs_diff(
                    &causal_attention(&q, &k, &v, scale).unwrap(),
                    &reference(&q, &k, &v, scale),
                );
                assert!(d < tol, "{dtype:?} H={h} KV={kv}: {d}");
            }
        }
    }

    #[test]
    fn rejects_bad_head_counts() {
        let q = rand(1, (1, 4, 3, 2), 1.0, DType::F32);
        let k = rand(2, (1, 3, 3, 2), 1.0, DType::F32);
        assert!(causal_attention(&q, &k, &k, 1.0).is_err());
    }

    #[test]
    fn gradcheck_gqa() {
        let q = Var::from_tensor(&rand(4, (1, 4, 4, 3), 1.0, DType::F64)).unwrap();
        let k = Var::from_tensor(&rand(5, (1, 2, 4, 3), 1.0, DType::F64)).unwrap();
        let v = Var::from_tensor(&rand(6, (1, 2, 4, 3), 1.0, DType::F64)).unwrap();
        let r = rand(7, (1, 4, 4, 3), 1.0, DType::F64);
        let rep = check_gradients(
            &|t| {
                causal_attention(&t[0], &t[1], &t[2], 0.5)?
                    .mul(&r)?
                    .sum_all()
            },
            &[q, k, v],
            1e-6,
            100,
        )
        .unwrap();
        println!("causal_attention: {rep:?}");
        assert_eq!(rep.checked, 48 + 24 + 24);
        assert!(rep.max_rel_err < 1e-5, "{rep:?}");
    }
}
