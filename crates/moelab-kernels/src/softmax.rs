//! Softmax over the last dimension, plain and causal-masked, with a fused backward.

use crate::cpu::{
    check_float, contiguous, exp_sum, float_dispatch, map_rows, row_max, vectorized, Acc, Elem,
};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Softmax over the last dim, any rank. bwd: dx = y * (g - sum(g*y, last, keepdim)).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    check_float("softmax_last_dim", "x", x)?;
    if x.rank() == 0 {
        bail!("softmax_last_dim: x must have at least one dimension");
    }
    x.contiguous()?.apply_op1(Softmax { causal: false })
}

/// Causal softmax over attention scores `(..., T_q, T_k)` with `T_q <= T_k`: query `i` (among
/// the last `T_q` positions) sees keys `0..=i + T_k - T_q`; masked entries are exactly 0.
pub fn causal_softmax(x: &Tensor) -> Result<Tensor> {
    check_float("causal_softmax", "x", x)?;
    if x.rank() < 2 {
        bail!(
            "causal_softmax: x must be (..., T_q, T_k), got shape {:?}",
            x.dims()
        );
    }
    let (t_q, t_k) = (x.dim(x.rank() - 2)?, x.dim(x.rank() - 1)?);
    if t_q > t_k {
        bail!("causal_softmax: T_q ({t_q}) must be <= T_k ({t_k})");
    }
    x.contiguous()?.apply_op1(Softmax { causal: true })
}

/// Number of leading keys row `row` may attend to.
fn visible_len(causal: bool, row: usize, t_q: usize, t_k: usize) -> usize {
    if causal {
        row % t_q + (t_k - t_q) + 1
    } else {
        t_k
    }
}

struct Softmax {
    causal: bool,
}

impl Softmax {
    fn fwd<T: Elem>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<T>(s, l, self.name(), "x")?;
        let dims = l.dims();
        let t_k = dims.last().copied().unwrap_or(1);
        let t_q = if self.causal && dims.len() >= 2 {
            dims[dims.len() - 2]
        } else {
            1
        };
        if self.causal && t_q > t_k {
            bail!("{}: T_q ({t_q}) must be <= T_k ({t_k})", self.name());
        }
        let mut y = vec![T::from_f64(0.0); x.len()];
        map_rows(&mut y, t_k, x.len(), |row, out| {
            let n = visible_len(self.causal, row, t_q, t_k);
            // Masked tail stays at the zero it was initialised with.
            let (out, xr) = (&mut out[..n], &x[row * t_k..row * t_k + n]);
            vectorized(
                #[inline(always)]
                || {
                    let max = row_max(xr);
                    let inv = <T::A as Acc>::ONE / exp_sum(xr, max, Some(&mut *out));
                    for o in out.iter_mut() {
                        *o = T::from_acc(o.to_acc() * inv);
                    }
                },
            )
        });
        Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        if self.causal {
            "moelab-causal-softmax"
        } else {
            "moelab-softmax"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(crate::cpu::storage_dtype(s), self.name(), T => self.fwd::<T>(s, l))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rows::softmax_fwd(self.name(), self.causal, s, l)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // Masked entries have y = 0, so the same formula serves the causal variant.
        let dx = y
            .contiguous()?
            .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBackward)?;
        Ok(Some(dx))
    }
}

/// dx = y * (g - <g, y>) per last-dim row.
struct SoftmaxBackward;

impl SoftmaxBackward {
    fn run<T: Elem>(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous::<T>(ys, yl, self.name(), "y")?;
        let g = contiguous::<T>(gs, gl, self.name(), "grad")?;
        if yl.dims() != gl.dims() {
            bail!(
                "{}: grad shape {:?} differs from output shape {:?}",
                self.name(),
                gl.dims(),
                yl.dims()
            );
        }
        let n = yl.dims().last().copied().unwrap_or(1);
        let mut dx = vec![T::from_f64(0.0); y.len()];
        map_rows(&mut dx, n, 2 * y.len(), |row, out| {
            let (yr, gr) = (&y[row * n..(row + 1) * n], &g[row * n..(row + 1) * n]);
            let mut dot = <T::A as Acc>::ZERO;
            for (a, b) in yr.iter().zip(gr) {
                dot += a.to_acc() * b.to_acc();
            }
            for ((o, a), b) in out.iter_mut().zip(yr).zip(gr) {
                *o = T::from_acc(a.to_acc() * (b.to_acc() - dot));
            }
        });
        Ok((T::to_cpu_storage_owned(dx), yl.shape().clone()))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "moelab-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(crate::cpu::storage_dtype(s1), self.name(), T => self.run::<T>(s1, l1, s2, l2))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rows::softmax_bwd(self.name(), s1, l1, s2, l2)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::gradcheck::check_gradients;
    use crate::test_util::{max_abs_diff, rand, to_f64_vec};
    use candle_core::{DType, Var, D};

    fn reference(x: &Tensor) -> Tensor {
        let max = x.max_keepdim(D::Minus1).unwrap();
        let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
    }

    /// Plain-loop causal softmax in f64 over a (rows*T_q, T_k) view.
    fn causal_reference(x: &[f64], t_q: usize, t_k: usize) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for row in 0..x.len() / t_k {
            let n = row % t_q + t_k - t_q + 1;
            let xr = &x[row * t_k..row * t_k + n];
            let m = xr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = xr.iter().map(|v| (v - m).exp()).sum();
            for j in 0..n {
                y[row * t_k + j] = (xr[j] - m).exp() / s;
            }
        }
        y
    }

