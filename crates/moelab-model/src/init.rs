//! Seeded initialisation: every matrix ~ N(0, init_std^2), every norm gain = 1.
//!
//! Each parameter draws from its own stream keyed by (seed, name), so the values do not depend on
//! construction order, thread count or device.

use candle_core::{Result, Tensor};
use candle_nn::VarMap;

use moelab_io::rng::SplitMix64;

/// Overwrites every matrix in `varmap` with seeded normal values; gains (1-D) keep their ones.
pub fn initialize(varmap: &VarMap, seed: u64, std: f64) -> Result<()> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("parameter map lock poisoned".into()))?;
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        if var.rank() < 2 {
            continue;
        }
        let values: Vec<f32> = SplitMix64::for_name(seed, name)
            .normals(var.elem_count())
            .into_iter()
            .map(|x| x * std as f32)
            .collect();
        let values = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&values)?;
    }
    Ok(())
}
