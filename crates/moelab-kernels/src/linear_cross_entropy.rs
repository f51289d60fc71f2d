//! The LM head and its cross-entropy as one op: `loss_i = logsumexp(h_i W^T) - (h_i W^T)[t_i]`
//! without a logits tensor in the autograd graph (the "fused linear cross-entropy" of Liger and
//! Cut Cross-Entropy).
//!
//! Composed, the head is a matmul node and a cross-entropy node, and candle's backward then
//! allocates a zero tensor the size of the logits and adds the logits' gradient into it, beside
//! the logits kept for backward: four (N, V) buffers per micro-batch, the largest tensors of a
//! small model's step (16 MB each at tiny.toml, 64 MB at vocabulary 8192). Here the forward
//! computes the logits with one gemm call and each row's logsumexp, and keeps both inside the op
//! (not as graph tensors) for its backward, which turns the logits into
//! `dlogits = (softmax - onehot) g` in place and computes `dh = dlogits W`, `dW = dlogits^T h`
//! (two gemm calls): one (N, V) buffer per micro-batch instead of four.
//!
//! On the CPU in f32 and f64; elsewhere (and in half precision) [`linear_cross_entropy`] is
//! the composed `cross_entropy(h W^T)`, which the CUDA path runs until a fused kernel exists.

use std::sync::{Arc, Mutex};

use crate::cpu::{contiguous, gemm_into, map_rows, vectorized, Acc, Elem, Gemm, GemmElem};
use crate::cross_entropy::{check_targets, cross_entropy, max_and_sum};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Per-row cross-entropy of the logits `h (N, d) @ w (V, d)^T` against `targets (N,)` u32,
/// `(N,)` in `w`'s dtype: the logits are computed in the dtype of `w` (the master weights), as
/// the model's head does. An out-of-range target is an error on CPU (see
/// [`crate::cross_entropy`] for CUDA).
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let op = "linear_cross_entropy";
    let (Ok((n, d)), Ok((v, wd))) = (h.dims2(), w.dims2()) else {
        bail!(
            "{op}: h must be (N, d) and w (V, d), got {:?} and {:?}",
            h.dims(),
            w.dims()
        );
    };
    if wd != d {
        bail!("{op}: h has width {d} but w is {:?}", w.dims());
    }
    if targets.dtype() != DType::U32 || targets.dims() != [n] {
        bail!(
            "{op}: targets must be u32 of shape ({n},), got {:?} {:?}",
            targets.dtype(),
            targets.dims()
        );
    }
    let dtype = w.dtype();
    if !w.device().is_cpu() || !matches!(dtype, DType::F32 | DType::F64) {
        // The composed head: the matmul in h's (compute) dtype, the loss in w's.
        let logits = h.matmul(&w.to_dtype(h.dtype())?.t()?)?.to_dtype(dtype)?;
        return cross_entropy(&logits, targets);
    }
    if v == 0 && n > 0 {
        bail!("{op}: w has zero classes");
    }
    h.to_dtype(dtype)?.contiguous()?.apply_op3(
        &w.contiguous()?,
        &targets.contiguous()?,
        LinearCrossEntropy {
            saved: Arc::new(Mutex::new(None)),
        },
    )
}

/// What the forward keeps for the backward: the logits, each row's logsumexp, the targets.
struct Saved {
    logits: CpuStorage,
    lse: CpuStorage,
    targets: Vec<u32>,
}

type SavedSlot = Arc<Mutex<Option<Saved>>>;

/// The forward op on (h, w, targets).
struct LinearCrossEntropy {
    saved: SavedSlot,
}

/// A float type the op computes in directly.
trait Float: Elem + GemmElem {}
impl Float for f32 {}
impl Float for f64 {}

fn dims(op: &str, hl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
    match (hl.dims(), wl.dims()) {
        ([n, d], [v, wd]) if d == wd => Ok((*n, *d, *v)),
        (h, w) => bail!("{op}: h must be (N, d) and w (V, d), got {h:?} and {w:?}"),
    }
}

