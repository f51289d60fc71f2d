//! RMSNorm over the last dimension with gradients for both the input and the weight.

use crate::cpu::{check_float, check_same_dtype, contiguous, float_dispatch, map_rows, Acc, Elem};
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

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
        if x.device().is_cpu() {
            // One pass over the rows: dx and the weight gradient together, no temporaries.
            let d = weight.elem_count();
            let both = x.contiguous()?.apply_op3_no_bwd(
                &weight.contiguous()?,
                &g.contiguous()?,
                &RmsNormBackward { eps: self.eps },
            )?;
            let dx = both.narrow(0, 0, x.elem_count())?.reshape(x.shape())?;
            let dweight = both.narrow(0, x.elem_count(), d)?;
            return Ok((Some(dx), Some(dweight)));
        }
        // Composed from candle ops on other devices; half types are promoted because the row and
        // column reductions below lose too much in bf16/f16.
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

/// Rows per block of the weight-gradient reduction: a fixed size, so the sum's order (and so
/// the result, bit for bit) does not depend on the thread count.
const BWD_BLOCK_ROWS: usize = 64;

/// The CPU backward: `(x, weight, grad)` -> one flat storage holding dx (x's shape, row-major)
/// then dweight (D). Per row, with `r = 1 / rms(x)`, `xhat = x r` and `dxhat = g w`:
/// `dx = r (dxhat - xhat mean(dxhat xhat))`; `dweight = sum over rows of g xhat`, summed per
/// block of rows in parallel, then over blocks in order.
struct RmsNormBackward {
    eps: f64,
}

impl RmsNormBackward {
    fn run<T: Elem>(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        (gs, gl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<T>(xs, xl, self.name(), "x")?;
        let w = contiguous::<T>(ws, wl, self.name(), "weight")?;
        let g = contiguous::<T>(gs, gl, self.name(), "grad")?;
        let d = w.len();
        if d == 0 || x.len() % d != 0 || g.len() != x.len() {
            bail!(
                "{}: x {:?}, weight {:?} and grad {:?} do not match",
                self.name(),
                xl.dims(),
                wl.dims(),
                gl.dims()
            );
        }
        let eps = <T::A as Acc>::from_f64(self.eps);
        let inv_d = <T::A as Acc>::ONE / <T::A as Acc>::from_usize(d);
        let w: Vec<T::A> = w.iter().map(|v| v.to_acc()).collect();
        let mut out = vec![T::from_f64(0.0); x.len() + d];
        let (dx, dweight_out) = out.split_at_mut(x.len());
        let block = BWD_BLOCK_ROWS * d;
        let block_sum = |(b, dx_block): (usize, &mut [T])| -> Vec<T::A> {
            let mut dweight = vec![<T::A as Acc>::ZERO; d];
            for (i, dx_row) in dx_block.chunks_mut(d).enumerate() {
                let at = b * block + i * d;
                let (xr, gr) = (&x[at..at + d], &g[at..at + d]);
                let mut ss = <T::A as Acc>::ZERO;
                for xv in xr {
                    let xv = xv.to_acc();
                    ss += xv * xv;
                }
                let r = <T::A as Acc>::ONE / (ss * inv_d + eps).sqrt();
                // mean(dxhat * xhat), each product formed as (g w)(x r) like the composed
                // version: g w x could overflow where (g w)(x r) does not.
                let mut dot = <T::A as Acc>::ZERO;
                for ((xv, gv), wv) in xr.iter().zip(gr).zip(&w) {
                    dot += (gv.to_acc() * *wv) * (xv.to_acc() * r);
                }
                let proj = dot * inv_d;
                for (((o, xv), gv), (wv, dw)) in dx_row
                    .iter_mut()
                    .zip(xr)
                    .zip(gr)
                    .zip(w.iter().zip(dweight.iter_mut()))
                {
                    let xhat = xv.to_acc() * r;
                    let gv = gv.to_acc();
                    *o = T::from_acc((gv * *wv - xhat * proj) * r);
                    *dw += gv * xhat;
                }
            }
            dweight
        };
        let partials: Vec<Vec<T::A>> = if x.len() > crate::cpu::PAR_THRESHOLD {
            dx.par_chunks_mut(block)
                .enumerate()
                .map(block_sum)
                .collect()
        } else {
            dx.chunks_mut(block).enumerate().map(block_sum).collect()
        };
        for (j, o) in dweight_out.iter_mut().enumerate() {
            let mut sum = <T::A as Acc>::ZERO;
            for partial in &partials {
                sum += partial[j];
            }
            *o = T::from_acc(sum);
        }
        Ok((T::to_cpu_storage_owned(out), Shape::from(x.len() + d)))
    }
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "moelab-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(crate::cpu::storage_dtype(s1), self.name(), T => self.run::<T>((s1, l1), (s2, l2), (s3, l3)))
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

    #[test]
    fn fused_backward_matches_the_composed_gradient() {
        // 300 rows: several reduction blocks and the parallel path; bf16 through the f32 path.
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4), (DType::BF16, 5e-2)] {
            for shape in [(2, 3, 8), (3, 100, 128)] {
                let x = Var::from_tensor(&rand(11, shape, 2.0, dtype)).unwrap();
                let w = Var::from_tensor(&rand(12, shape.2, 1.5, dtype)).unwrap();
                let probe = rand(13, shape, 1.0, dtype);
                let grads = |fused: bool| {
                    let y = if fused {
                        rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap()
                    } else {
                        let work = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                        reference(&work(x.as_tensor()), &work(w.as_tensor()), 1e-5)
                    };
                    let loss = (y.to_dtype(DType::F64).unwrap() * probe.to_dtype(DType::F64))
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    let g = loss.backward().unwrap();
                    let get = |v: &Var| g.get(v).unwrap().to_dtype(DType::F64).unwrap();
                    (get(&x), get(&w))
                };
                let ((dx, dw), (rx, rw)) = (grads(true), grads(false));
                let scale = |t: &Tensor| {
                    t.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let ex = max_abs_diff(&dx, &rx) / scale(&rx);
                let ew = max_abs_diff(&dw, &rw) / scale(&rw);
                assert!(
                    ex < tol && ew < tol,
                    "{dtype:?} {shape:?}: dx {ex}, dweight {ew}"
                );
            }
        }
    }
}
