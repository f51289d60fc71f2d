//! AdamW with f32 moments, decoupled weight decay with name-based exclusions, global-norm clipping,
//! and state that round-trips through safetensors (candle-nn's AdamW keeps none and cannot clip).
//! [`AdamW`] holds every parameter's moments; [`ShardedAdamW`] (ZeRO-1, `train.shard_optimizer`)
//! holds only this rank's share of the flat parameter space. Both apply [`adamw_update`], the
//! one place the update math lives.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};
use moelab_kernels::SquareSum;

use crate::dist::Collective;
use crate::TrainError;

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

/// Which elements of an update get weight decay.
#[derive(Debug, Clone, Copy)]
pub enum Decay<'a> {
    /// Every element.
    On,
    /// None.
    Off,
    /// 1.0 where decayed, 0.0 where not (a shard spanning several parameters).
    Mask(&'a Tensor),
}

/// Bias corrections of update number `step` (1-based): (1 - beta1^step, 1 - beta2^step).
pub fn bias_corrections(params: &AdamWParams, step: u64) -> (f64, f64) {
    (
        1.0 - params.beta1.powf(step as f64),
        1.0 - params.beta2.powf(step as f64),
    )
}

/// One AdamW update of a run of elements (a parameter, or a shard of the flat parameter space),
/// all f32 and of one shape: returns the new (parameter, first moment, second moment). `grad`
/// is already scaled by the clipping factor; `corrections` come from [`bias_corrections`].
/// A fused kernel replacing it takes exactly these inputs.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    decay: Decay<'_>,
    params: &AdamWParams,
    lr: f64,
    corrections: (f64, f64),
) -> Result<(Tensor, Tensor, Tensor)> {
    let AdamWParams {
        beta1,
        beta2,
        eps,
        weight_decay,
    } = *params;
    let m = ((m * beta1)? + (grad * (1.0 - beta1))?)?;
    let v = ((v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
    let update = ((&m / corrections.0)? / ((&v / corrections.1)?.sqrt()? + eps)?)?;
    let decayed = match decay {
        Decay::On => (param * (1.0 - lr * weight_decay))?,
        Decay::Off => param.clone(),
        // Where decayed, the very product `Decay::On` forms, so a shard of a parameter is
        // updated bit for bit as the whole parameter is.
        Decay::Mask(mask) => mask
            .ne(0.0)?
            .where_cond(&(param * (1.0 - lr * weight_decay))?, param)?,
    };
    let next = (decayed - (update * lr)?)?;
    Ok((next, m, v))
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
                match moelab_kernels::sum_of_squares(g)? {
                    SquareSum::Host(sq) => host += sq,
                    // Summed on the device; the total is read once, below.
                    SquareSum::Device(sq) => {
                        total = Some(match total {
                            Some(t) => (t + sq)?,
                            None => sq,
                        })
                    }
                }
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
        let corrections = bias_corrections(&self.params, self.step);
        for slot in &mut self.slots {
            let Some(grad) = grads.get(&slot.name) else {
                continue;
            };
            // Gradients of matmuls against parameters are themselves tracked by candle; detaching
            // keeps each step's backward graph from being chained into the moments forever.
            let grad = grad.detach();
            let param = slot.var.as_tensor();
            if moelab_kernels::fused_adamw_supported(param, &slot.m, &slot.v, &grad) {
                let AdamWParams {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } = self.params;
                let update = moelab_kernels::AdamWUpdate {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    decay: if slot.decay { lr * weight_decay } else { 0.0 },
                    correction1: corrections.0,
                    correction2: corrections.1,
                    grad_scale,
                };
                moelab_kernels::adamw_update(param, &slot.m, &slot.v, &grad, &update)?;
                continue;
            }
            let grad = (grad.to_dtype(DType::F32)? * grad_scale)?;
            let param = slot.var.as_tensor().detach().to_dtype(DType::F32)?;
            let decay = if slot.decay { Decay::On } else { Decay::Off };
            let (next, m, v) = adamw_update(
                &param,
                &grad,
                &slot.m,
                &slot.v,
                decay,
                &self.params,
                lr,
                corrections,
            )?;
            slot.m = m;
            slot.v = v;
            slot.var.set(&next.to_dtype(slot.var.dtype())?)?;
        }
        Ok(())
    }

    /// Bytes of optimizer state (the two f32 moments) this process holds.
    pub fn state_bytes(&self) -> usize {
        self.slots.iter().map(|s| 2 * 4 * s.m.elem_count()).sum()
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

/// A bucket of consecutive parameters of the flat parameter space and this rank's block of it.
#[derive(Debug)]
struct ShardBucket {
    /// Indices of its parameters in [`ShardedAdamW::params`].
    members: std::ops::Range<usize>,
    /// Elements of its parameters.
    len: usize,
    /// Elements of each rank's block: the bucket padded to a multiple of the world size, split.
    block: usize,
    /// First moment of this rank's block, f32.
    m: Tensor,
    /// Second moment, f32.
    v: Tensor,
    /// 1.0 where the block's element gets weight decay.
    decay: Tensor,
}

/// This rank's block of each bucket of gradients, summed over ranks; `absent` marks (0.0) the
/// elements of parameters no rank had a gradient for.
#[derive(Debug)]
pub struct ShardGrads {
    blocks: Vec<Tensor>,
    present: Vec<Option<Tensor>>,
}

/// ZeRO-1 AdamW: the parameters (sorted by name) form one flat space cut into buckets; each
/// rank keeps the moments of its block of every bucket only, so the optimizer state per rank
/// is 1/world of [`AdamW`]'s. A step reduce-scatters the gradients, updates this rank's block
/// of the f32 master weights and all-gathers the weights. The state reads and writes as the
/// same per-parameter tensors as [`AdamW`]'s, so checkpoints do not depend on the world size.
#[derive(Debug)]
pub struct ShardedAdamW {
    params: Vec<(String, Var, bool)>,
    buckets: Vec<ShardBucket>,
    hyper: AdamWParams,
    step: u64,
    rank: usize,
    world: usize,
}

impl ShardedAdamW {
    /// Optimises `vars` as rank `rank` of `world`, in buckets of about `bucket_elements`; names
    /// containing any of `no_decay` get no weight decay.
    pub fn new(
        mut vars: Vec<(String, Var)>,
        hyper: AdamWParams,
        no_decay: &[String],
        (rank, world): (usize, usize),
        bucket_elements: usize,
    ) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params: Vec<(String, Var, bool)> = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = !no_decay.iter().any(|p| name.contains(p.as_str()));
                (name, var, decay)
            })
            .collect();
        let sizes: Vec<usize> = params.iter().map(|(_, v, _)| v.elem_count()).collect();
        let device = match params.first() {
            Some((_, var, _)) => var.device().clone(),
            None => candle_core::Device::Cpu,
        };
        let world = world.max(1);
        let mut buckets = Vec::new();
        for members in crate::dist::data_parallel::buckets(&sizes, bucket_elements) {
            let len: usize = sizes[members.clone()].iter().sum();
            let block = len.div_ceil(world);
            let mut mask = Vec::with_capacity(block * world);
            for (_, var, decay) in &params[members.clone()] {
                let value = if *decay { 1f32 } else { 0.0 };
                mask.extend(std::iter::repeat_n(value, var.elem_count()));
            }
            mask.resize(block * world, 0.0);
            let decay =
                Tensor::from_slice(&mask[rank * block..(rank + 1) * block], block, &device)?;
            let zeros = Tensor::zeros(block, DType::F32, &device)?;
            buckets.push(ShardBucket {
                members,
                len,
                block,
                m: zeros.clone(),
                v: zeros,
                decay,
            });
        }
        Ok(Self {
            params,
            buckets,
            hyper,
            step: 0,
            rank,
            world,
        })
    }

    /// Updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Bytes of optimizer state (the two f32 moments) this rank holds.
    pub fn state_bytes(&self) -> usize {
        self.buckets.iter().map(|b| 2 * 4 * b.block).sum()
    }

    /// The bucket's elements of `tensors` (one per member parameter, None = zeros), flat f32,
    /// padded to `block * world`.
    fn pack(&self, bucket: &ShardBucket, tensors: &[Option<Tensor>]) -> Result<Tensor> {
        let mut flat = Vec::with_capacity(tensors.len() + 1);
        for ((_, var, _), t) in self.params[bucket.members.clone()].iter().zip(tensors) {
            flat.push(match t {
                Some(t) => t.detach().to_dtype(DType::F32)?.flatten_all()?,
                None => Tensor::zeros(var.elem_count(), DType::F32, var.device())?,
            });
        }
        let padding = bucket.block * self.world - bucket.len;
        if padding > 0 {
            let device = flat.first().map(|t| t.device().clone());
            flat.push(Tensor::zeros(
                padding,
                DType::F32,
                &device.unwrap_or(candle_core::Device::Cpu),
            )?);
        }
        Tensor::cat(&flat, 0)
    }

    /// This rank's block of a packed bucket.
    fn own_block(&self, bucket: &ShardBucket, packed: &Tensor) -> Result<Tensor> {
        packed.narrow(0, self.rank * bucket.block, bucket.block)
    }

    /// Reduce-scatters `grads` (this rank's, by parameter name): every rank gets its block of
    /// every bucket of the sum over ranks.
    pub fn reduce_scatter(
        &self,
        comm: &dyn Collective,
        grads: &HashMap<String, Tensor>,
    ) -> std::result::Result<ShardGrads, TrainError> {
        let mut present: Vec<u64> = self
            .params
            .iter()
            .map(|(name, _, _)| u64::from(grads.contains_key(name)))
            .collect();
        comm.all_reduce_max_u64(&mut present);
        let mut out = ShardGrads {
            blocks: Vec::with_capacity(self.buckets.len()),
            present: Vec::with_capacity(self.buckets.len()),
        };
        for bucket in &self.buckets {
            let members = &self.params[bucket.members.clone()];
            let local: Vec<Option<Tensor>> = members
                .iter()
                .map(|(n, _, _)| grads.get(n).cloned())
                .collect();
            let packed = self.pack(bucket, &local)?;
            out.blocks.push(comm.reduce_scatter_tensor(&packed)?);
            let flags = &present[bucket.members.clone()];
            out.present.push(if flags.iter().all(|&p| p == 1) {
                None
            } else {
                let mut mask = Vec::with_capacity(bucket.block * self.world);
                for ((_, var, _), &p) in members.iter().zip(flags) {
                    mask.extend(std::iter::repeat_n(p as f32, var.elem_count()));
                }
                mask.resize(bucket.block * self.world, 0.0);
                let block = &mask[self.rank * bucket.block..(self.rank + 1) * bucket.block];
                Some(Tensor::from_slice(block, bucket.block, bucket.m.device())?)
            });
        }
        Ok(out)
    }

    /// Global L2 norm of the summed gradients (each rank holds a block), the same on all ranks.
    pub fn grad_norm(
        &self,
        comm: &dyn Collective,
        grads: &ShardGrads,
    ) -> std::result::Result<f64, TrainError> {
        let mut sum = [0f64];
        for block in &grads.blocks {
            // The full optimizer's per-tensor sums, so both norms agree to f64 rounding.
            sum[0] += match moelab_kernels::sum_of_squares(block)? {
                SquareSum::Host(sq) => sq,
                SquareSum::Device(sq) => f64::from(sq.to_scalar::<f32>()?),
            };
        }
        comm.all_reduce_f64(&mut sum);
        Ok(sum[0].sqrt())
    }

    /// Applies one update to this rank's blocks with learning rate `lr` (gradients scaled by
    /// `grad_scale`, the clipping factor) and all-gathers the new weights into the parameters.
    /// Parameters no rank had a gradient for are left alone.
    pub fn step(
        &mut self,
        comm: &dyn Collective,
        grads: &ShardGrads,
        lr: f64,
        grad_scale: f64,
    ) -> std::result::Result<(), TrainError> {
        self.step += 1;
        let corrections = bias_corrections(&self.hyper, self.step);
        let mut moments = Vec::with_capacity(self.buckets.len());
        for (i, bucket) in self.buckets.iter().enumerate() {
            let members = &self.params[bucket.members.clone()];
            let current: Vec<Option<Tensor>> = members
                .iter()
                .map(|(_, var, _)| Some(var.as_tensor().clone()))
                .collect();
            let param = self.own_block(bucket, &self.pack(bucket, &current)?)?;
            let grad = (&grads.blocks[i] * grad_scale)?;
            let (mut next, mut m, mut v) = adamw_update(
                &param,
                &grad,
                &bucket.m,
                &bucket.v,
                Decay::Mask(&bucket.decay),
                &self.hyper,
                lr,
                corrections,
            )?;
            if let Some(present) = &grads.present[i] {
                let absent = (present.ones_like()? - present)?;
                let keep = |new: &Tensor, old: &Tensor| -> Result<Tensor> {
                    (new * present)? + (old * &absent)?
                };
                next = keep(&next, &param)?;
                m = keep(&m, &bucket.m)?;
                v = keep(&v, &bucket.v)?;
            }
            let gathered = comm.all_gather_tensor(&next)?;
            self.unpack(bucket, &gathered, &mut |var, t| {
                var.set(&t.to_dtype(var.dtype())?)
            })?;
            moments.push((m, v));
        }
        for (bucket, (m, v)) in self.buckets.iter_mut().zip(moments) {
            bucket.m = m;
            bucket.v = v;
        }
        Ok(())
    }

    /// Calls `each` with every member parameter of `bucket` and its part of `packed`.
    fn unpack(
        &self,
        bucket: &ShardBucket,
        packed: &Tensor,
        each: &mut dyn FnMut(&Var, Tensor) -> Result<()>,
    ) -> Result<()> {
        let mut offset = 0;
        for (_, var, _) in &self.params[bucket.members.clone()] {
            let n = var.elem_count();
            each(var, packed.narrow(0, offset, n)?.reshape(var.shape())?)?;
            offset += n;
        }
        Ok(())
    }

    /// The moments as [`AdamW::state`] names them (`m.{name}`, `v.{name}`, whole parameters),
    /// gathered from all ranks (every rank must call it), plus the step count.
    pub fn state(
        &self,
        comm: &dyn Collective,
    ) -> std::result::Result<(u64, Vec<(String, Tensor)>), TrainError> {
        let mut tensors = Vec::with_capacity(2 * self.params.len());
        for bucket in &self.buckets {
            let m = comm.all_gather_tensor(&bucket.m)?;
            let v = comm.all_gather_tensor(&bucket.v)?;
            let mut offset = 0;
            for (name, var, _) in &self.params[bucket.members.clone()] {
                let n = var.elem_count();
                for (prefix, all) in [("m", &m), ("v", &v)] {
                    let t = all.narrow(0, offset, n)?.reshape(var.shape())?;
                    tensors.push((format!("{prefix}.{name}"), t));
                }
                offset += n;
            }
        }
        Ok((self.step, tensors))
    }

    /// Restores this rank's blocks from moments saved by [`AdamW::state`] or
    /// [`ShardedAdamW::state`] at any world size; the error names a missing or misshapen tensor.
    pub fn load_state(
        &mut self,
        step: u64,
        tensors: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        if tensors.len() != 2 * self.params.len() {
            return Err(format!(
                "optimizer state holds {} tensors, the model needs {}",
                tensors.len(),
                2 * self.params.len()
            ));
        }
        let mut blocks = Vec::with_capacity(self.buckets.len());
        for bucket in &self.buckets {
            let mut pair = Vec::with_capacity(2);
            for prefix in ["m", "v"] {
                let mut saved = Vec::new();
                for (name, var, _) in &self.params[bucket.members.clone()] {
                    let key = format!("{prefix}.{name}");
                    let t = tensors
                        .get(&key)
                        .ok_or_else(|| format!("optimizer state lacks `{key}`"))?;
                    if t.dims() != var.dims() {
                        return Err(format!(
                            "optimizer tensor `{key}` has shape {:?}, the model needs {:?}",
                            t.dims(),
                            var.dims()
                        ));
                    }
                    let t = t
                        .to_device(var.device())
                        .map_err(|e| format!("`{key}`: {e}"))?;
                    saved.push(Some(t));
                }
                let packed = self.pack(bucket, &saved).map_err(|e| e.to_string())?;
                pair.push(self.own_block(bucket, &packed).map_err(|e| e.to_string())?);
            }
            blocks.push(pair);
        }
        for (bucket, mut pair) in self.buckets.iter_mut().zip(blocks) {
            bucket.v = pair.pop().unwrap_or_else(|| bucket.v.clone());
            bucket.m = pair.pop().unwrap_or_else(|| bucket.m.clone());
        }
        self.step = step;
        Ok(())
    }
}

