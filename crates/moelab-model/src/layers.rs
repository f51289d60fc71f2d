//! Small building blocks: a bias-free linear map, RMSNorm and the SwiGLU feed-forward.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Matrices start at zero here and get their seeded values from [`crate::init`]; candle's own
/// random init cannot be seeded on the CPU.
pub(crate) fn matrix(vb: &VarBuilder, rows: usize, cols: usize, name: &str) -> Result<Tensor> {
    vb.get_with_hints((rows, cols), name, Init::Const(0.0))
}

/// `y = x W^T` without bias, applied over the last dimension of any-rank input.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    /// A `(out_dim, in_dim)` weight named `{vb}.weight`.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: matrix(&vb, out_dim, in_dim, "weight")?,
        })
    }

    /// Wraps an existing weight (the tied LM head).
    pub fn from_weight(weight: Tensor) -> Self {
        Self { weight }
    }

    /// The `(out_dim, in_dim)` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Applies the map to the last dimension of `x`, in `x`'s dtype (the f32 master weight is
    /// cast on use under mixed precision; the cast is a no-op otherwise).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let weight = self.weight.to_dtype(x.dtype())?;
        if x.rank() == 2 {
            // No reshapes: each would be a node whose gradient backward copies.
            return x.matmul(&weight.t()?);
        }
        let mut dims = x.dims().to_vec();
        let rows = x.elem_count() / in_dim;
        let y = x.reshape((rows, in_dim))?.matmul(&weight.t()?)?;
        if let Some(last) = dims.last_mut() {
            *last = out_dim;
        }
        y.reshape(dims)
    }
}

/// Root-mean-square normalisation with a learned gain, through our differentiable kernel.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// A gain of width `dim` named `{vb}.weight`, initialised to one.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }

    /// Normalises over the last dimension, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        moelab_kernels::rms_norm(x, &self.weight.to_dtype(x.dtype())?, self.eps)
    }
}

/// The SwiGLU feed-forward `down(silu(gate(x)) * up(x))`: the dense FFN and the shared experts.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl SwiGlu {
    /// `gate`/`up` map `dim -> hidden`, `down` maps back.
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate: Linear::new(dim, hidden, vb.pp("gate_proj"))?,
            up: Linear::new(dim, hidden, vb.pp("up_proj"))?,
            down: Linear::new(hidden, dim, vb.pp("down_proj"))?,
        })
    }

    /// Applies the FFN to the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = moelab_kernels::swiglu(&self.gate.forward(x)?, &self.up.forward(x)?)?;
        self.down.forward(&hidden)
    }
}
