//! The AdamW update of one parameter in place, and the sum of squares of a gradient (the global
//! grad norm's terms). On the CPU the update is three multi-threaded passes (first moment,
//! second moment, parameter) over f32 buffers, no temporaries; on CUDA (feature `cuda`) one
//! kernel pass per tensor (`kernels/adamw.cu`). Both give the composed update's bits.

use crate::cpu::contiguous;
use candle_core::{
    bail, CpuStorage, CustomOp1, DType, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor,
};
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

impl AdamWUpdate {
    /// The fused AdamW kernel's scalar arguments, in its argument order: grad scale, keep1,
    /// take1, keep2, take2, 1/correction1, 1/correction2, eps, lr, 1 - decay; each rounded to
    /// f32 as the CPU update rounds them.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    pub(crate) fn kernel_scalars(&self) -> [f32; 10] {
        [
            self.grad_scale as f32,
            self.beta1 as f32,
            (1.0 - self.beta1) as f32,
            self.beta2 as f32,
            (1.0 - self.beta2) as f32,
            (1.0 / self.correction1) as f32,
            (1.0 / self.correction2) as f32,
            self.eps as f32,
            self.lr as f32,
            (1.0 - self.decay) as f32,
        ]
    }
}

/// Whether [`adamw_update`] takes these tensors: all f32 of one shape on one device, the CPU or
/// (feature `cuda`) a CUDA device.
pub fn fused_adamw_supported(param: &Tensor, m: &Tensor, v: &Tensor, grad: &Tensor) -> bool {
    let device = param.device();
    (device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda()))
        && [param, m, v, grad].iter().all(|t| {
            t.device().same_device(device) && t.dtype() == DType::F32 && t.dims() == param.dims()
        })
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
            "adamw_update: param {:?}, m {:?}, v {:?} and grad {:?} must be f32 tensors of one shape on one CPU or CUDA device",
            param.dims(),
            m.dims(),
            v.dims(),
            grad.dims()
        );
    }
    let grad = grad.contiguous()?;
    #[cfg(feature = "cuda")]
    if param.device().is_cuda() {
        return cuda_update(param, m, v, &grad, update);
    }
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

/// `sum(t^2)` of one tensor, where it was computed.
#[derive(Debug)]
pub enum SquareSum {
    /// An f32 CPU tensor's sum, in f64.
    Host(f64),
    /// An f32 scalar tensor on the tensor's device, not yet read (callers add these up and read
    /// the total once).
    Device(Tensor),
}

/// `sum(t^2)` (the global gradient norm's terms): on the host for an f32 CPU tensor (one read,
/// 8 f32 lanes per chunk summed in f64, chunks in order: independent of the thread count); on
/// CUDA (feature `cuda`; f32, bf16, f16) a two-pass block reduction in f32 left on the device;
/// elsewhere the composed `t.to_dtype(f32).sqr().sum_all()`.
pub fn sum_of_squares(t: &Tensor) -> Result<SquareSum> {
    let t = t.contiguous()?;
    if t.device().is_cpu() && t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else {
            bail!("sum_of_squares: CPU tensor without CPU storage");
        };
        let x = contiguous::<f32>(storage, layout, "sum_of_squares", "the tensor")?;
        return Ok(SquareSum::Host(host_sum_of_squares(x)));
    }
    if crate::has_kernel(&t) && !t.device().is_cpu() {
        return Ok(SquareSum::Device(t.apply_op1_no_bwd(&SumOfSquares)?));
    }
    Ok(SquareSum::Device(t.to_dtype(DType::F32)?.sqr()?.sum_all()?))
}

fn host_sum_of_squares(x: &[f32]) -> f64 {
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
    sums.iter().sum()
}

/// `sum(t^2)` as an f32 scalar tensor on the tensor's device.
struct SumOfSquares;

