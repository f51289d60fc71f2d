//! Fused per-row cross-entropy (log-softmax + target pick) with a fused backward.

use crate::cpu::{
    check_float, contiguous, exp_sum, float_dispatch, map_rows, row_max, vectorized, Acc, Elem,
};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Per-row cross-entropy: `logits (N, V)`, `targets (N,)` u32 -> `(N,)` loss
/// `logsumexp(row) - row[target]` in the logits' dtype (computed in f32 or f64 whatever the
/// dtype). An out-of-range target is an error on CPU; on CUDA, where checking would cost a
/// device-to-host sync every step, it makes that row's loss and gradient NaN instead.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_float("cross_entropy", "logits", logits)?;
    let (n, v) = match logits.dims2() {
        Ok(dims) => dims,
        Err(_) => bail!(
            "cross_entropy: logits must be (N, V), got shape {:?}",
            logits.dims()
        ),
    };
    if targets.dtype() != DType::U32 {
        bail!(
            "cross_entropy: targets must be u32, got {:?}",
            targets.dtype()
        );
    }
    if targets.dims() != [n] {
        bail!(
            "cross_entropy: targets must have shape ({n},) to match logits {:?}, got {:?}",
            logits.dims(),
            targets.dims()
        );
    }
    if v == 0 && n > 0 {
        bail!("cross_entropy: logits have zero classes");
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)
}

/// Errors naming the first row whose target is not a valid class index.
pub(crate) fn check_targets(op: &str, targets: &[u32], v: usize) -> Result<()> {
    if let Some((row, t)) = targets.iter().enumerate().find(|(_, &t)| t as usize >= v) {
        bail!("{op}: target {t} at row {row} is out of range for {v} classes");
    }
    Ok(())
}

/// Row max and sum of exp(x - max), the stable pieces of logsumexp.
#[inline(always)]
pub(crate) fn max_and_sum<T: Elem>(row: &[T]) -> (T::A, T::A) {
    let max = row_max(row);
    (max, exp_sum(row, max, None))
}

/// `(N, V)` dims of a logits layout.
fn logits_dims(op: &str, l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        [n, v] => Ok((*n, *v)),
        dims => bail!("{op}: logits must be (N, V), got {dims:?}"),
    }
}

struct CrossEntropy;

impl CrossEntropy {
    fn fwd<T: Elem>(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous::<T>(ls, ll, self.name(), "logits")?;
        let targets = contiguous::<u32>(ts, tl, self.name(), "targets")?;
        let (n, v) = logits_dims(self.name(), ll)?;
        if targets.len() != n {
            bail!("{}: {} targets for {n} rows", self.name(), targets.len());
        }
        check_targets(self.name(), targets, v)?;
        let mut loss = vec![T::from_f64(0.0); n];
        map_rows(&mut loss, 1, logits.len(), |row, out| {
            let xr = &logits[row * v..(row + 1) * v];
            let (max, sum) = vectorized(
                #[inline(always)]
                || max_and_sum(xr),
            );
            let target = xr[targets[row] as usize].to_acc();
            out[0] = T::from_acc(max + sum.ln() - target);
        });
        Ok((T::to_cpu_storage_owned(loss), Shape::from(n)))
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "moelab-cross-entropy"
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
        crate::cuda::rows::cross_entropy_fwd(self.name(), s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        loss: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // On the CPU in f32/f64 the forward's loss gives each row's logsumexp back
        // (loss + logits[target]), which saves the backward a pass over the row and an exp per
        // logit; in half precision the rounded loss is too coarse for that and the row's
        // logsumexp is recomputed (as on CUDA).
        let saved_loss =
            logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64);
        let third = if saved_loss {
            Tensor::stack(&[g, loss], 0)?
        } else {
            g.clone()
        };
        let dlogits = logits.contiguous()?.apply_op3_no_bwd(
            &targets.contiguous()?,
            &third.contiguous()?,
            &CrossEntropyBackward { saved_loss },
        )?;
        Ok((Some(dlogits), None))
    }
}

/// dlogits = (softmax(row) - onehot(target)) * g[row]. Inputs `(logits, targets, g)`, or with
/// `saved_loss` `(logits, targets, [g; loss])` stacked as (2, N).
struct CrossEntropyBackward {
    saved_loss: bool,
}

impl CrossEntropyBackward {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Elem>(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous::<T>(ls, ll, self.name(), "logits")?;
        let targets = contiguous::<u32>(ts, tl, self.name(), "targets")?;
        let grad_and_loss = contiguous::<T>(gs, gl, self.name(), "grad")?;
        let (n, v) = logits_dims(self.name(), ll)?;
        let (g, loss) = if self.saved_loss {
            grad_and_loss.split_at(grad_and_loss.len() / 2)
        } else {
            (grad_and_loss, &[][..])
        };
        if targets.len() != n || g.len() != n || (self.saved_loss && loss.len() != n) {
            bail!(
                "{}: {} targets and {} grads for {n} rows",
                self.name(),
                targets.len(),
                g.len()
            );
        }
        check_targets(self.name(), targets, v)?;
        let mut dx = vec![T::from_f64(0.0); logits.len()];
        map_rows(&mut dx, v, 2 * logits.len(), |row, out| {
            vectorized(
                #[inline(always)]
                || self.row::<T>(row, out, &logits[row * v..(row + 1) * v], targets, g, loss),
            )
        });
        Ok((T::to_cpu_storage_owned(dx), ll.shape().clone()))
    }

