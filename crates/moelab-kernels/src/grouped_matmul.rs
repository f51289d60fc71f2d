//! Grouped GEMM for MoE experts: each contiguous block of rows is multiplied by its own weight.

use crate::cpu::{contiguous, gemm_into, Gemm, GemmElem};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;
use std::sync::Arc;

/// Grouped GEMM: `x (N, K)` with rows sorted by group, `w (E, M, K)` in nn.Linear layout,
/// `group_sizes` (length E, summing to N) -> `(N, M)` where group e's rows are `x_e @ w[e]^T`.
/// f32, f64, bf16 and f16 (bf16 on CPU computes in f32 and rounds the result once).
pub fn grouped_matmul(x: &Tensor, w: &Tensor, group_sizes: &[usize]) -> Result<Tensor> {
    let op = "grouped_matmul";
    check_gemm_dtype(op, "x", x.dtype())?;
    if w.dtype() != x.dtype() {
        bail!(
            "{op}: w has dtype {:?} but x has {:?}",
            w.dtype(),
            x.dtype()
        );
    }
    let Ok((n, k)) = x.dims2() else {
        bail!("{op}: x must be (N, K), got shape {:?}", x.dims());
    };
    let Ok((e, _m, wk)) = w.dims3() else {
        bail!("{op}: w must be (E, M, K), got shape {:?}", w.dims());
    };
    if wk != k {
        bail!("{op}: x has K = {k} but w {:?} has K = {wk}", w.dims());
    }
    check_group_sizes(op, group_sizes, e, n)?;
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        GroupedMatmul {
            group_sizes: group_sizes.into(),
            transpose: true,
        },
    )
}

/// Checked dims of `x (n, inner) @ op(w)` for `w (E, m, k)`: `op` transposes w when `transpose`,
/// so `inner` is k and the output width m, or the other way round.
pub(crate) struct MatmulDims {
    pub n: usize,
    pub m: usize,
    pub k: usize,
    pub inner: usize,
    pub out_w: usize,
}

/// The dims of a grouped matmul, with errors naming the op (shared by the CPU and CUDA paths).
pub(crate) fn matmul_dims(
    op: &str,
    group_sizes: &[usize],
    transpose: bool,
    xl: &Layout,
    wl: &Layout,
) -> Result<MatmulDims> {
    let (n, a) = match xl.dims() {
        [n, a] => (*n, *a),
        dims => bail!("{op}: x must be 2D, got {dims:?}"),
    };
    let (e, m, k) = match wl.dims() {
        [e, m, k] => (*e, *m, *k),
        dims => bail!("{op}: w must be 3D, got {dims:?}"),
    };
    check_group_sizes(op, group_sizes, e, n)?;
    let (inner, out_w) = if transpose { (k, m) } else { (m, k) };
    if a != inner {
        bail!("{op}: x {:?} does not match w {:?}", xl.dims(), wl.dims());
    }
    Ok(MatmulDims {
        n,
        m,
        k,
        inner,
        out_w,
    })
}

/// `(p, q)` of the per-group `a_e^T @ b_e` for `a (N, p)`, `b (N, q)`, checked against the groups.
pub(crate) fn weight_grad_dims(
    op: &str,
    group_sizes: &[usize],
    a_l: &Layout,
    b_l: &Layout,
) -> Result<(usize, usize)> {
    let ((n, p), (nb, q)) = match (a_l.dims(), b_l.dims()) {
        ([n, p], [nb, q]) => ((*n, *p), (*nb, *q)),
        (da, db) => bail!("{op}: inputs must be 2D, got {da:?} and {db:?}"),
    };
    if n != nb {
        bail!("{op}: row counts differ ({n} vs {nb})");
    }
    check_group_sizes(op, group_sizes, group_sizes.len(), n)?;
    Ok((p, q))
}

