//! Data-parallel gradient exchange: every rank's gradients, in the parameters' fixed (sorted by
//! name) order, packed into buckets and summed over ranks with all-reduce. The packing is the
//! same on every rank, so element i of a bucket is the same parameter element everywhere.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::Collective;
use crate::TrainError;

/// Gradient buckets hold about this many f32 elements (16 MiB): large enough that the
/// per-call latency vanishes, small enough that packing copies stay cheap.
pub const BUCKET_ELEMENTS: usize = 1 << 22;

/// Consecutive runs of `sizes` (element counts, in parameter order) of about
/// [`BUCKET_ELEMENTS`] each; a parameter larger than a bucket gets one of its own.
pub fn buckets(sizes: &[usize], bucket_elements: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &n) in sizes.iter().enumerate() {
        if filled > 0 && filled + n > bucket_elements {
            out.push(start..i);
            start = i;
            filled = 0;
        }
        filled += n;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Sums `grads` (parameter name -> gradient, each rank's own) over ranks in place. A parameter
/// that got no gradient on some rank (an expert no token of that rank reached) takes part with
/// zeros; one that got none on any rank stays absent, as in a single-process run.
pub fn all_reduce_gradients(
    comm: &dyn Collective,
    params: &[(String, Var)],
    grads: &mut HashMap<String, Tensor>,
) -> Result<(), TrainError> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mut present: Vec<u64> = params
        .iter()
        .map(|(name, _)| u64::from(grads.contains_key(name)))
        .collect();
    comm.all_reduce_max_u64(&mut present);
    let reduced: Vec<&(String, Var)> = params
        .iter()
        .zip(&present)
        .filter(|(_, &p)| p == 1)
        .map(|(param, _)| param)
        .collect();
    let sizes: Vec<usize> = reduced.iter().map(|(_, v)| v.elem_count()).collect();
    for range in buckets(&sizes, BUCKET_ELEMENTS) {
        let members = &reduced[range];
        let flat = members
            .iter()
            .map(|(name, var)| match grads.get(name) {
                Some(g) => Ok(g.detach().flatten_all()?),
                None => Ok(Tensor::zeros(var.elem_count(), var.dtype(), var.device())?),
            })
            .collect::<Result<Vec<Tensor>, TrainError>>()?;
        let summed = comm.all_reduce_tensor(&Tensor::cat(&flat, 0)?)?;
        let mut offset = 0;
        for (name, var) in members {
            let n = var.elem_count();
            let g = summed.narrow(0, offset, n)?.reshape(var.shape())?;
            grads.insert(name.clone(), g);
            offset += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_fill_in_order_and_give_big_tensors_their_own() {
        assert_eq!(buckets(&[3, 3, 3, 10, 1], 6), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(buckets(&[1, 1], 6), vec![0..2]);
        assert!(buckets(&[], 6).is_empty());
    }
}
