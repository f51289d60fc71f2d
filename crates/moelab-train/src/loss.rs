//! The training objective, built from the separate losses the model returns: the LM
//! cross-entropy plus, per MoE layer, the weighted load-balancing loss and the weighted router
//! z-loss. Every balance scope is decided here:
//! - micro-batch and sequence: the model's per-layer balance losses, as computed in its forward;
//! - global: the balance loss of each layer against the step's expert fractions counted over
//!   the whole global batch (the model's own per-layer value is then reported, not trained on).

use candle_core::{DType, Tensor};
use moelab_model::moe::global_balance_loss;
use moelab_model::{BalanceScope, MoeConfig, Output};

use crate::TrainError;

/// The weights and scope of the auxiliary terms.
#[derive(Debug, Clone, Copy)]
pub struct LossWeights {
    /// Weight of the load-balancing loss (`model.moe.aux_loss_coef`).
    pub aux: f64,
    /// Weight of the router z-loss (`model.moe.z_loss_coef`).
    pub z: f64,
    /// Over which tokens expert loads are balanced (`model.moe.aux_loss_scope`).
    pub scope: BalanceScope,
}

impl LossWeights {
    /// The weights a model config trains with.
    pub fn new(moe: &MoeConfig) -> Self {
        Self {
            aux: moe.aux_loss_coef,
            z: moe.z_loss_coef,
            scope: moe.aux_loss_scope,
        }
    }
}

/// One micro-batch's objective (with its graph, to differentiate) and the terms it was made of.
pub struct Objective {
    /// LM + aux * sum of balance losses + z * sum of z-losses.
    pub loss: Tensor,
    /// The LM cross-entropy (mean over tokens).
    pub lm: Tensor,
    /// The balance loss per MoE layer that entered `loss` (global scope: against the global
    /// fractions).
    pub balance: Vec<Tensor>,
    /// The router z-loss per MoE layer.
    pub z: Vec<Tensor>,
}

/// The host values of an [`Objective`]'s terms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossValues {
    /// The training objective.
    pub loss: f64,
    /// The LM cross-entropy.
    pub lm: f64,
    /// Balance loss per MoE layer.
    pub balance: Vec<f64>,
    /// Router z-loss per MoE layer.
    pub z: Vec<f64>,
}

/// Builds the objective of one micro-batch's forward `out` (run with targets). With the global
/// scope, `global_fractions` holds each MoE layer's expert fractions over the whole step.
pub fn objective(
    out: &Output,
    weights: LossWeights,
    global_fractions: Option<&[Vec<f64>]>,
) -> Result<Objective, TrainError> {
    let lm = out.lm_loss.clone().ok_or_else(|| {
        TrainError::Argument("the model returned no loss for a batch with targets".into())
    })?;
    let balance: Vec<Tensor> = match (weights.scope, global_fractions) {
        (BalanceScope::Global, Some(fractions)) => out
            .routing
            .iter()
            .zip(fractions)
            .map(|(r, f)| global_balance_loss(&r.router_probs, f))
            .collect::<candle_core::Result<_>>()?,
        _ => out.routing.iter().map(|r| r.aux_loss.clone()).collect(),
    };
    let z: Vec<Tensor> = out.routing.iter().map(|r| r.z_loss.clone()).collect();
    // Summed from a zero in the LM loss's dtype, layer by layer, then weighted: the order the
    // PyTorch re-implementation uses, so the two agree to rounding.
    let zero = Tensor::zeros((), lm.dtype(), lm.device())?;
    let sum = |terms: &[Tensor]| -> candle_core::Result<Tensor> {
        terms
            .iter()
            .try_fold(zero.clone(), |acc, t| acc + t.to_dtype(lm.dtype())?)
    };
    let loss = ((&lm + (sum(&balance)? * weights.aux)?)? + (sum(&z)? * weights.z)?)?;
    Ok(Objective {
        loss,
        lm,
        balance,
        z,
    })
}

impl Objective {
    /// The terms' values on the host, in one device-to-host copy.
    pub fn values(&self) -> Result<LossValues, TrainError> {
        let mut all = vec![self.loss.clone(), self.lm.clone()];
        all.extend(self.balance.iter().cloned());
        all.extend(self.z.iter().cloned());
        let all = Tensor::stack(&all, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let layers = self.balance.len();
        Ok(LossValues {
            loss: all[0],
            lm: all[1],
            balance: all[2..2 + layers].to_vec(),
            z: all[2 + layers..].to_vec(),
        })
    }
}