fn check_gemm_dtype(op: &str, what: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 => Ok(()),
        dt => bail!("{op}: {what} has unsupported dtype {dt:?} (expected f32, f64, bf16 or f16)"),
    }
}

/// Errors unless there is one size per group and they sum to the row count.
pub(crate) fn check_group_sizes(
    op: &str,
    sizes: &[usize],
    groups: usize,
    rows: usize,
) -> Result<()> {
    if sizes.len() != groups {
        bail!(
            "{op}: {} group sizes given for {groups} weight groups",
            sizes.len()
        );
    }
    let total: usize = sizes.iter().sum();
    if total != rows {
        bail!("{op}: group sizes sum to {total} but there are {rows} rows");
    }
    Ok(())
}

/// Calls `f(group, first_row, rows, out)` for each group, where `out` is the group's disjoint
/// `chunk_len(rows)`-long slice of `dst`. Groups run on rayon when `dst` is large: MoE groups are
/// often too small for gemm's own threading to pay off.
fn for_each_group<T: Send>(
    sizes: &[usize],
    dst: &mut [T],
    chunk_len: impl Fn(usize) -> usize,
    f: impl Fn(usize, usize, usize, &mut [T]) -> Result<()> + Send + Sync,
) -> Result<()> {
    let parallel = dst.len() > crate::cpu::PAR_THRESHOLD && sizes.len() > 1;
    let mut tasks = Vec::with_capacity(sizes.len());
    let (mut rest, mut row0) = (dst, 0);
    for (g, &rows) in sizes.iter().enumerate() {
        let len = chunk_len(rows);
        if len > rest.len() {
            bail!("grouped_matmul: output too small for group {g}");
        }
        let (chunk, tail) = rest.split_at_mut(len);
        tasks.push((g, row0, rows, chunk));
        rest = tail;
        row0 += rows;
    }
    if parallel {
        tasks
            .into_par_iter()
            .try_for_each(|(g, row0, rows, out)| f(g, row0, rows, out))
    } else {
        tasks
            .into_iter()
            .try_for_each(|(g, row0, rows, out)| f(g, row0, rows, out))
    }
}

/// bf16 on CPU (gemm has no bf16 kernel): widens both inputs to f32, runs `f` and rounds its
/// result to bf16 once, so accumulation is in f32 as on CUDA.
fn via_f32(
    a: &[bf16],
    b: &[bf16],
    f: impl FnOnce(&[f32], &[f32]) -> Result<(Vec<f32>, Shape)>,
) -> Result<(CpuStorage, Shape)> {
    let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let (out, shape) = f(&widen(a), &widen(b))?;
    let out = out.into_iter().map(bf16::from_f32).collect();
    Ok((CpuStorage::BF16(out), shape))
}

macro_rules! gemm_dispatch {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            dt => bail!(
                "{}: unsupported dtype {dt:?} (expected f32, f64, bf16 or f16)",
                $op
            ),
        }
    };
}

/// Per-group `x_e @ w[e]^T` (transpose, x: (N, K) -> (N, M)) or `x_e @ w[e]`
/// (no transpose, x: (N, M) -> (N, K)), with w: (E, M, K).
#[derive(Clone)]
struct GroupedMatmul {
    group_sizes: Arc<[usize]>,
    transpose: bool,
}

impl GroupedMatmul {
    fn fwd<T: GemmElem>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<T>(xs, xl, self.name(), "x")?;
        let w = contiguous::<T>(ws, wl, self.name(), "w")?;
        let (y, shape) = self.fwd_slices(x, xl, w, wl)?;
        Ok((T::to_cpu_storage_owned(y), shape))
    }

    fn fwd_slices<T: GemmElem>(
        &self,
        x: &[T],
        xl: &Layout,
        w: &[T],
        wl: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        let MatmulDims {
            n,
            m,
            k,
            inner,
            out_w,
        } = matmul_dims(self.name(), &self.group_sizes, self.transpose, xl, wl)?;
        let a = inner;
        let mut y = vec![T::ZERO; n * out_w];
        let chunk_len = |rows: usize| rows * out_w;
        for_each_group(&self.group_sizes, &mut y, chunk_len, |g, row0, rows, ye| {
            let xe = &x[row0 * a..(row0 + rows) * a];
            let we = &w[g * m * k..(g + 1) * m * k];
            // w[e] is (M, K) row-major; read transposed it is (K, M) with strides (1, K).
            let rhs = if self.transpose {
                (we, 1, k)
            } else {
                (we, k, 1)
            };
            gemm_into((rows, out_w, inner), ye, (xe, a, 1), rhs, Gemm::SIZED)
        })?;
        Ok((y, Shape::from((n, out_w))))
    }
}