/// What the learner needs of its optimizer, whether each rank holds every moment ([`AdamW`])
/// or its share of them ([`ShardedAdamW`], `train.shard_optimizer`): sum the gradients over
/// the ranks and measure them, then update with them.
pub trait Optimizer {
    /// Sums `grads` (this rank's, by parameter name) over the ranks of `comm`, keeps the result
    /// for [`Optimizer::update`] and returns the global gradient norm (the same on every rank).
    fn reduce(
        &mut self,
        comm: &dyn Collective,
        grads: HashMap<String, Tensor>,
    ) -> std::result::Result<f64, TrainError>;
    /// Applies the gradients [`Optimizer::reduce`] kept, scaled by `grad_scale` (the clipping
    /// factor), at learning rate `lr`.
    fn update(
        &mut self,
        comm: &dyn Collective,
        lr: f64,
        grad_scale: f64,
    ) -> std::result::Result<(), TrainError>;
    /// Drops the gradients [`Optimizer::reduce`] kept, for a step whose update is skipped.
    fn discard(&mut self);
    /// The moments by name (whole parameters, gathered if sharded: every rank must call it)
    /// and the update count, as a checkpoint stores them.
    fn state(
        &self,
        comm: &dyn Collective,
    ) -> std::result::Result<(u64, Vec<(String, Tensor)>), TrainError>;
    /// Restores the state a checkpoint stored at any world size.
    fn load_state(
        &mut self,
        step: u64,
        tensors: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String>;
    /// Bytes of optimizer state this rank holds.
    fn state_bytes(&self) -> usize;
}

/// [`AdamW`] with every moment on every rank; gradients are all-reduced.
pub struct ReplicatedOptimizer {
    adamw: AdamW,
    params: Vec<(String, Var)>,
    reduced: HashMap<String, Tensor>,
}

impl ReplicatedOptimizer {
    /// Optimises `params` (sorted by name) with `adamw`.
    pub fn new(adamw: AdamW, params: Vec<(String, Var)>) -> Self {
        Self {
            adamw,
            params,
            reduced: HashMap::new(),
        }
    }
}

impl Optimizer for ReplicatedOptimizer {
    fn reduce(
        &mut self,
        comm: &dyn Collective,
        mut grads: HashMap<String, Tensor>,
    ) -> std::result::Result<f64, TrainError> {
        crate::dist::data_parallel::all_reduce_gradients(comm, &self.params, &mut grads)?;
        let norm = self.adamw.grad_norm(&grads)?;
        self.reduced = grads;
        Ok(norm)
    }