    #[test]
    fn forward_matches_reference() {
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::F64, 1e-14)] {
            let x = rand(1, (3, 4, 7), 4.0, dtype);
            let d = max_abs_diff(&softmax_last_dim(&x).unwrap(), &reference(&x));
            assert!(d < tol, "{dtype:?}: {d}");
            // Large enough to take the rayon path.
            let x = rand(2, (300, 257), 4.0, dtype);
            let d = max_abs_diff(&softmax_last_dim(&x).unwrap(), &reference(&x));
            assert!(d < tol, "{dtype:?} parallel: {d}");
        }
    }

    #[test]
    fn large_grad_matches_reference_autograd() {
        // Big enough for the parallel backward path.
        let x = Var::from_tensor(&rand(11, (300, 257), 4.0, DType::F32)).unwrap();
        let r = rand(12, (300, 257), 1.0, DType::F32);
        let loss = |y: Tensor| y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = loss(softmax_last_dim(x.as_tensor()).unwrap());
        let g2 = loss(reference(x.as_tensor()));
        let d = max_abs_diff(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn non_contiguous_input() {
        let x = rand(3, (9, 5), 3.0, DType::F32).t().unwrap();
        assert!(!x.is_contiguous());
        let d = max_abs_diff(&softmax_last_dim(&x).unwrap(), &reference(&x));
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn half_precision_runs() {
        for dtype in [DType::BF16, DType::F16] {
            let x = rand(4, (2, 6), 2.0, dtype);
            let d = max_abs_diff(&softmax_last_dim(&x).unwrap(), &reference(&x));
            assert!(d < 1e-2, "{dtype:?}: {d}");
        }
    }

    #[test]
    fn causal_masks_and_normalises() {
        for (t_q, t_k) in [(5, 5), (3, 6)] {
            for dtype in [DType::F32, DType::F64] {
                let x = rand(5, (2, 2, t_q, t_k), 3.0, dtype);
                let y = to_f64_vec(&causal_softmax(&x).unwrap());
                let want = causal_reference(&to_f64_vec(&x), t_q, t_k);
                for row in 0..y.len() / t_k {
                    let i = row % t_q;
                    let r = &y[row * t_k..(row + 1) * t_k];
                    for (j, v) in r.iter().enumerate() {
                        if j > i + t_k - t_q {
                            assert_eq!(*v, 0.0, "masked entry ({i},{j}) not zero");
                        }
                    }
                    let s: f64 = r.iter().sum();
                    assert!((s - 1.0).abs() < 1e-6, "row sum {s}");
                }
                let d = y
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(d < 1e-6, "{dtype:?} ({t_q},{t_k}): {d}");
            }
        }
    }

    #[test]
    fn causal_rejects_tq_greater_than_tk() {
        let x = rand(6, (4, 3), 1.0, DType::F32);
        assert!(causal_softmax(&x).is_err());
    }

    #[test]
    fn gradcheck_softmax() {
        let x = Var::from_tensor(&rand(7, (2, 3, 6), 2.0, DType::F64)).unwrap();
        let r = rand(8, (2, 3, 6), 1.0, DType::F64);
        let rep = check_gradients(
            &|t| softmax_last_dim(&t[0])?.mul(&r)?.sum_all(),
            &[x],
            1e-6,
            100,
        )
        .unwrap();
        println!("softmax_last_dim: {rep:?}");
        assert!(rep.max_rel_err < 1e-5, "{rep:?}");
    }

    #[test]
    fn gradcheck_causal_softmax() {
        for (t_q, t_k) in [(4, 4), (3, 5)] {
            let x = Var::from_tensor(&rand(9, (2, 2, t_q, t_k), 2.0, DType::F64)).unwrap();
            let r = rand(10, (2, 2, t_q, t_k), 1.0, DType::F64);
            let rep = check_gradients(
                &|t| causal_softmax(&t[0])?.mul(&r)?.sum_all(),
                &[x],
                1e-6,
                200,
            )
            .unwrap();
            println!("causal_softmax ({t_q},{t_k}): {rep:?}");
            assert!(rep.max_rel_err < 1e-5, "{rep:?}");
        }
    }
}
