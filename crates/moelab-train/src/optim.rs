//! AdamW with f32 moments, decoupled weight decay with name-based exclusions, global-norm clipping,
//! and state that round-trips through safetensors (candle-nn's AdamW keeps none and cannot clip).

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};

/// Global-norm clipping: the factor gradients are scaled by so their norm is at most `clip`.
pub fn clip_scale(grad_norm: f64, clip: Option<f64>) -> f64 {
    match clip {
        Some(clip) if grad_norm > clip => clip / grad_norm,
        _ => 1.0,
    }
}

/// AdamW hyper-parameters (the learning rate comes from the schedule at every step).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator floor.
    pub eps: f64,
    /// Decoupled weight decay, multiplied by the learning rate.
    pub weight_decay: f64,
}

/// One optimised parameter and its moments.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// First moment, f32 whatever the parameter dtype.
    m: Tensor,
    /// Second moment, f32.
    v: Tensor,
}

/// The optimiser: parameters in name order, their moments and the step count.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    params: AdamWParams,
    /// Updates applied so far (bias correction uses it).
    step: u64,
}

impl AdamW {
    /// Optimises `vars` (name, parameter); names containing any of `no_decay` get no weight decay.
    pub fn new(
        mut vars: Vec<(String, Var)>,
        params: AdamWParams,
        no_decay: &[String],
    ) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                // Two buffers: the CPU update writes them in place.
                let (shape, device) = (var.shape().clone(), var.device().clone());
                let zeros = || Tensor::zeros(&shape, DType::F32, &device);
                Ok(Slot {
                    decay: !no_decay
                        .iter()
                        .any(|pattern| name.contains(pattern.as_str())),
                    name,
                    var,
                    m: zeros()?,
                    v: zeros()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            params,
            step: 0,
        })
    }

    /// Updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names of the parameters that get weight decay.
    pub fn decayed(&self) -> Vec<&str> {
        self.slots
            .iter()
            .filter(|s| s.decay)
            .map(|s| s.name.as_str())
            .collect()
    }

    /// Global L2 norm of `grads` (name -> gradient) over the optimised parameters, in f64.
    pub fn grad_norm(&self, grads: &HashMap<String, Tensor>) -> Result<f64> {
        let mut host = 0f64;
        let mut total: Option<Tensor> = None;
        for slot in &self.slots {
            if let Some(g) = grads.get(&slot.name) {
                if let Some(sq) = moelab_kernels::sum_of_squares(g)? {
                    host += sq;
                    continue;
                }
                let sq = g.to_dtype(DType::F32)?.sqr()?.sum_all()?;
                total = Some(match total {
                    Some(t) => (t + sq)?,
                    None => sq,
                });
            }
        }
        let device = match total {
            Some(t) => f64::from(t.to_scalar::<f32>()?),
            None => 0.0,
        };
        Ok((host + device).sqrt())
    }

    /// Applies one update with learning rate `lr`, gradients first scaled by `grad_scale` (the
    /// clipping factor). Parameters without a gradient are left alone.
    pub fn step(
        &mut self,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let correction1 = 1.0 - beta1.powf(self.step as f64);
        let correction2 = 1.0 - beta2.powf(self.step as f64);
        for slot in &mut self.slots {
            let Some(grad) = grads.get(&slot.name) else {
                continue;
            };
            // Gradients of matmuls against parameters are themselves tracked by candle; detaching
            // keeps each step's backward graph from being chained into the moments forever.
            let grad = grad.detach();
            let param = slot.var.as_tensor();
            if moelab_kernels::fused_adamw_supported(param, &slot.m, &slot.v, &grad) {
                let update = moelab_kernels::AdamWUpdate {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    decay: if slot.decay { lr * weight_decay } else { 0.0 },
                    correction1,
                    correction2,
                    grad_scale,
                };
                moelab_kernels::adamw_update(param, &slot.m, &slot.v, &grad, &update)?;
                continue;
            }
            let grad = (grad.to_dtype(DType::F32)? * grad_scale)?;
            slot.m = ((&slot.m * beta1)? + (&grad * (1.0 - beta1))?)?;
            slot.v = ((&slot.v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let update = ((&slot.m / correction1)? / ((&slot.v / correction2)?.sqrt()? + eps)?)?;
            let param = slot.var.as_tensor().detach().to_dtype(DType::F32)?;
            let decayed = if slot.decay {
                (&param * (1.0 - lr * weight_decay))?
            } else {
                param
            };
            let next = (decayed - (update * lr)?)?;
            slot.var.set(&next.to_dtype(slot.var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.{name}`, `v.{name}`) plus the step count, for checkpoints.
    pub fn state(&self) -> Result<(u64, Vec<(String, Tensor)>)> {
        let mut tensors = Vec::with_capacity(2 * self.slots.len());
        for slot in &self.slots {
            tensors.push((format!("m.{}", slot.name), slot.m.clone()));
            tensors.push((format!("v.{}", slot.name), slot.v.clone()));
        }
        Ok((self.step, tensors))
    }

    /// Restores moments saved by [`AdamW::state`]; every moment must be present with the
    /// parameter's shape, and the error names the tensor otherwise.
    pub fn load_state(
        &mut self,
        step: u64,
        tensors: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        for slot in &mut self.slots {
            for (prefix, target) in [("m", &mut slot.m), ("v", &mut slot.v)] {
                let key = format!("{prefix}.{}", slot.name);
                let saved = tensors
                    .get(&key)
                    .ok_or_else(|| format!("optimizer state lacks `{key}`"))?;
                if saved.dims() != slot.var.dims() {
                    return Err(format!(
                        "optimizer tensor `{key}` has shape {:?}, the model needs {:?}",
                        saved.dims(),
                        slot.var.dims()
                    ));
                }
                *target = saved
                    .to_dtype(DType::F32)
                    .and_then(|t| t.to_device(slot.var.device()))
                    .map_err(|e| format!("optimizer tensor `{key}`: {e}"))?;
            }
        }
        if tensors.len() != 2 * self.slots.len() {
            return Err(format!(
                "optimizer state holds {} tensors, the model needs {}",
                tensors.len(),
                2 * self.slots.len()
            ));
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use candle_core::Device;

    fn params(weight_decay: f64) -> AdamWParams {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
        }
    }

    #[test]
    fn matches_a_hand_computed_adamw_step() {
        let w = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], params(0.1), &[]).unwrap();
        let grads = HashMap::from([(
            "w".to_string(),
            Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap(),
        )]);
        opt.step(&grads, 0.01, 1.0).unwrap();
        // Step 1: mhat = g, vhat = g^2, update = g/|g| = sign(g); p = p(1 - lr wd) - lr sign(g).
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn excluded_names_get_no_decay_and_clipping_scales() {
        let a = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let b = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![
                ("blocks.0.attn_norm.weight".into(), a.clone()),
                ("blocks.0.q.weight".into(), b.clone()),
            ],
            params(0.5),
            &["norm".into()],
        )
        .unwrap();
        assert_eq!(opt.decayed(), vec!["blocks.0.q.weight"]);
        let zero = Tensor::new(&[0.0f32], &Device::Cpu).unwrap();
        let grads = HashMap::from([
            ("blocks.0.attn_norm.weight".to_string(), zero.clone()),
            ("blocks.0.q.weight".to_string(), zero),
        ]);
        opt.step(&grads, 0.1, 1.0).unwrap();
        assert_eq!(a.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0]);
        assert!((b.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.95).abs() < 1e-6);
        let grads = HashMap::from([(
            "blocks.0.q.weight".to_string(),
            Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap(),
        )]);
        assert!((opt.grad_norm(&grads).unwrap() - 5.0).abs() < 1e-9);
    }

    #[test]
    fn moments_hold_no_autograd_graph() {
        // A gradient that carries a graph (as candle's matmul gradients do) must not leak it
        // into the optimizer state, or memory grows with every step.
        let w = Var::new(&[[1.0f32, 2.0]], &Device::Cpu).unwrap();
        let x = Var::new(&[[3.0f32], [4.0]], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], params(0.1), &[]).unwrap();
        for _ in 0..3 {
            let grads = w
                .as_tensor()
                .matmul(x.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = grads.get(w.as_tensor()).unwrap().clone();
            assert!(g.track_op(), "the premise: this gradient is tracked");
            opt.step(&HashMap::from([("w".to_string(), g)]), 0.01, 1.0)
                .unwrap();
            let (_, state) = opt.state().unwrap();
            for (n, t) in &state {
                assert!(!t.track_op(), "moment {n} is a plain tensor");
            }
        }
    }

    #[test]
    fn state_round_trips_and_mismatches_are_named() {
        let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], params(0.0), &[]).unwrap();
        let grads = HashMap::from([(
            "w".to_string(),
            Tensor::new(&[0.5f32, 1.0], &Device::Cpu).unwrap(),
        )]);
        opt.step(&grads, 0.01, 1.0).unwrap();
        let (step, tensors) = opt.state().unwrap();
        let saved: HashMap<String, Tensor> = tensors.into_iter().collect();
        let w2 = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut opt2 = AdamW::new(vec![("w".into(), w2)], params(0.0), &[]).unwrap();
        opt2.load_state(step, &saved).unwrap();
        assert_eq!(opt2.step_count(), 1);
        let mut bad = saved.clone();
        bad.insert("m.w".into(), Tensor::new(&[1.0f32], &Device::Cpu).unwrap());
        let err = opt2.load_state(1, &bad).unwrap_err();
        assert!(err.contains("m.w"), "{err}");
    }
}
