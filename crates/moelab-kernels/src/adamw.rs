//! The AdamW update of one parameter in place on the CPU: three multi-threaded passes (first
//! moment, second moment, parameter) over f32 buffers, no temporaries.

use crate::cpu::contiguous;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// One step's constants. `decay` is the decoupled weight decay already multiplied by the
/// learning rate (0 for parameters without decay); `grad_scale` is the clipping factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWUpdate {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator floor.
    pub eps: f64,
    /// `lr * weight_decay`, or 0.
    pub decay: f64,
    /// Bias corrections `1 - beta^step`.
    pub correction1: f64,
    /// As above for the second moment.
    pub correction2: f64,
    /// Gradients are multiplied by it first (global-norm clipping).
    pub grad_scale: f64,
}

/// Whether [`adamw_update`] takes these tensors: all f32 on the CPU, one shape.
pub fn fused_adamw_supported(param: &Tensor, m: &Tensor, v: &Tensor, grad: &Tensor) -> bool {
    [param, m, v, grad]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.dims() == param.dims())
}

/// In place: `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2` with `g = grad_scale grad`, then
/// `param = param (1 - decay) - lr (m / c1) / (sqrt(v / c2) + eps)`: the arithmetic of the
/// composed tensor version, element by element, so both give the same f32 results up to rounding
/// order. Errors unless [`fused_adamw_supported`].
pub fn adamw_update(
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    update: &AdamWUpdate,
) -> Result<()> {
    if !fused_adamw_supported(param, m, v, grad) {
        bail!(
            "adamw_update: param {:?}, m {:?}, v {:?} and grad {:?} must be f32 CPU tensors of one shape",
            param.dims(),
            m.dims(),
            v.dims(),
            grad.dims()
        );
    }
    let grad = grad.contiguous()?;
    m.inplace_op2(
        &grad,
        &Moment {
            first: true,
            u: *update,
        },
    )?;
    v.inplace_op2(
        &grad,
        &Moment {
            first: false,
            u: *update,
        },
    )?;
    param.inplace_op3(m, v, &Apply(*update))
}

/// Elements per parallel chunk; tensors of at most one chunk (norm gains, routers, biases) are
/// updated on the calling thread, where a hand-off to the pool would cost more than the work.
const CHUNK: usize = 1 << 14;

/// `f` over matching chunks of `dst` and `srcs`, in parallel when there is more than one.
fn for_chunks<const N: usize>(
    dst: &mut [f32],
    srcs: [&[f32]; N],
    f: impl Fn(&mut [f32], [&[f32]; N]) + Send + Sync,
) {
    let pieces = |c: usize| srcs.map(|s| &s[c * CHUNK..((c + 1) * CHUNK).min(s.len())]);
    if dst.len() <= CHUNK {
        f(dst, srcs);
    } else {
        dst.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, d)| f(d, pieces(c)));
    }
}

/// `sum(t^2)` in f64, one read of an f32 CPU tensor (the global gradient norm's terms), or
/// `None` for other tensors. Sums 8 f32 lanes per chunk, chunks in order: the result does not
/// depend on the thread count.
pub fn sum_of_squares(t: &Tensor) -> Result<Option<f64>> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return Ok(None);
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        return Ok(None);
    };
    let x = contiguous::<f32>(storage, layout, "adamw_update", "the tensor")?;
    let chunk_sum = |c: &[f32]| -> f64 {
        let (lanes8, rest) = c.as_chunks::<8>();
        let mut lanes = [0f32; 8];
        for l in lanes8 {
            for i in 0..8 {
                lanes[i] += l[i] * l[i];
            }
        }
        let mut sum: f64 = lanes.iter().map(|&v| f64::from(v)).sum();
        for v in rest {
            sum += f64::from(v * v);
        }
        sum
    };
    let sums: Vec<f64> = if x.len() <= CHUNK {
        vec![chunk_sum(x)]
    } else {
        x.par_chunks(CHUNK).map(chunk_sum).collect()
    };
    Ok(Some(sums.iter().sum()))
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("adamw_update: {what} is not f32");
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => bail!("adamw_update: {what} is not contiguous"),
    }
}

/// Updates one moment from the gradient.
struct Moment {
    first: bool,
    u: AdamWUpdate,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "moelab-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let moment = slice_mut(dst, dst_l, "the moment")?;
        let grad = contiguous::<f32>(gs, gl, "adamw_update", "the gradient")?;
        // Constants rounded to f32 as candle rounds a tensor-by-scalar op's scalar, so that this
        // and the composed version (ZeRO-1's shards, other devices) agree bit for bit.
        let scale = self.u.grad_scale as f32;
        let first = self.first;
        let beta = if first { self.u.beta1 } else { self.u.beta2 };
        let (keep, take) = (beta as f32, (1.0 - beta) as f32);
        for_chunks(moment, [grad], |m, [g]| {
            for (m, g) in m.iter_mut().zip(g) {
                let g = g * scale;
                let term = if first { g } else { g * g };
                *m = *m * keep + term * take;
            }
        });
        Ok(())
    }
}

