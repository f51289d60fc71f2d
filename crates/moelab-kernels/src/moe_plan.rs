//! The MoE dispatch plan from [`crate::router_topk`]'s output: the [`Routing`] (rows grouped by
//! expert, token order within an expert) and each row's flat `token * k + slot` assignment, built
//! where the expert ids are. On CUDA that is two kernels (`kernels/moe_plan.cu`) fed by the ids
//! and the per-expert row offsets, so the only host copy a layer needs is the histogram (which
//! the grouped GEMM takes as its group sizes); on the CPU the same plan is built on the host.

use std::sync::Arc;

use crate::moe_dispatch::Routing;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// A dispatch plan: the routing and, per row, the assignment (`token * k + slot`) it serves.
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    /// The permutation for `moe_dispatch::permute` / `unpermute`.
    pub routing: Arc<Routing>,
    /// (rows,) u32 on the ids' device: row r serves assignment `assignment_of_row[r]`.
    pub assignment_of_row: Tensor,
}

/// Plans the dispatch of `expert_ids` ((tokens, k) u32, k distinct experts per token) whose
/// per-expert histogram is `counts` (router_topk's, copied to the host: the group sizes).
pub fn plan(expert_ids: &Tensor, counts: &[usize]) -> Result<DispatchPlan> {
    let op = "moe plan";
    let (tokens, k) = expert_ids.dims2()?;
    if expert_ids.dtype() != DType::U32 {
        bail!("{op}: expert ids must be u32, got {:?}", expert_ids.dtype());
    }
    let rows: usize = counts.iter().sum();
    if rows != tokens * k || u32::try_from(rows).is_err() {
        bail!(
            "{op}: the histogram counts {rows} assignments, the ids {tokens} x {k} (a u32 row index \
             holds at most 2^32 - 1)"
        );
    }
    let offsets = offsets(counts);
    let device = expert_ids.device();
    // With no tokens there is nothing to launch; the empty plan is the same everywhere.
    if device.is_cpu() || rows == 0 {
        let ids = expert_ids.flatten_all()?.to_vec1::<u32>()?;
        let (token_of_row, assignment_of_row) = host_plan(&ids, &offsets, k)?;
        return Ok(DispatchPlan {
            routing: Routing::new(token_of_row, tokens)?,
            assignment_of_row: Tensor::from_vec(assignment_of_row, rows, device)?,
        });
    }
    let offsets = Tensor::from_vec(offsets, counts.len() + 1, device)?;
    let packed = expert_ids
        .contiguous()?
        .apply_op2_no_bwd(&offsets, &MoePlan { k })?;
    let index_len = 2 * rows + tokens + 1;
    Ok(DispatchPlan {
        routing: Routing::from_device_index(packed.narrow(0, 0, index_len)?, tokens, rows)?,
        assignment_of_row: packed.narrow(0, index_len, rows)?,
    })
}

/// The exclusive prefix sum of `counts` (n + 1 entries; every entry fits u32, checked by the
/// caller through the total).
fn offsets(counts: &[usize]) -> Vec<u32> {
    let mut out = Vec::with_capacity(counts.len() + 1);
    let mut sum = 0u32;
    out.push(0);
    for &c in counts {
        sum += c as u32;
        out.push(sum);
    }
    out
}

/// The plan on the host: (token_of_row, assignment_of_row), rows grouped by expert in token
/// order (a stable counting sort by expert id).
fn host_plan(ids: &[u32], offsets: &[u32], k: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let n_experts = offsets.len() - 1;
    let mut next: Vec<u32> = offsets[..n_experts].to_vec();
    let rows = ids.len();
    let mut token_of_row = vec![0u32; rows];
    let mut assignment_of_row = vec![0u32; rows];
    for (a, &e) in ids.iter().enumerate() {
        let Some(slot) = next.get_mut(e as usize) else {
            bail!("moe plan: expert id {e} at assignment {a} is not below {n_experts}");
        };
        let r = *slot as usize;
        if r >= offsets[e as usize + 1] as usize {
            bail!("moe plan: expert {e} has more assignments than its histogram count");
        }
        token_of_row[r] = (a / k) as u32;
        assignment_of_row[r] = a as u32;
        *slot += 1;
    }
    Ok((token_of_row, assignment_of_row))
}

/// `(expert_ids (tokens, k) u32, offsets (n_experts + 1) u32)` -> one u32 vector: the routing's
/// packed index (token_of_row, starts, row_ids) then assignment_of_row.
struct MoePlan {
    k: usize,
}

impl CustomOp2 for MoePlan {
    fn name(&self) -> &'static str {
        "moe_plan"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ids = crate::cpu::contiguous::<u32>(s1, l1, self.name(), "expert ids")?;
        let offsets = crate::cpu::contiguous::<u32>(s2, l2, self.name(), "offsets")?;
        let (token_of_row, assignment_of_row) = host_plan(ids, offsets, self.k)?;
        let tokens = ids.len() / self.k.max(1);
        let mut packed = Routing::new(token_of_row, tokens)?.packed_index();
        packed.extend_from_slice(&assignment_of_row);
        let len = packed.len();
        Ok((CpuStorage::U32(packed), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::moe_dispatch::plan(self.name(), self.k, (s1, l1), (s2, l2))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Device;

    /// The op's CPU body (the kernels' reference) gives Routing::new's index for the host plan.
    #[test]
    fn packed_plan_matches_the_routing() {
        // 5 tokens top-2 of 4 experts, expert 2 empty.
        let ids = [0u32, 1, 3, 0, 1, 3, 0, 3, 1, 0];
        let counts = [4usize, 3, 0, 3];
        let t = Tensor::from_slice(&ids, (5, 2), &Device::Cpu).unwrap();
        let offsets = Tensor::from_vec(offsets(&counts), 5, &Device::Cpu).unwrap();
        let packed = t
            .apply_op2_no_bwd(&offsets, &MoePlan { k: 2 })
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        // Expert 0: assignments 0, 3, 6, 9; expert 1: 1, 4, 8; expert 3: 2, 5, 7.
        let assignments = [0u32, 3, 6, 9, 1, 4, 8, 2, 5, 7];
        let token_of_row: Vec<u32> = assignments.iter().map(|a| a / 2).collect();
        let mut want = Routing::new(token_of_row, 5).unwrap().packed_index();
        want.extend_from_slice(&assignments);
        assert_eq!(packed, want);
        let p = plan(&t, &counts).unwrap();
        assert_eq!(p.assignment_of_row.to_vec1::<u32>().unwrap(), assignments);
        assert!(
            plan(&t, &[4, 3, 0, 2]).is_err(),
            "histogram disagrees with the ids"
        );
    }
}
