//! Seeded initialisation: every matrix ~ N(0, init_std^2), every norm gain = 1.
//!
//! Each parameter draws from its own stream keyed by (seed, name), so the values do not depend on
//! construction order, thread count or device.

use candle_core::{Result, Tensor};
use candle_nn::VarMap;

use moelab_io::rng::SplitMix64;

/// Overwrites every matrix in `varmap` with seeded normal values; gains (1-D) keep their ones.
pub fn initialize(varmap: &VarMap, seed: u64, std: f64) -> Result<()> {
    initialize_sharded(varmap, seed, std, 0, 0..0)
}

/// [`initialize`] for a model whose stacked routed-expert tensors (`.experts.` in the name)
/// hold only experts `experts` of `n_experts`: each gets exactly the rows those experts have in
/// the whole model's tensor (the whole tensor's stream is drawn and cut, so the values do not
/// depend on the layout). An empty range means the whole model.
pub fn initialize_sharded(
    varmap: &VarMap,
    seed: u64,
    std: f64,
    n_experts: usize,
    experts: std::ops::Range<usize>,
) -> Result<()> {
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
        let count = var.elem_count();
        let sharded = !experts.is_empty()
            && name.contains(".experts.")
            && var.dims().first() == Some(&experts.len());
        let (skip, total) = if sharded {
            let per_expert = count / experts.len();
            (experts.start * per_expert, n_experts * per_expert)
        } else {
            (0, count)
        };
        let values: Vec<f32> = SplitMix64::for_name(seed, name)
            .normals(total)
            .into_iter()
            .skip(skip)
            .take(count)
            .map(|x| x * std as f32)
            .collect();
        let values = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&values)?;
    }
    Ok(())
}
