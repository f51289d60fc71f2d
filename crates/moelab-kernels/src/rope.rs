//! Rotary position embedding in the non-interleaved ("rotate_half") layout used by Hugging Face
//! Llama/OLMoE.

use crate::cpu::{check_float, check_same_dtype, contiguous, float_dispatch, map_rows, Elem};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

/// Rotary embedding of `x (B, H, T, D)` with `cos`, `sin` of shape `(T, D/2)`:
/// `y1 = x1*cos - x2*sin`, `y2 = x2*cos + x1*sin` for the two halves of the last dim.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_float("rope", "x", x)?;
    check_same_dtype("rope", "cos", cos, x)?;
    check_same_dtype("rope", "sin", sin, x)?;
    let (_b, _h, t, d) = match x.dims4() {
        Ok(dims) => dims,
        Err(_) => bail!("rope: x must be (B, H, T, D), got shape {:?}", x.dims()),
    };
    if d % 2 != 0 {
        bail!("rope: head dim D must be even, got {d}");
    }
    for (name, table) in [("cos", cos), ("sin", sin)] {
        if table.dims() != [t, d / 2] {
            bail!(
                "rope: {name} must have shape ({t}, {}) for x {:?}, got {:?}",
                d / 2,
                x.dims(),
                table.dims()
            );
        }
    }
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}

/// Builds `(cos, sin)`, each `(seq_len, head_dim/2)`, with `inv_freq[i] = theta^(-2i/head_dim)`,
/// computed in f64 and then cast to `dtype`.
pub fn rope_tables(
    seq_len: usize,
    head_dim: usize,
    theta: f64,
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!("rope_tables: head_dim must be even and positive, got {head_dim}");
    }
    if theta.is_nan() || theta <= 0.0 {
        bail!("rope_tables: theta must be positive, got {theta}");
    }
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(seq_len * half);
    let mut sin = Vec::with_capacity(seq_len * half);
    for t in 0..seq_len {
        for i in 0..half {
            let inv_freq = theta.powf(-2.0 * i as f64 / head_dim as f64);
            let (s, c) = (t as f64 * inv_freq).sin_cos();
            cos.push(c);
            sin.push(s);
        }
    }
    let cos = Tensor::from_vec(cos, (seq_len, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (seq_len, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

struct Rope;

impl Rope {
    #[allow(clippy::too_many_arguments)]
    fn fwd<T: Elem>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<T>(xs, xl, self.name(), "x")?;
        let cos = contiguous::<T>(cs, cl, self.name(), "cos")?;
        let sin = contiguous::<T>(ss, sl, self.name(), "sin")?;
        let (t, d) = match xl.dims() {
            [_, _, t, d] => (*t, *d),
            dims => bail!("{}: x must be (B, H, T, D), got {dims:?}", self.name()),
        };
        let half = d / 2;
        if d % 2 != 0 || cl.dims() != [t, half] || sl.dims() != [t, half] {
            bail!(
                "{}: cos {:?} / sin {:?} do not match x {:?}",
                self.name(),
                cl.dims(),
                sl.dims(),
                xl.dims()
            );
        }
        let mut y = vec![T::from_f64(0.0); x.len()];
        map_rows(&mut y, d, x.len(), |row, out| {
            let pos = row % t;
            let xr = &x[row * d..(row + 1) * d];
            let (c, s) = (
                &cos[pos * half..(pos + 1) * half],
                &sin[pos * half..(pos + 1) * half],
            );
            let (x1, x2) = xr.split_at(half);
            let (y1, y2) = out.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i].to_acc(), x2[i].to_acc());
                let (c, s) = (c[i].to_acc(), s[i].to_acc());
                y1[i] = T::from_acc(a * c - b * s);
                y2[i] = T::from_acc(b * c + a * s);
            }
        });
        Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "moelab-rope"
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
        float_dispatch!(crate::cpu::storage_dtype(s1), self.name(), T => self.fwd::<T>(s1, l1, s2, l2, s3, l3))
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
        crate::cuda::rows::rope_fwd(self.name(), s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The rotation is orthogonal, so its transpose is the same rotation by -angle.
        let dx = g.contiguous()?.apply_op3(cos, &sin.neg()?, Rope)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::gradcheck::check_gradients;
    use crate::test_util::{max_abs_diff, rand};
    use candle_core::Var;

    fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.dim(3).unwrap() / 2;
        let x1 = x.narrow(3, 0, half).unwrap();
        let x2 = x.narrow(3, half, half).unwrap();
        let (c, s) = (cos.unsqueeze(0).unwrap(), sin.unsqueeze(0).unwrap());
        let (c, s) = (c.unsqueeze(0).unwrap(), s.unsqueeze(0).unwrap());
        let y1 = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
        let y2 = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
        Tensor::cat(&[y1, y2], 3).unwrap()
    }

    #[test]
    fn forward_matches_reference() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-13)] {
            for (b, h, t, d) in [(2, 3, 5, 8), (2, 8, 64, 64)] {
                let x = rand(1, (b, h, t, d), 2.0, dtype);
                let (cos, sin) = rope_tables(t, d, 10_000.0, &Device::Cpu, dtype).unwrap();
                let d = max_abs_diff(&rope(&x, &cos, &sin).unwrap(), &reference(&x, &cos, &sin));
                assert!(d < tol, "{dtype:?}: {d}");
            }
        }
    }

    #[test]
    fn tables_values() {
        let (cos, sin) = rope_tables(3, 4, 100.0, &Device::Cpu, DType::F64).unwrap();
        let (cos, sin) = (cos.to_vec2::<f64>().unwrap(), sin.to_vec2::<f64>().unwrap());
        // inv_freq = [1, 100^-0.5 = 0.1]
        assert!((cos[2][0] - 2f64.cos()).abs() < 1e-15);
        assert!((sin[2][1] - 0.2f64.sin()).abs() < 1e-15);
        assert_eq!(cos[0], vec![1.0, 1.0]);
        assert!(rope_tables(3, 5, 100.0, &Device::Cpu, DType::F32).is_err());
    }

    #[test]
    fn rejects_bad_shapes() {
        let x = rand(2, (1, 2, 4, 6), 1.0, DType::F32);
        let (cos, sin) = rope_tables(5, 6, 1e4, &Device::Cpu, DType::F32).unwrap();
        assert!(rope(&x, &cos, &sin).is_err());
        let x = rand(2, (2, 4, 6), 1.0, DType::F32);
        assert!(rope(&x, &cos, &sin).is_err());
    }

    #[test]
    fn gradcheck_rope() {
        let x = Var::from_tensor(&rand(3, (2, 2, 5, 6), 1.0, DType::F64)).unwrap();
        let (cos, sin) = rope_tables(5, 6, 10.0, &Device::Cpu, DType::F64).unwrap();
        let r = rand(4, (2, 2, 5, 6), 1.0, DType::F64);
        let rep = check_gradients(
            &|t| rope(&t[0], &cos, &sin)?.mul(&r)?.sum_all(),
            &[x],
            1e-6,
            200,
        )
        .unwrap();
        println!("rope: {rep:?}");
        assert!(rep.max_rel_err < 1e-5, "{rep:?}");
    }
}