impl LinearCrossEntropy {
    fn fwd<F: Float>(
        &self,
        (hs, hl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        (ts, tl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d, v) = dims(self.name(), hl, wl)?;
        let h = contiguous::<F>(hs, hl, self.name(), "h")?;
        let w = contiguous::<F>(ws, wl, self.name(), "w")?;
        let targets = contiguous::<u32>(ts, tl, self.name(), "targets")?;
        if targets.len() != n {
            bail!("{}: {} targets for {n} rows", self.name(), targets.len());
        }
        check_targets(self.name(), targets, v)?;
        // logits (N x V) = h (N x d) @ w^T (d x V), w read transposed in place; one gemm call, so
        // w is packed once. Then each row's logsumexp, read-only, as the cross-entropy op does.
        let mut logits = vec![F::from_f64(0.0); n * v];
        gemm_into((n, v, d), &mut logits, (h, d, 1), (w, 1, d), Gemm::SIZED)?;
        let mut lse = vec![F::from_f64(0.0); n];
        map_rows(&mut lse, 1, logits.len(), |row, out| {
            let xr = &logits[row * v..(row + 1) * v];
            let (max, sum) = vectorized(
                #[inline(always)]
                || max_and_sum(xr),
            );
            out[0] = F::from_acc(max + sum.ln());
        });
        let loss: Vec<F> = lse
            .iter()
            .zip(targets)
            .enumerate()
            .map(|(r, (l, &t))| F::from_acc(l.to_acc() - logits[r * v + t as usize].to_acc()))
            .collect();
        let saved = Saved {
            logits: F::to_cpu_storage_owned(logits),
            lse: F::to_cpu_storage_owned(lse),
            targets: targets.to_vec(),
        };
        *self.saved.lock().map_err(|_| poisoned(self.name()))? = Some(saved);
        Ok((F::to_cpu_storage_owned(loss), Shape::from(n)))
    }
}

fn poisoned(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: saved state poisoned by an earlier panic"))
}

impl CustomOp3 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "moelab-linear-cross-entropy"
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
        crate::cpu::f32_f64_dispatch!(crate::cpu::storage_dtype(s1), self.name(), F => self.fwd::<F>((s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _targets: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, d) = h.dims2()?;
        let v = w.dim(0)?;
        let packed = h.apply_op3_no_bwd(
            w,
            &g.to_dtype(h.dtype())?.contiguous()?,
            &LinearCrossEntropyBackward {
                saved: self.saved.clone(),
            },
        )?;
        let dh = packed.narrow(0, 0, n * d)?.reshape((n, d))?;
        let dw = packed.narrow(0, n * d, v * d)?.reshape((v, d))?;
        Ok((Some(dh), Some(dw), None))
    }
}

/// Backward op on (h, w, g) with the forward's probabilities; output dh ++ dW, flat.
struct LinearCrossEntropyBackward {
    saved: SavedSlot,
}

impl LinearCrossEntropyBackward {
    fn run<F: Float>(
        &self,
        (hs, hl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        (gs, gl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d, v) = dims(self.name(), hl, wl)?;
        let h = contiguous::<F>(hs, hl, self.name(), "h")?;
        let w = contiguous::<F>(ws, wl, self.name(), "w")?;
        let g = contiguous::<F>(gs, gl, self.name(), "grad")?;
        // Taken, not copied: the logits become dlogits in place and are freed with them. (So a
        // second backward through the same graph is an error, not a wrong gradient.)
        let taken = self.saved.lock().map_err(|_| poisoned(self.name()))?.take();
        let Some(saved) = taken else {
            bail!(
                "{}: no saved forward (backward runs once per forward)",
                self.name()
            );
        };
        let mut dl = F::cpu_storage_data(saved.logits)?;
        let lse = F::cpu_storage_data(saved.lse)?;
        if g.len() != n || dl.len() != n * v || lse.len() != n || saved.targets.len() != n {
            bail!("{}: saved state does not match {n} rows", self.name());
        }
        // dlogits = (softmax(row) - onehot(t)) * g = exp(x - lse) * g - onehot(t) * g.
        map_rows(&mut dl, v, 2 * n * v, |r, row| {
            let (shift, gr) = (lse[r].to_acc(), g[r].to_acc());
            vectorized(
                #[inline(always)]
                || {
                    for x in row.iter_mut() {
                        *x = F::from_acc((x.to_acc() - shift).exp() * gr);
                    }
                },
            );
            let t = saved.targets[r] as usize;
            row[t] = F::from_acc(row[t].to_acc() - gr);
        });
        let mut out = vec![F::from_f64(0.0); n * d + v * d];
        let (dh, dw) = out.split_at_mut(n * d);
        // dh (N x d) = dlogits (N x V) @ w (V x d).
        gemm_into((n, d, v), dh, (&dl, v, 1), (w, d, 1), Gemm::SIZED)?;
        // dW (V x d) = dlogits^T (V x N) @ h (N x d).
        gemm_into((v, d, n), dw, (&dl, 1, v), (h, d, 1), Gemm::SIZED)?;
        let len = out.len();
        Ok((F::to_cpu_storage_owned(out), Shape::from(len)))
    }
}

impl CustomOp3 for LinearCrossEntropyBackward {
    fn name(&self) -> &'static str {
        "moelab-linear-cross-entropy-backward"
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
        crate::cpu::f32_f64_dispatch!(crate::cpu::storage_dtype(s1), self.name(), F => self.run::<F>((s1, l1), (s2, l2), (s3, l3)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::gradcheck::check_gradients;
    use crate::test_util::{max_abs_diff, rand};
    use candle_core::{Device, Var};

    fn targets(n: usize, v: usize, seed: u32) -> Tensor {
        let t: Vec<u32> = (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) % v as u32)
            .collect();
        Tensor::from_vec(t, n, &Device::Cpu).unwrap()
    }

    fn composed(h: &Tensor, w: &Tensor, t: &Tensor) -> Tensor {
        cross_entropy(&h.matmul(&w.t().unwrap()).unwrap(), t).unwrap()
    }

    /// Loss and both gradients match the composed head + cross-entropy, for row counts that are
    /// and are not multiples of the row block, in f32 and f64, with a weighted loss so each
    /// row's incoming gradient differs.
    #[test]
    fn matches_the_composed_head_and_loss_forward_and_backward() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            for (n, d, v) in [(1, 3, 5), (63, 8, 17), (64, 16, 40), (130, 8, 33)] {
                let h = Var::from_tensor(&rand(n as u64, (n, d), 1.0, dtype)).unwrap();
                let w = Var::from_tensor(&rand(7 + n as u64, (v, d), 1.0, dtype)).unwrap();
                let t = targets(n, v, 3);
                let r = rand(11, n, 1.0, dtype);
                let got = linear_cross_entropy(&h, &w, &t).unwrap();
                let want = composed(&h, &w, &t);
                assert_eq!(got.dims(), &[n]);
                assert!(
                    max_abs_diff(&got, &want) < tol,
                    "{dtype:?} {n}x{d}x{v} loss"
                );
                let g1 = got.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = want.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                for x in [&h, &w] {
                    let (a, b) = (g1.get(x).unwrap(), g2.get(x).unwrap());
                    assert!(max_abs_diff(a, b) < tol, "{dtype:?} {n}x{d}x{v} grad");
                }
            }
        }
    }

