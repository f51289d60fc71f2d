//! Router top-k: each token's `k` experts by selection score (`score + bias`, the bias only
//! steering the choice) in descending order, and the per-expert histogram of the choices, in
//! one pass: on the CPU, and with feature `cuda` one kernel launch (`kernels/router_topk.cu`)
//! whose only host-visible result the dispatch needs is the histogram. Ties go to the lower
//! expert index and NaN counts as -inf, on both. Not yet used by the model (which sorts the
//! scores with `arg_sort_last_dim`); this is the CUDA kernel's CPU reference.

use crate::cpu::{check_float, contiguous, float_dispatch, Acc, Elem};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// The choices of [`router_topk`].
#[derive(Debug, Clone)]
pub struct TopK {
    /// `(tokens, k)` u32: each token's experts, best first.
    pub expert_ids: Tensor,
    /// `(n_experts,)` u32: how many tokens chose each expert.
    pub counts: Tensor,
}

/// The top `k` experts of each row of `scores (tokens, n_experts)` by `scores + bias`, with
/// `bias (n_experts,)` (any float dtype; added in f32, or f64 for f64 scores) or none.
pub fn router_topk(scores: &Tensor, bias: Option<&Tensor>, k: usize) -> Result<TopK> {
    check_float("router_topk", "scores", scores)?;
    let (tokens, n_experts) = scores.dims2()?;
    if k == 0 || k > n_experts {
        bail!("router_topk: k must be in 1..={n_experts} (the expert count), got {k}");
    }
    if !crate::has_kernel(scores) {
        bail!(
            "router_topk: no kernel for {:?} on {:?}",
            scores.dtype(),
            scores.device()
        );
    }
    let bias = match bias {
        Some(b) => {
            check_float("router_topk", "bias", b)?;
            if b.dims() != [n_experts] {
                bail!(
                    "router_topk: bias must have shape ({n_experts},), got {:?}",
                    b.dims()
                );
            }
            b.to_dtype(DType::F32)?.contiguous()?
        }
        None => Tensor::zeros(n_experts, DType::F32, scores.device())?,
    };
    let packed = scores
        .contiguous()?
        .apply_op2_no_bwd(&bias, &RouterTopK { k })?;
    Ok(TopK {
        expert_ids: packed.narrow(0, 0, tokens * k)?.reshape((tokens, k))?,
        counts: packed.narrow(0, tokens * k, n_experts)?,
    })
}

/// `(scores, bias f32)` -> one u32 storage: the ids `(tokens * k)` then the counts
/// `(n_experts)`.
struct RouterTopK {
    k: usize,
}

impl RouterTopK {
    fn fwd<T: Elem>(
        &self,
        (ss, sl): (&CpuStorage, &Layout),
        (bs, bl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let scores = contiguous::<T>(ss, sl, self.name(), "scores")?;
        let bias = contiguous::<f32>(bs, bl, self.name(), "bias")?;
        let n_experts = bias.len();
        let k = self.k;
        if n_experts == 0 || scores.len() % n_experts != 0 || k > n_experts {
            bail!(
                "{}: scores {:?}, bias {:?} and k {k} do not match",
                self.name(),
                sl.dims(),
                bl.dims()
            );
        }
        let tokens = scores.len() / n_experts;
        let mut out = vec![0u32; tokens * k + n_experts];
        let (ids, counts) = out.split_at_mut(tokens * k);
        let mut selection: Vec<T::A> = vec![<T::A as Acc>::ZERO; n_experts];
        let mut taken = vec![false; n_experts];
        for (row, row_ids) in scores.chunks(n_experts).zip(ids.chunks_mut(k)) {
            for ((s, &b), (sel, t)) in row
                .iter()
                .zip(bias)
                .zip(selection.iter_mut().zip(taken.iter_mut()))
            {
                let v = s.to_acc() + <T::A as Acc>::from_f64(f64::from(b));
                // NaN fails every comparison, so it falls to -inf here.
                let neg_inf = <T::A as Acc>::NEG_INFINITY;
                *sel = if v >= neg_inf { v } else { neg_inf };
                *t = false;
            }
            for id in row_ids.iter_mut() {
                let mut best: Option<usize> = None;
                for (e, (&v, &t)) in selection.iter().zip(&taken).enumerate() {
                    // Strictly greater: a tie keeps the lower index found first.
                    if !t && best.is_none_or(|b| v > selection[b]) {
                        best = Some(e);
                    }
                }
                let Some(e) = best else {
                    bail!("{}: no expert left (k > n_experts)", self.name());
                };
                taken[e] = true;
                counts[e] += 1;
                *id = e as u32;
            }
        }
        Ok((CpuStorage::U32(out), Shape::from(tokens * k + n_experts)))
    }
}

impl CustomOp2 for RouterTopK {
    fn name(&self) -> &'static str {
        "moelab-router-topk"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(crate::cpu::storage_dtype(s1), self.name(), T => self.fwd::<T>((s1, l1), (s2, l2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::router_topk::router_topk(self.name(), self.k, (s1, l1), (s2, l2))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_util::rand;
    use candle_core::Device;

    /// The same choice by sorting: candle's arg_sort of the selection (distinct values).
    fn by_sorting(scores: &Tensor, bias: &Tensor, k: usize) -> Vec<Vec<u32>> {
        scores
            .broadcast_add(bias)
            .unwrap()
            .arg_sort_last_dim(false)
            .unwrap()
            .narrow(1, 0, k)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
    }

    #[test]
    fn matches_sorting_and_counts_the_choices() {
        for (dtype, tokens, n_experts, k) in [
            (DType::F32, 37, 64, 8),
            (DType::F64, 5, 7, 2),
            (DType::F32, 3, 4, 4),
        ] {
            let scores = rand(1, (tokens, n_experts), 1.0, dtype);
            let bias = rand(2, n_experts, 0.1, DType::F32);
            let got = router_topk(&scores, Some(&bias), k).unwrap();
            let want = by_sorting(
                &scores.to_dtype(DType::F64).unwrap(),
                &bias.to_dtype(DType::F64).unwrap(),
                k,
            );
            assert_eq!(got.expert_ids.to_vec2::<u32>().unwrap(), want);
            let mut counts = vec![0u32; n_experts];
            for e in want.iter().flatten() {
                counts[*e as usize] += 1;
            }
            assert_eq!(got.counts.to_vec1::<u32>().unwrap(), counts);
        }
    }

    #[test]
    fn the_bias_steers_and_ties_go_to_the_lower_index() {
        let scores = Tensor::new(&[[0.5f32, 0.5, 0.2, f32::NAN]], &Device::Cpu).unwrap();
        let ids = |bias: Option<&Tensor>, k| {
            router_topk(&scores, bias, k)
                .unwrap()
                .expert_ids
                .to_vec2::<u32>()
                .unwrap()
        };
        // A tie between experts 0 and 1: the lower index first; NaN last.
        assert_eq!(ids(None, 4), vec![vec![0, 1, 2, 3]]);
        let bias = Tensor::new(&[0.0f32, 0.0, 0.4, 0.0], &Device::Cpu).unwrap();
        assert_eq!(ids(Some(&bias), 2), vec![vec![2, 0]]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let scores = rand(3, (2, 4), 1.0, DType::F32);
        let err = router_topk(&scores, None, 5).unwrap_err().to_string();
        assert!(err.contains("k must be in 1..=4"), "{err}");
        let bias = rand(4, 3, 1.0, DType::F32);
        let err = router_topk(&scores, Some(&bias), 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bias must have shape (4,)"), "{err}");
    }
}
