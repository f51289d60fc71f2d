//! The SwiGLU gate `silu(gate) * up` as one op with its backward (two candle ops and their four
//! gradient buffers otherwise). With feature `cuda` both passes also run as CUDA kernels
//! (`kernels/swiglu.cu`).

use crate::cpu::{
    check_float, check_same_dtype, contiguous, float_dispatch, vectorized, Acc, Elem,
};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `silu(gate) * up` elementwise, `silu(x) = x sigmoid(x)`; `gate` and `up` of one shape. On the
/// CPU and CUDA one fused pass forward and one backward; elsewhere the composed candle ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_float("swiglu", "gate", gate)?;
    check_same_dtype("swiglu", "up", up, gate)?;
    if gate.dims() != up.dims() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        );
    }
    if !crate::has_kernel(gate) {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

/// sigmoid in the accumulation type.
#[inline(always)]
fn sigmoid<A: Acc>(x: A) -> A {
    A::ONE / (A::ONE + (-x).exp())
}

struct SwiGlu;

impl SwiGlu {
    fn fwd<T: Elem>(
        &self,
        (gs, gl): (&CpuStorage, &Layout),
        (us, ul): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let gate = contiguous::<T>(gs, gl, self.name(), "gate")?;
        let up = contiguous::<T>(us, ul, self.name(), "up")?;
        let mut y = vec![T::from_f64(0.0); gate.len()];
        y.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
            let at = c * CHUNK;
            vectorized(
                #[inline(always)]
                || {
                    for ((o, g), u) in out.iter_mut().zip(&gate[at..]).zip(&up[at..]) {
                        let g = g.to_acc();
                        *o = T::from_acc(g * sigmoid(g) * u.to_acc());
                    }
                },
            )
        });
        Ok((T::to_cpu_storage_owned(y), gl.shape().clone()))
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "moelab-swiglu"
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
        crate::cuda::swiglu::swiglu_fwd(self.name(), (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluBackward)?;
        let dgate = both.narrow(0, 0, n)?.reshape(gate.shape())?;
        let dup = both.narrow(0, n, n)?.reshape(gate.shape())?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// `(gate, up, grad)` -> dgate then dup in one flat storage: with `s = sigmoid(gate)`,
/// `dgate = grad up s (1 + gate (1 - s))`, `dup = grad gate s`.
struct SwiGluBackward;

impl SwiGluBackward {
    fn run<T: Elem>(
        &self,
        (gs, gl): (&CpuStorage, &Layout),
        (us, ul): (&CpuStorage, &Layout),
        (ds, dl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let gate = contiguous::<T>(gs, gl, self.name(), "gate")?;
        let up = contiguous::<T>(us, ul, self.name(), "up")?;
        let grad = contiguous::<T>(ds, dl, self.name(), "grad")?;
        let n = gate.len();
        if up.len() != n || grad.len() != n {
            bail!(
                "{}: gate {:?}, up {:?} and grad {:?} differ in shape",
                self.name(),
                gl.dims(),
                ul.dims(),
                dl.dims()
            );
        }
        let mut out = vec![T::from_f64(0.0); 2 * n];
        let (dgate, dup) = out.split_at_mut(n);
        dgate
            .par_chunks_mut(CHUNK)
            .zip(dup.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let at = c * CHUNK;
                let inputs = gate[at..].iter().zip(&up[at..]).zip(&grad[at..]);
                for ((dg, du), ((g, u), d)) in dg.iter_mut().zip(du).zip(inputs) {
                    let (g, u, d) = (g.to_acc(), u.to_acc(), d.to_acc());
                    let s = sigmoid(g);
                    *dg = T::from_acc(
                        d * u * s * (<T::A as Acc>::ONE + g * (<T::A as Acc>::ONE - s)),
                    );
                    *du = T::from_acc(d * g * s);
                }
            });
        Ok((T::to_cpu_storage_owned(out), Shape::from(2 * n)))
    }
}

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "moelab-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(crate::cpu::storage_dtype(s1), self.name(), T => self.run::<T>((s1, l1), (s2, l2), (s3, l3)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::swiglu::swiglu_bwd(self.name(), (s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::gradcheck::check_gradients;
    use crate::test_util::{max_abs_diff, rand};
    use candle_core::{DType, Var};

    #[test]
    fn forward_and_backward_match_the_composed_ops() {
        // 40_000 elements: several parallel chunks and a ragged last one.
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            for shape in [(3, 5), (200, 200)] {
                let gate = Var::from_tensor(&rand(1, shape, 4.0, dtype)).unwrap();
                let up = Var::from_tensor(&rand(2, shape, 2.0, dtype)).unwrap();
                let probe = rand(3, shape, 1.0, DType::F64);
                let run = |fused: bool| {
                    let y = if fused {
                        swiglu(gate.as_tensor(), up.as_tensor()).unwrap()
                    } else {
                        let f64 = |v: &Var| v.as_tensor().to_dtype(DType::F64).unwrap();
                        (f64(&gate).silu().unwrap() * f64(&up)).unwrap()
                    };
                    let y = y.to_dtype(DType::F64).unwrap();
                    let g = (&y * &probe)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let get = |v: &Var| g.get(v).unwrap().to_dtype(DType::F64).unwrap();
                    (y, get(&gate), get(&up))
                };
                let ((y, dg, du), (ry, rdg, rdu)) = (run(true), run(false));
                let rel = |a: &Tensor, b: &Tensor| {
                    max_abs_diff(a, b)
                        / b.abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap()
                };
                let errs = [rel(&y, &ry), rel(&dg, &rdg), rel(&du, &rdu)];
                assert!(
                    errs.iter().all(|e| *e < tol),
                    "{dtype:?} {shape:?}: {errs:?}"
                );
            }
        }
    }

    #[test]
    fn gradcheck_gate_and_up() {
        let gate = Var::from_tensor(&rand(4, (3, 7), 3.0, DType::F64)).unwrap();
        let up = Var::from_tensor(&rand(5, (3, 7), 2.0, DType::F64)).unwrap();
        let r = rand(6, (3, 7), 1.0, DType::F64);
        let rep = check_gradients(
            &|t| swiglu(&t[0], &t[1])?.mul(&r)?.sum_all(),
            &[gate, up],
            1e-6,
            100,
        )
        .unwrap();
        assert_eq!(rep.checked, 42);
        assert!(rep.max_rel_err < 1e-5, "{rep:?}");
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let a = rand(7, (2, 3), 1.0, DType::F32);
        let b = rand(8, (3, 2), 1.0, DType::F32);
        let err = swiglu(&a, &b).unwrap_err().to_string();
        assert!(err.contains("differ in shape"), "{err}");
    }
}