    #[test]
    fn gradcheck_h_and_w() {
        let (n, d, v) = (70, 4, 9);
        let vars = [
            Var::from_tensor(&rand(1, (n, d), 1.0, DType::F64)).unwrap(),
            Var::from_tensor(&rand(2, (v, d), 1.0, DType::F64)).unwrap(),
        ];
        let t = targets(n, v, 5);
        let r = rand(3, n, 1.0, DType::F64);
        let rep = check_gradients(
            &|x| linear_cross_entropy(&x[0], &x[1], &t)?.mul(&r)?.sum_all(),
            &vars,
            1e-6,
            60,
        )
        .unwrap();
        assert!(rep.max_rel_err < 1e-6, "{rep:?}");
    }

    #[test]
    fn bad_shapes_and_targets_are_errors_naming_the_op() {
        let h = rand(1, (4, 3), 1.0, DType::F32);
        let w = rand(2, (5, 3), 1.0, DType::F32);
        let cases = [
            linear_cross_entropy(&h, &rand(3, (5, 2), 1.0, DType::F32), &targets(4, 5, 0)),
            linear_cross_entropy(&h, &w, &targets(3, 5, 0)),
            linear_cross_entropy(
                &h,
                &w,
                &Tensor::new(&[0u32, 1, 2, 5], &Device::Cpu).unwrap(),
            ),
        ];
        for case in cases {
            let err = case.unwrap_err().to_string();
            assert!(
                err.contains("linear_cross_entropy") || err.contains("linear-cross-entropy"),
                "{err}"
            );
        }
    }

    /// A bf16 `h` (the model's compute dtype) is widened to the weights' f32 and fused.
    #[test]
    fn a_half_precision_h_is_widened_to_the_weights_dtype() {
        let h = rand(1, (6, 4), 1.0, DType::BF16);
        let w = rand(2, (7, 4), 1.0, DType::F32);
        let t = targets(6, 7, 1);
        let got = linear_cross_entropy(&h, &w, &t).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let want = composed(&h.to_dtype(DType::F32).unwrap(), &w, &t);
        assert!(max_abs_diff(&got, &want) < 1e-5);
    }
}
