//! Finite-difference gradient checking for autograd (used by this crate's and the model's tests).

use candle_core::{bail, DType, Result, Tensor, Var};

/// Denominator floor of the relative error: below this gradient magnitude the error is
/// effectively absolute, so f64 round-off on near-zero gradients does not read as a failure.
pub const REL_ERR_FLOOR: f64 = 1e-3;

/// Result of comparing autograd gradients with central finite differences.
#[derive(Debug, Clone, PartialEq)]
pub struct GradCheckReport {
    /// Largest |autograd - numeric| over all checked coordinates.
    pub max_abs_err: f64,
    /// Largest |a - n| / max(|a|, |n|, REL_ERR_FLOOR) over all checked coordinates.
    pub max_rel_err: f64,
    /// Number of coordinates compared.
    pub checked: usize,
    /// Input index, flat coordinate and both values at the largest relative error.
    pub worst: String,
}

/// Compares autograd gradients of the scalar `f(inputs)` against central differences with step
/// `eps`, on up to `max_per_input` evenly spaced coordinates per input. Inputs must be f64;
/// an input that receives no gradient at all is an error.
pub fn check_gradients(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Var],
    eps: f64,
    max_per_input: usize,
) -> Result<GradCheckReport> {
    for (i, v) in inputs.iter().enumerate() {
        if v.dtype() != DType::F64 {
            bail!(
                "check_gradients: input {i} has dtype {:?}; finite differences need f64",
                v.dtype()
            );
        }
    }
    // Clones share storage with the Vars, so `Var::set` below is visible through them.
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let eval = || -> Result<f64> { scalar(&f(&tensors)?) };

    let y = f(&tensors)?;
    scalar(&y)?;
    let grads = y.backward()?;
    let mut report = GradCheckReport {
        max_abs_err: 0.0,
        max_rel_err: 0.0,
        checked: 0,
        worst: String::from("nothing checked"),
    };
    for (i, var) in inputs.iter().enumerate() {
        let Some(grad) = grads.get(var.as_tensor()) else {
            bail!("check_gradients: input {i} received no gradient (its graph path is cut)");
        };
        if grad.dims() != var.dims() {
            bail!(
                "check_gradients: input {i} has shape {:?} but its gradient has {:?}",
                var.dims(),
                grad.dims()
            );
        }
        let analytic = grad.flatten_all()?.to_vec1::<f64>()?;
        let original = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let shape = var.shape().clone();
        let device = var.device().clone();
        let set = |values: Vec<f64>| -> Result<()> {
            var.set(&Tensor::from_vec(values, shape.clone(), &device)?)
        };
        for idx in sample_indices(original.len(), max_per_input) {
            let mut bumped = original.clone();
            bumped[idx] = original[idx] + eps;
            set(bumped.clone())?;
            let plus = eval();
            bumped[idx] = original[idx] - eps;
            set(bumped)?;
            let minus = eval();
            // Restore before propagating any error so the caller's Var is left intact.
            set(original.clone())?;
            let numeric = (plus? - minus?) / (2.0 * eps);
            let a = analytic[idx];
            let abs = (a - numeric).abs();
            let rel = abs / a.abs().max(numeric.abs()).max(REL_ERR_FLOOR);
            report.checked += 1;
            report.max_abs_err = report.max_abs_err.max(abs);
            if rel > report.max_rel_err || report.checked == 1 {
                report.max_rel_err = report.max_rel_err.max(rel);
                report.worst = format!(
                    "input {i} (shape {:?}) flat index {idx}: autograd {a:e} vs numeric {numeric:e}",
                    shape.dims()
                );
            }
        }
    }
    Ok(report)
}

/// All indices if there are at most `max` of them, else `max` evenly spaced ones (first and last
/// included) so the same coordinates are checked on every run.
fn sample_indices(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        (0..n).collect()
    } else if max <= 1 {
        (0..max).collect()
    } else {
        (0..max).map(|j| j * (n - 1) / (max - 1)).collect()
    }
}

/// The value of a one-element tensor as f64.
fn scalar(t: &Tensor) -> Result<f64> {
    if t.elem_count() != 1 {
        bail!(
            "check_gradients: f must return a scalar, got shape {:?}",
            t.dims()
        );
    }
    t.to_dtype(DType::F64)?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_util::rand;
    use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

    /// y = x, with a deliberately doubled gradient.
    struct WrongGradIdentity;

    impl CustomOp1 for WrongGradIdentity {
        fn name(&self) -> &'static str {
            "wrong-grad-identity"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            let x = crate::cpu::contiguous::<f64>(s, l, self.name(), "x")?;
            Ok((CpuStorage::F64(x.to_vec()), l.shape().clone()))
        }
        fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some((g * 2.0)?))
        }
    }

    #[test]
    fn correct_gradient_passes() {
        let x = Var::from_tensor(&rand(1, (3, 4), 1.0, DType::F64)).unwrap();
        let r = rand(2, (3, 4), 1.0, DType::F64);
        let rep = check_gradients(&|t| t[0].sqr()?.mul(&r)?.sum_all(), &[x], 1e-6, 100).unwrap();
        assert_eq!(rep.checked, 12);
        assert!(rep.max_rel_err < 1e-6, "{rep:?}");
    }

    #[test]
    fn wrong_gradient_is_detected() {
        let x = Var::from_tensor(&rand(3, (3, 4), 1.0, DType::F64)).unwrap();
        let r = rand(4, (3, 4), 1.0, DType::F64);
        let rep = check_gradients(
            &|t| t[0].apply_op1(WrongGradIdentity)?.mul(&r)?.sum_all(),
            &[x],
            1e-6,
            100,
        )
        .unwrap();
        // a = 2n everywhere, so the relative error is 0.5.
        assert!(rep.max_rel_err > 0.4, "{rep:?}");
    }

    #[test]
    fn missing_gradient_is_an_error() {
        let x = Var::from_tensor(&rand(5, (2, 2), 1.0, DType::F64)).unwrap();
        let y = Var::from_tensor(&rand(6, (2, 2), 1.0, DType::F64)).unwrap();
        let err = check_gradients(&|t| t[0].sum_all(), &[x, y], 1e-6, 10).unwrap_err();
        assert!(err.to_string().contains("input 1"), "{err}");
    }

    #[test]
    fn sampling_is_bounded_and_restores_values() {
        let x0 = rand(7, (50,), 1.0, DType::F64);
        let x = Var::from_tensor(&x0).unwrap();
        let rep = check_gradients(
            &|t| t[0].sqr()?.sum_all(),
            std::slice::from_ref(&x),
            1e-6,
            7,
        )
        .unwrap();
        assert_eq!(rep.checked, 7);
        let diff = (x.as_tensor() - &x0)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
        assert_eq!(sample_indices(50, 7), vec![0, 8, 16, 24, 32, 40, 49]);
    }
}