/// Applies the update to the parameter from the new moments.
struct Apply(AdamWUpdate);

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "moelab-adamw-apply"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let param = slice_mut(dst, dst_l, "the parameter")?;
        let (m, v) = (
            contiguous::<f32>(ms, ml, "adamw_update", "m")?,
            contiguous::<f32>(vs, vl, "adamw_update", "v")?,
        );
        let u = &self.0;
        // As in the moments: candle divides by a scalar as a multiply by its f32 reciprocal.
        let (inv_c1, inv_c2) = ((1.0 / u.correction1) as f32, (1.0 / u.correction2) as f32);
        let (eps, lr, keep) = (u.eps as f32, u.lr as f32, (1.0 - u.decay) as f32);
        for_chunks(param, [m, v], |p, [m, v]| {
            for (p, (m, v)) in p.iter_mut().zip(m.iter().zip(v)) {
                let step = (m * inv_c1) / ((v * inv_c2).sqrt() + eps);
                *p = *p * keep - step * lr;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_util::{max_abs_diff, rand};
    use candle_core::Device;

    /// The composed version, as tensor ops.
    fn composed(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, u: &AdamWUpdate) -> [Tensor; 3] {
        let g = (g * u.grad_scale).unwrap();
        let m = ((m * u.beta1).unwrap() + (&g * (1.0 - u.beta1)).unwrap()).unwrap();
        let v = ((v * u.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - u.beta2)).unwrap()).unwrap();
        let step = ((&m / u.correction1).unwrap()
            / ((&v / u.correction2).unwrap().sqrt().unwrap() + u.eps).unwrap())
        .unwrap();
        let p = ((p * (1.0 - u.decay)).unwrap() - (step * u.lr).unwrap()).unwrap();
        [p, m, v]
    }

    #[test]
    fn matches_the_composed_update_over_several_steps() {
        // 50_000 elements: several parallel chunks and a ragged last one.
        let n = 50_000;
        let p = rand(1, n, 1.0, DType::F32);
        let zeros = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let (fp, fm, fv) = (
            p.copy().unwrap(),
            zeros.copy().unwrap(),
            zeros.copy().unwrap(),
        );
        let (mut rp, mut rm, mut rv) = (p, zeros.clone(), zeros);
        for step in 1..=3u64 {
            let g = rand(10 + step, n, 0.5, DType::F32);
            let u = AdamWUpdate {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                decay: 1e-3,
                correction1: 1.0 - 0.9f64.powi(step as i32),
                correction2: 1.0 - 0.95f64.powi(step as i32),
                grad_scale: 0.7,
            };
            adamw_update(&fp, &fm, &fv, &g, &u).unwrap();
            [rp, rm, rv] = composed(&rp, &rm, &rv, &g, &u);
        }
        // Bit for bit: the sharded optimizer and other devices run the composed version.
        for (fused, reference) in [(&fp, &rp), (&fm, &rm), (&fv, &rv)] {
            assert_eq!(max_abs_diff(fused, reference), 0.0);
        }
        // The parameter moved.
        assert!(max_abs_diff(&fp, &rand(1, n, 1.0, DType::F32)) > 1e-3);
    }

    #[test]
    fn sum_of_squares_matches_the_tensor_expression() {
        for n in [5, 50_000] {
            let t = rand(3, n, 2.0, DType::F32);
            let want = t
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let got = sum_of_squares(&t).unwrap().unwrap();
            assert!(
                (got - f64::from(want)).abs() < 1e-4 * f64::from(want),
                "{got} {want}"
            );
        }
        let half = rand(3, 5, 1.0, DType::BF16);
        assert_eq!(sum_of_squares(&half).unwrap(), None);
    }

    #[test]
    fn refuses_what_it_does_not_take() {
        let a = rand(1, 8, 1.0, DType::F32);
        let b = rand(2, 9, 1.0, DType::F32);
        let half = a.to_dtype(DType::BF16).unwrap();
        let u = AdamWUpdate {
            lr: 1.0,
            beta1: 0.9,
            beta2: 0.9,
            eps: 1e-8,
            decay: 0.0,
            correction1: 1.0,
            correction2: 1.0,
            grad_scale: 1.0,
        };
        assert!(!fused_adamw_supported(&a, &a, &a, &b));
        assert!(!fused_adamw_supported(&half, &a, &a, &a));
        let err = adamw_update(&a, &a, &a, &b, &u).unwrap_err().to_string();
        assert!(err.contains("must be f32 CPU tensors"), "{err}");
    }
}