impl CustomOp2 for GroupedMatmul {
    fn name(&self) -> &'static str {
        "moelab-grouped-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if crate::cpu::storage_dtype(s1) == DType::BF16 {
            let x = contiguous::<bf16>(s1, l1, self.name(), "x")?;
            let w = contiguous::<bf16>(s2, l2, self.name(), "w")?;
            return via_f32(x, w, |x, w| self.fwd_slices(x, l1, w, l2));
        }
        gemm_dispatch!(crate::cpu::storage_dtype(s1), self.name(), T => self.fwd::<T>(s1, l1, s2, l2))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::gemm::grouped_matmul(
            self.name(),
            &self.group_sizes,
            self.transpose,
            s1,
            l1,
            s2,
            l2,
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // y_e = x_e @ op(w_e): dx_e = dy_e @ op(w_e)^T, so the flag flips.
        let flipped = GroupedMatmul {
            group_sizes: self.group_sizes.clone(),
            transpose: !self.transpose,
        };
        let dx = dy.apply_op2(w, flipped)?;
        let wgrad = GroupedWeightGrad {
            group_sizes: self.group_sizes.clone(),
        };
        // transpose: dw_e = dy_e^T @ x_e (M, K); otherwise dw_e = x_e^T @ dy_e (M, K).
        let dw = if self.transpose {
            dy.apply_op2_no_bwd(x, &wgrad)?
        } else {
            x.apply_op2_no_bwd(&dy, &wgrad)?
        };
        Ok((Some(dx), Some(dw)))
    }
}

/// Per-group `a_e^T @ b_e` for `a (N, P)`, `b (N, Q)` -> `(E, P, Q)`, zeros for empty groups.
struct GroupedWeightGrad {
    group_sizes: Arc<[usize]>,
}

impl GroupedWeightGrad {
    fn run<T: GemmElem>(
        &self,
        a_s: &CpuStorage,
        a_l: &Layout,
        b_s: &CpuStorage,
        b_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = contiguous::<T>(a_s, a_l, self.name(), "a")?;
        let b = contiguous::<T>(b_s, b_l, self.name(), "b")?;
        let (dw, shape) = self.run_slices(a, a_l, b, b_l)?;
        Ok((T::to_cpu_storage_owned(dw), shape))
    }

    fn run_slices<T: GemmElem>(
        &self,
        a: &[T],
        a_l: &Layout,
        b: &[T],
        b_l: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        let (p, q) = weight_grad_dims(self.name(), &self.group_sizes, a_l, b_l)?;
        let e = self.group_sizes.len();
        let mut dw = vec![T::ZERO; e * p * q];
        for_each_group(
            &self.group_sizes,
            &mut dw,
            |_| p * q,
            |_, row0, rows, out| {
                let ae = &a[row0 * p..(row0 + rows) * p];
                let be = &b[row0 * q..(row0 + rows) * q];
                // a_e^T is (P, rows) with row stride 1 and column stride P.
                gemm_into((p, q, rows), out, (ae, 1, p), (be, q, 1), Gemm::SIZED)
            },
        )?;
        Ok((dw, Shape::from((e, p, q))))
    }
}