    fn update(
        &mut self,
        _comm: &dyn Collective,
        lr: f64,
        grad_scale: f64,
    ) -> std::result::Result<(), TrainError> {
        let grads = std::mem::take(&mut self.reduced);
        Ok(self.adamw.step(&grads, lr, grad_scale)?)
    }

    fn discard(&mut self) {
        self.reduced.clear();
    }

    fn state(
        &self,
        _comm: &dyn Collective,
    ) -> std::result::Result<(u64, Vec<(String, Tensor)>), TrainError> {
        Ok(self.adamw.state()?)
    }

    fn load_state(
        &mut self,
        step: u64,
        tensors: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        self.adamw.load_state(step, tensors)
    }

    fn state_bytes(&self) -> usize {
        self.adamw.state_bytes()
    }
}

/// [`ShardedAdamW`]: gradients are reduce-scattered, each rank updates its blocks.
pub struct ShardedOptimizer {
    adamw: ShardedAdamW,
    reduced: Option<ShardGrads>,
}

impl ShardedOptimizer {
    /// Steps with `adamw`.
    pub fn new(adamw: ShardedAdamW) -> Self {
        Self {
            adamw,
            reduced: None,
        }
    }
}

impl Optimizer for ShardedOptimizer {
    fn reduce(
        &mut self,
        comm: &dyn Collective,
        grads: HashMap<String, Tensor>,
    ) -> std::result::Result<f64, TrainError> {
        let shards = self.adamw.reduce_scatter(comm, &grads)?;
        drop(grads);
        let norm = self.adamw.grad_norm(comm, &shards)?;
        self.reduced = Some(shards);
        Ok(norm)
    }

