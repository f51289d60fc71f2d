//! RMSNorm over the last dimension with gradients for both the input and the weight.

use crate::cpu::{check_float, check_same_dtype, contiguous, float_dispatch, map_rows, Acc, Elem};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// RMSNorm over the last dim: `y = x / sqrt(mean(x^2) + eps) * weight`, weight shape `(D,)`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_float("rms_norm", "x", x)?;
    check_same_dtype("rms_norm", "weight", weight, x)?;
    let Some(&d) = x.dims().last() else {
        bail!("rms_norm: x must have at least one dimension");
    };
    if weight.dims() != [d] {
        bail!(
            "rms_norm: weight must have shape ({d},) to match x {:?}, got {:?}",
            x.dims(),
            weight.dims()
        );
    }
    if eps.is_nan() || eps < 0.0 {
        bail!("rms_norm: eps must be >= 0, got {eps}");
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

impl RmsNorm {
    fn fwd<T: Elem>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<T>(xs, xl, self.name(), "x")?;
        let w = contiguous::<T>(ws, wl, self.name(), "weight")?;
        let d = w.len();
        if xl.dims().last() != Some(&d) {
            bail!(
                "{}: weight length {d} does not match x shape {:?}",
                self.name(),
                xl.dims()
            );
        }
        let eps = <T::A as Acc>::from_f64(self.eps);
        let inv_d = <T::A as Acc>::ONE / <T::A as Acc>::from_usize(d);
        let mut y = vec![T::from_f64(0.0); x.len()];
        map_rows(&mut y, d, x.len(), |row, out| {
            let xr = &x[row * d..(row + 1) * d];
            let mut ss = <T::A as Acc>::ZERO;
            for v in xr {
                let v = v.to_acc();
                ss += v * v;
            }
            let r = <T::A as Acc>::ONE / (ss * inv_d + eps).sqrt();
            for ((o, v), wv) in out.iter_mut().zip(xr).zip(w) {
                *o = T::from_acc(v.to_acc() * r * wv.to_acc());
            }
        });
        Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "moelab-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(crate::cpu::storage_dtype(s1), self.name(), T => self.fwd::<T>(s1, l1, s2, l2))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rows::rms_norm_fwd(self.name(), self.eps, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Composed from candle ops so it runs on any device; half types are promoted because
        // the row and column reductions below lose too much in bf16/f16.
        let dtype = x.dtype();
        let work = match dtype {
            DType::BF16 | DType::F16 => DType::F32,
            dt => dt,
        };
        let (x, w, g) = (x.to_dtype(work)?, weight.to_dtype(work)?, g.to_dtype(work)?);
        let d = w.elem_count();
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = x.broadcast_mul(&r)?;
        let dweight = (&g * &xhat)?.reshape(((), d))?.sum(0)?;
        let dxhat = g.broadcast_mul(&w)?;
        let proj = (&dxhat * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = (dxhat - xhat.broadcast_mul(&proj)?)?.broadcast_mul(&r)?;
        Ok((Some(dx.to_dtype(dtype)?), Some(dweight.to_dtype(dtype)?)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::gradcheck::check_gradients;
    use crate::test_util::{max_abs_diff, rand};
    use candle_core::Var;

    fn reference(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap();
        x.broadcast_div(&r).unwrap().broadcast_mul(w).unwrap()
    }

    #[test]
    fn forward_matches_reference() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-13)] {
            for shape in [(2, 3, 8), (40, 30, 64)] {
                let x = rand(1, shape, 2.0, dtype);
                let w = rand(2, shape.2, 1.5, dtype);
                let d = max_abs_diff(&rms_norm(&x, &w, 1e-5).unwrap(), &reference(&x, &w, 1e-5));
                assert!(d < tol, "{dtype:?} {shape:?}: {d}");
            }
        }
    }

    #[test]
    fn non_contiguous_input() {
        let x = rand(3, (16, 6), 2.0, DType::F32).t().unwrap();
        assert!(!x.is_contiguous());
        let w = rand(4, 16, 1.0, DType::F32);
        let d = max_abs_diff(&rms_norm(&x, &w, 1e-6).unwrap(), &reference(&x, &w, 1e-6));
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn rejects_bad_weight() {
        let x = rand(5, (2, 8), 1.0, DType::F32);
        assert!(rms_norm(&x, &rand(6, 7, 1.0, DType::F32), 1e-5).is_err());
        assert!(rms_norm(&x, &rand(6, 8, 1.0, DType::F64), 1e-5).is_err());
    }

    #[test]
    fn gradcheck_x_and_weight() {
        let x = Var::from_tensor(&rand(7, (2, 3, 8), 2.0, DType::F64)).unwrap();
        let w = Var::from_tensor(&rand(8, 8, 1.5, DType::F64)).unwrap();
        let r = rand(9, (2, 3, 8), 1.0, DType::F64);
        let rep = check_gradients(
            &|t| rms_norm(&t[0], &t[1], 1e-5)?.mul(&r)?.sum_all(),
            &[x, w],
            1e-6,
            100,
        )
        .unwrap();
        println!("rms_norm: {rep:?}");
        assert_eq!(rep.checked, 48 + 8);
        assert!(rep.max_rel_err < 1e-5, "{rep:?}");
    }
}