impl CustomOp2 for GroupedWeightGrad {
    fn name(&self) -> &'static str {
        "moelab-grouped-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if crate::cpu::storage_dtype(s1) == DType::BF16 {
            let a = contiguous::<bf16>(s1, l1, self.name(), "a")?;
            let b = contiguous::<bf16>(s2, l2, self.name(), "b")?;
            return via_f32(a, b, |a, b| self.run_slices(a, l1, b, l2));
        }
        gemm_dispatch!(crate::cpu::storage_dtype(s1), self.name(), T => self.run::<T>(s1, l1, s2, l2))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::gemm::grouped_weight_grad(self.name(), &self.group_sizes, s1, l1, s2, l2)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::gradcheck::check_gradients;
    use crate::test_util::{max_abs_diff, rand};
    use candle_core::Var;

    fn reference(x: &Tensor, w: &Tensor, sizes: &[usize]) -> Tensor {
        let mut parts = Vec::new();
        let mut row0 = 0;
        for (e, &rows) in sizes.iter().enumerate() {
            let xe = x.narrow(0, row0, rows).unwrap();
            parts.push(xe.matmul(&w.get(e).unwrap().t().unwrap()).unwrap());
            row0 += rows;
        }
        Tensor::cat(&parts, 0).unwrap()
    }

    #[test]
    fn forward_matches_reference() {
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-12)] {
            // Small, with an empty group; then big enough for threaded gemm.
            for (sizes, m, k) in [(vec![3, 0, 5, 2], 6, 7), (vec![300, 0, 456, 244], 96, 64)] {
                let n: usize = sizes.iter().sum();
                let x = rand(1, (n, k), 1.0, dtype);
                let w = rand(2, (sizes.len(), m, k), 1.0, dtype);
                let d = max_abs_diff(
                    &grouped_matmul(&x, &w, &sizes).unwrap(),
                    &reference(&x, &w, &sizes),
                );
                assert!(d < tol, "{dtype:?} {sizes:?}: {d}");
            }
        }
    }

    #[test]
    fn large_grads_match_reference_autograd() {
        // Sizes chosen so both output buffers take the parallel-over-groups path.
        let sizes = [400, 0, 350, 250];
        let x = Var::from_tensor(&rand(11, (1000, 160), 1.0, DType::F32)).unwrap();
        let w = Var::from_tensor(&rand(12, (4, 128, 160), 1.0, DType::F32)).unwrap();
        let r = rand(13, (1000, 128), 1.0, DType::F32);
        let ours = grouped_matmul(x.as_tensor(), w.as_tensor(), &sizes).unwrap();
        let theirs = reference(x.as_tensor(), w.as_tensor(), &sizes);
        let g1 = ours.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = theirs
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            let (a, b) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            let d = max_abs_diff(a, b);
            assert!(d < 1e-3, "{d}");
        }
    }

    #[test]
    fn f16_runs() {
        let x = rand(1, (5, 8), 1.0, DType::F16);
        let w = rand(2, (2, 4, 8), 1.0, DType::F16);
        let d = max_abs_diff(
            &grouped_matmul(&x, &w, &[2, 3]).unwrap(),
            &reference(&x, &w, &[2, 3]),
        );
        assert!(d < 1e-2, "{d}");
    }

    #[test]
    fn bad_group_sizes_are_errors() {
        let x = rand(1, (5, 4), 1.0, DType::F32);
        let w = rand(2, (2, 3, 4), 1.0, DType::F32);
        let msg = grouped_matmul(&x, &w, &[2, 2]).unwrap_err().to_string();
        assert!(msg.contains('4') && msg.contains('5'), "{msg}");
        assert!(grouped_matmul(&x, &w, &[5]).is_err());
        assert!(grouped_matmul(&x, &rand(2, (2, 3, 5), 1.0, DType::F32), &[2, 3]).is_err());
        let ints = x.to_dtype(DType::U32).unwrap();
        let msg = grouped_matmul(&ints, &w.to_dtype(DType::U32).unwrap(), &[2, 3])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("grouped_matmul") && msg.contains("U32"),
            "{msg}"
        );
    }

    /// Max |a - b| / max |b|, in f64.
    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b
            .to_dtype(DType::F64)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        max_abs_diff(a, b) / scale.max(1e-30)
    }

    #[test]
    fn bf16_matches_f32_forward_and_grads() {
        // bf16 inputs, widened exactly to f32 for the reference, so the only differences are
        // the bf16 roundings of the results (relative 2^-9 each).
        let sizes = [7, 0, 12, 5];
        let x16 = rand(21, (24, 40), 1.0, DType::BF16);
        let w16 = rand(22, (4, 24, 40), 1.0, DType::BF16);
        let r16 = rand(23, (24, 24), 1.0, DType::BF16);
        let run = |dtype: DType| {
            let x = Var::from_tensor(&x16.to_dtype(dtype).unwrap()).unwrap();
            let w = Var::from_tensor(&w16.to_dtype(dtype).unwrap()).unwrap();
            let y = grouped_matmul(x.as_tensor(), w.as_tensor(), &sizes).unwrap();
            let r = r16.to_dtype(dtype).unwrap();
            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(x.as_tensor()).unwrap().clone();
            let dw = grads.get(w.as_tensor()).unwrap().clone();
            (y, dx, dw)
        };
        let (y16, dx16, dw16) = run(DType::BF16);
        let (y32, dx32, dw32) = run(DType::F32);
        assert_eq!(y16.dtype(), DType::BF16);
        assert_eq!(dw16.dtype(), DType::BF16);
        for (name, a, b) in [("y", y16, y32), ("dx", dx16, dx32), ("dw", dw16, dw32)] {
            let e = rel_err(&a, &b);
            assert!(e < 8e-3, "{name}: relative error {e}");
        }
    }

    #[test]
    fn gradcheck_x_and_w_with_empty_group() {
        let sizes = [2, 0, 3, 1];
        let x = Var::from_tensor(&rand(3, (6, 5), 1.0, DType::F64)).unwrap();
        let w = Var::from_tensor(&rand(4, (4, 3, 5), 1.0, DType::F64)).unwrap();
        let r = rand(5, (6, 3), 1.0, DType::F64);
        let rep = check_gradients(
            &|t| grouped_matmul(&t[0], &t[1], &sizes)?.mul(&r)?.sum_all(),
            &[x.clone(), w.clone()],
            1e-6,
            100,
        )
        .unwrap();
        println!("grouped_matmul: {rep:?}");
        assert_eq!(rep.checked, 30 + 60);
        assert!(rep.max_rel_err < 1e-5, "{rep:?}");
        // The empty group's weight gradient is exactly zero.
        let y = grouped_matmul(x.as_tensor(), w.as_tensor(), &sizes).unwrap();
        let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let dw1 = grads.get(w.as_tensor()).unwrap().get(1).unwrap();
        let total = dw1
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(total, 0.0);
    }

    #[test]
    fn gradcheck_untransposed_variant() {
        // Exercises the bwd of the transpose = false op used for dx.
        let sizes: Arc<[usize]> = vec![1, 3, 0].into();
        let x = Var::from_tensor(&rand(6, (4, 3), 1.0, DType::F64)).unwrap();
        let w = Var::from_tensor(&rand(7, (3, 3, 5), 1.0, DType::F64)).unwrap();
        let r = rand(8, (4, 5), 1.0, DType::F64);
        let op = GroupedMatmul {
            group_sizes: sizes,
            transpose: false,
        };
        let rep = check_gradients(
            &|t| t[0].apply_op2(&t[1], op.clone())?.mul(&r)?.sum_all(),
            &[x, w],
            1e-6,
            100,
        )
        .unwrap();
        assert!(rep.max_rel_err < 1e-5, "{rep:?}");
    }
}