    fn update(
        &mut self,
        comm: &dyn Collective,
        lr: f64,
        grad_scale: f64,
    ) -> std::result::Result<(), TrainError> {
        let shards = self.reduced.take().ok_or_else(|| {
            TrainError::Argument("the sharded optimizer was asked to update before reducing".into())
        })?;
        self.adamw.step(comm, &shards, lr, grad_scale)
    }

    fn discard(&mut self) {
        self.reduced = None;
    }

    fn state(
        &self,
        comm: &dyn Collective,
    ) -> std::result::Result<(u64, Vec<(String, Tensor)>), TrainError> {
        self.adamw.state(comm)
    }

    fn load_state(
        &mut self,
        step: u64,
        tensors: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        self.adamw.load_state(step, tensors)
    }

    fn state_bytes(&self) -> usize {
        self.adamw.state_bytes()
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

    #[test]
    fn sharded_on_one_rank_matches_adamw_and_saves_the_same_names() {
        let w = || Var::new(&[[1.0f32, -2.0, 3.0], [0.5, 0.25, -1.0]], &Device::Cpu).unwrap();
        let b = || Var::new(&[0.1f32, 0.2], &Device::Cpu).unwrap();
        let vars = |w: &Var, b: &Var| {
            vec![
                ("w".to_string(), w.clone()),
                ("norm.b".to_string(), b.clone()),
            ]
        };
        let (w1, b1, w2, b2) = (w(), b(), w(), b());
        let no_decay = ["norm".to_string()];
        let mut full = AdamW::new(vars(&w1, &b1), params(0.1), &no_decay).unwrap();
        // Buckets of 4 elements: w alone (6), b alone (2).
        let mut sharded =
            ShardedAdamW::new(vars(&w2, &b2), params(0.1), &no_decay, (0, 1), 4).unwrap();
        let comm = crate::dist::Single;
        for step in 0..3 {
            let s = step as f32;
            let grads = HashMap::from([
                (
                    "w".to_string(),
                    Tensor::new(&[[0.5f32 + s, -1.0, 0.0], [2.0, -s, 1.0]], &Device::Cpu).unwrap(),
                ),
                (
                    "norm.b".to_string(),
                    Tensor::new(&[1.0f32, -s], &Device::Cpu).unwrap(),
                ),
            ]);
            full.step(&grads, 0.01, 0.5).unwrap();
            let shards = sharded.reduce_scatter(&comm, &grads).unwrap();
            let norm = sharded.grad_norm(&comm, &shards).unwrap();
            assert!((norm - full.grad_norm(&grads).unwrap()).abs() < 1e-6);
            sharded.step(&comm, &shards, 0.01, 0.5).unwrap();
        }
        let close = |a: &Var, b: &Var| {
            let a = a
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = b
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            a.iter()
                .zip(&b)
                .all(|(x, y)| (x - y).abs() <= 1e-6 * x.abs().max(1.0))
        };
        assert!(close(&w1, &w2) && close(&b1, &b2));
        let (_, a) = full.state().unwrap();
        let (step, gathered) = sharded.state(&comm).unwrap();
        assert_eq!(step, 3);
        let names = |v: &[(String, Tensor)]| {
            let mut n: Vec<String> = v.iter().map(|(n, _)| n.clone()).collect();
            n.sort();
            n
        };
        assert_eq!(names(&a), names(&gathered));
        assert_eq!(sharded.state_bytes(), full.state_bytes());
        // The state loads back into a sharded optimizer and gives the same tensors.
        let saved: HashMap<String, Tensor> = gathered.into_iter().collect();
        let mut again =
            ShardedAdamW::new(vars(&w(), &b()), params(0.1), &no_decay, (0, 1), 4).unwrap();
        again.load_state(3, &saved).unwrap();
        let (_, c) = again.state(&comm).unwrap();
        for (name, t) in c {
            let want = saved[&name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want,
                "{name}"
            );
        }
        let mut bad = saved.clone();
        bad.remove("v.w");
        assert!(again.load_state(3, &bad).unwrap_err().contains("tensors"));
    }
}
