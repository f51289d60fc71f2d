//! Global-batch load balancing (`model.moe.aux_loss_scope = "global"`): the expert-selection
//! fractions f_i of the balance loss are counted over every micro-batch of the step on every
//! rank, as Megatron-Core's global aux loss and "Demons in the Detail" (arXiv 2501.11873) do.
//! Balancing each micro-batch instead pushes every small group of tokens, hence every domain,
//! towards a uniform expert load: the very specialisation moelab measures.
//!
//! The counts must be known before the first micro-batch's backward, so the step first routes
//! its micro-batches without gradients (one extra forward pass; routing is a pure function of
//! the weights, the tokens and (seed, step), so the choices are the ones the training pass
//! makes). The fractions then do not depend on how the batch is split over ranks and
//! micro-batches: an N-rank run balances exactly as a 1-rank run of the same global batch.

use moelab_model::LayerRouting;

use crate::dist::Collective;
use crate::TrainError;

/// Choices per (MoE layer, expert), summed over micro-batches.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertCounts(pub Vec<Vec<f64>>);

impl ExpertCounts {
    /// Zero counts for `moe_layers` layers of `n_experts` experts.
    pub fn new(moe_layers: usize, n_experts: usize) -> Self {
        Self(vec![vec![0.0; n_experts]; moe_layers])
    }

    /// Adds one micro-batch's choices: per MoE layer, the chosen expert ids (tokens x k).
    pub fn add(&mut self, choices: &[Vec<u32>]) -> Result<(), TrainError> {
        if choices.len() != self.0.len() {
            return Err(TrainError::Argument(format!(
                "global balancing: {} layers of choices for {} MoE layers",
                choices.len(),
                self.0.len()
            )));
        }
        for (counts, ids) in self.0.iter_mut().zip(choices) {
            for &e in ids {
                let slot = counts.get_mut(e as usize).ok_or_else(|| {
                    TrainError::Argument(format!("global balancing: expert id {e} out of range"))
                })?;
                *slot += 1.0;
            }
        }
        Ok(())
    }

    /// Adds the choices of a micro-batch's routing records.
    pub fn add_routing(&mut self, routing: &[LayerRouting]) -> Result<(), TrainError> {
        let choices = routing
            .iter()
            .map(|r| Ok(r.expert_ids.flatten_all()?.to_vec1::<u32>()?))
            .collect::<Result<Vec<_>, TrainError>>()?;
        self.add(&choices)
    }

    /// The fractions f_i per layer over all ranks of `comm`: counts summed over ranks, divided
    /// by the layer's total (tokens x k); all ranks get the same.
    pub fn global_fractions(mut self, comm: &dyn Collective) -> Vec<Vec<f64>> {
        let n_experts = self.0.first().map_or(0, Vec::len);
        let mut flat: Vec<f64> = self.0.concat();
        comm.all_reduce_f64(&mut flat);
        for (layer, summed) in self.0.iter_mut().zip(flat.chunks(n_experts.max(1))) {
            let total: f64 = summed.iter().sum();
            *layer = summed.iter().map(|c| c / total.max(1.0)).collect();
        }
        self.0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::dist::Single;

    #[test]
    fn fractions_count_every_micro_batch_of_the_step() {
        // One MoE layer, 3 experts, k = 2; micro-batch 1 has 2 tokens, micro-batch 2 has 2.
        let mut counts = ExpertCounts::new(1, 3);
        counts.add(&[vec![0, 1, 0, 2]]).unwrap();
        counts.add(&[vec![1, 2, 1, 0]]).unwrap();
        // Expert 0: 3, expert 1: 3, expert 2: 2 of 8 choices.
        assert_eq!(counts.0, [[3.0, 3.0, 2.0]]);
        let f = counts.global_fractions(&Single);
        assert_eq!(f, [[0.375, 0.375, 0.25]]);
        let err = ExpertCounts::new(1, 3).add(&[vec![3]]).unwrap_err();
        assert!(err.to_string().contains("expert id 3"), "{err}");
    }
}