    /// One row of dlogits.
    #[inline(always)]
    fn row<T: Elem>(
        &self,
        row: usize,
        out: &mut [T],
        xr: &[T],
        targets: &[u32],
        g: &[T],
        loss: &[T],
    ) {
        {
            let t = targets[row] as usize;
            let gr = g[row].to_acc();
            // exp(x - shift) * scale = softmax(x) * g for either pair.
            let (shift, scale) = if self.saved_loss {
                (loss[row].to_acc() + xr[t].to_acc(), gr)
            } else {
                let (max, sum) = max_and_sum(xr);
                (max, gr / sum)
            };
            for (o, x) in out.iter_mut().zip(xr) {
                *o = T::from_acc((x.to_acc() - shift).exp() * scale);
            }
            out[t] = T::from_acc(out[t].to_acc() - gr);
        }
    }
}

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "moelab-cross-entropy-backward"
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
        float_dispatch!(crate::cpu::storage_dtype(s1), self.name(), T => self.run::<T>(s1, l1, s2, l2, s3, l3))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rows::cross_entropy_bwd(self.name(), s1, l1, s2, l2, s3, l3)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::gradcheck::check_gradients;
    use crate::test_util::{max_abs_diff, rand, uniform_vec};
    use candle_core::{Device, Var, D};

    fn targets(seed: u64, n: usize, v: usize) -> Tensor {
        let t: Vec<u32> = uniform_vec(seed, n)
            .iter()
            .map(|u| (((u + 1.0) / 2.0 * v as f64) as u32).min(v as u32 - 1))
            .collect();
        Tensor::from_vec(t, n, &Device::Cpu).unwrap()
    }

    fn reference(logits: &Tensor, targets: &Tensor) -> Tensor {
        let max = logits.max_keepdim(D::Minus1).unwrap();
        let shifted = logits.broadcast_sub(&max).unwrap();
        let lse = shifted
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        let log_softmax = shifted.broadcast_sub(&lse).unwrap();
        log_softmax
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap()
    }

    #[test]
    fn forward_matches_reference() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            for (n, v) in [(7, 11), (100, 1000)] {
                // Large logits exercise the max subtraction.
                let logits = rand(1, (n, v), 30.0, dtype);
                let t = targets(2, n, v);
                let d = max_abs_diff(
                    &cross_entropy(&logits, &t).unwrap(),
                    &reference(&logits, &t),
                );
                assert!(d < tol, "{dtype:?} ({n},{v}): {d}");
            }
        }
    }

    #[test]
    fn large_grad_matches_reference_autograd() {
        // Big enough for the parallel backward path.
        let x = Var::from_tensor(&rand(11, (100, 1000), 5.0, DType::F32)).unwrap();
        let t = targets(12, 100, 1000);
        let r = rand(13, 100, 1.0, DType::F32);
        let loss = |y: Tensor| y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = loss(cross_entropy(x.as_tensor(), &t).unwrap());
        let g2 = loss(reference(x.as_tensor(), &t));
        let d = max_abs_diff(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn out_of_range_target_is_an_error() {
        let logits = rand(3, (3, 5), 1.0, DType::F32);
        let t = Tensor::new(&[0u32, 7, 1], &Device::Cpu).unwrap();
        let msg = cross_entropy(&logits, &t).unwrap_err().to_string();
        assert!(msg.contains("target 7") && msg.contains("row 1"), "{msg}");
    }

    #[test]
    fn rejects_bad_targets() {
        let logits = rand(3, (3, 5), 1.0, DType::F32);
        let wrong_len = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &wrong_len).is_err());
        let wrong_dtype = Tensor::new(&[0i64, 1, 2], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &wrong_dtype).is_err());
    }

    #[test]
    fn gradcheck_cross_entropy() {
        let x = Var::from_tensor(&rand(4, (6, 9), 3.0, DType::F64)).unwrap();
        let t = targets(5, 6, 9);
        let r = rand(6, 6, 1.0, DType::F64);
        let rep = check_gradients(
            &|a| cross_entropy(&a[0], &t)?.mul(&r)?.sum_all(),
            &[x],
            1e-6,
            100,
        )
        .unwrap();
        println!("cross_entropy: {rep:?}");
        assert!(rep.max_rel_err < 1e-5, "{rep:?}");
    }
}