impl CustomOp1 for SumOfSquares {
    fn name(&self) -> &'static str {
        "moelab-sum-of-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l, self.name(), "the tensor")?;
        let sum = host_sum_of_squares(x) as f32;
        Ok((CpuStorage::F32(vec![sum]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::adamw::sum_of_squares(self.name(), s, l)
    }
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

/// The CUDA update: one kernel over param, m and v (written) and grad, under candle's write
/// locks of the three (taken one inside the other) after candle's aliasing checks have shown
/// the four tensors use distinct storage (shared storage would deadlock the nested locks).
#[cfg(feature = "cuda")]
fn cuda_update(
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    update: &AdamWUpdate,
) -> Result<()> {
    param.inplace_op3(m, v, &Distinct)?;
    m.inplace_op3(v, grad, &Distinct)?;
    param.inplace_op2(grad, &Distinct)?;
    v.inplace_op2(grad, &Distinct)?;
    with_cuda_mut(param, |ps, pl| {
        with_cuda_mut(m, |ms, ml| {
            with_cuda_mut(v, |vs, vl| {
                let (gs, gl) = grad.storage_and_layout();
                let candle_core::Storage::Cuda(gs) = &*gs else {
                    bail!("adamw_update: the gradient is not on the CUDA device");
                };
                crate::cuda::adamw::adamw_step((ps, pl), (ms, ml), (vs, vl), (gs, gl), update)
            })
        })
    })
}

/// Does nothing: applied in place, it makes candle check that the sources share no storage
/// with the destination.
#[cfg(feature = "cuda")]
struct Distinct;

#[cfg(feature = "cuda")]
impl InplaceOp2 for Distinct {
    fn name(&self) -> &'static str {
        "moelab-adamw-distinct"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        Ok(())
    }

    fn cuda_fwd(
        &self,
        _: &mut candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<()> {
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl InplaceOp3 for Distinct {
    fn name(&self) -> &'static str {
        "moelab-adamw-distinct"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        Ok(())
    }

    fn cuda_fwd(
        &self,
        _: &mut candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<()> {
        Ok(())
    }
}

/// Runs `f` on `t`'s CUDA storage under candle's write lock (an in-place op whose body is `f`).
#[cfg(feature = "cuda")]
fn with_cuda_mut(
    t: &Tensor,
    f: impl FnOnce(&mut candle_core::CudaStorage, &Layout) -> Result<()>,
) -> Result<()> {
    t.inplace_op1(&WithCudaMut(std::cell::RefCell::new(Some(f))))
}

#[cfg(feature = "cuda")]
struct WithCudaMut<F>(std::cell::RefCell<Option<F>>);

#[cfg(feature = "cuda")]
impl<F: FnOnce(&mut candle_core::CudaStorage, &Layout) -> Result<()>> candle_core::InplaceOp1
    for WithCudaMut<F>
{
    fn name(&self) -> &'static str {
        "moelab-adamw"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("adamw_update: a CPU tensor on the CUDA path")
    }

    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        match self.0.borrow_mut().take() {
            Some(f) => f(s, l),
            None => bail!("adamw_update: in-place body run twice"),
        }
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
            let SquareSum::Host(got) = sum_of_squares(&t).unwrap() else {
                panic!("an f32 CPU tensor is summed on the host");
            };
            assert!(
                (got - f64::from(want)).abs() < 1e-4 * f64::from(want),
                "{got} {want}"
            );
        }
        // Other dtypes: an f32 scalar tensor.
        let half = rand(3, 5, 1.0, DType::BF16);
        let SquareSum::Device(sum) = sum_of_squares(&half).unwrap() else {
            panic!("a bf16 tensor is summed as a tensor");
        };
        let want = half
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(sum.dtype(), DType::F32);
        assert_eq!(
            sum.to_scalar::<f32>().unwrap(),
            want.to_scalar::<f32>().unwrap()
        );
    }

    #[test]
    fn the_device_sum_op_matches_the_host_sum() {
        // The op the CUDA path applies, run on the CPU; a transposed (non-contiguous) input.
        let t = rand(4, (300, 70), 1.5, DType::F32).t().unwrap();
        let SquareSum::Host(host) = sum_of_squares(&t).unwrap() else {
            panic!("an f32 CPU tensor is summed on the host");
        };
        let op = t
            .contiguous()
            .unwrap()
            .apply_op1_no_bwd(&SumOfSquares)
            .unwrap();
        assert!(op.dims().is_empty());
        assert_eq!(op.to_scalar::<f32>().unwrap(), host as f32);
        let want: f64 = t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum();
        assert!((host - want).abs() < 1e-5 * want, "{host} {want}");
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
        assert!(err.contains("must be f32 tensors of one shape"), "{err}");
    }
}
