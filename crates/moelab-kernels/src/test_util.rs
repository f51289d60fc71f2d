//! Deterministic random tensors and comparisons for the unit tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Shape, Tensor};
use moelab_io::rng::SplitMix64;

/// Uniform values in [-1, 1).
pub fn uniform_vec(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.symmetric()).collect()
}

/// Uniform [-scale, scale) tensor of the given shape and dtype on CPU.
pub fn rand<S: Into<Shape>>(seed: u64, shape: S, scale: f64, dtype: DType) -> Tensor {
    let shape: Shape = shape.into();
    let v: Vec<f64> = uniform_vec(seed, shape.elem_count())
        .into_iter()
        .map(|x| x * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Largest absolute elementwise difference, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    a.to_vec1::<f64>()
        .unwrap()
        .iter()
        .zip(b.to_vec1::<f64>().unwrap())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Flattened f64 copy of a tensor.
pub fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}
