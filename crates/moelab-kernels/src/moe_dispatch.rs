//! MoE dispatch: permute tokens into expert order and un-permute the experts' outputs back with
//! the gate-weighted combine fused in, each one op with its backward (in place of index_select,
//! a broadcast multiply, zeros and index_add, and their gradient buffers).
//!
//! Both take a [`Routing`]: for each permuted row the token it came from. Rows are gathered and
//! scattered per token in row order, so results do not depend on the thread count. On the CPU
//! and (feature `cuda`) on CUDA they are fused ops (`kernels/moe_dispatch.cu`); on other devices
//! the same functions run the composed candle ops.

use std::sync::{Arc, OnceLock};

use crate::cpu::{check_float, check_same_dtype, contiguous, float_dispatch, map_rows, Acc, Elem};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result};
use candle_core::{Device, Shape, Tensor};

/// Which token each permuted row holds, and the inverse: each token's rows in order.
#[derive(Debug, Clone)]
pub struct Routing {
    n_tokens: usize,
    /// Rows of the permuted matrix.
    n_rows: usize,
    /// Empty for a routing planned on the device ([`Routing::from_device_index`]), which has
    /// only its device index.
    token_of_row: Vec<u32>,
    /// CSR over tokens: rows of token t are `rows[starts[t]..starts[t + 1]]`, ascending.
    starts: Vec<usize>,
    rows: Vec<u32>,
    /// The index as one u32 tensor (`token_of_row`, `starts`, `rows`) on the first non-CPU
    /// device it was asked for: uploaded once, shared by the forward and backward ops.
    device_index: OnceLock<Tensor>,
}

impl Routing {
    /// `token_of_row[r]` is the token row `r` of the permuted matrix was taken from.
    pub fn new(token_of_row: Vec<u32>, n_tokens: usize) -> Result<Arc<Self>> {
        if let Some((r, t)) = token_of_row
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= n_tokens)
        {
            bail!("moe routing: row {r} names token {t}, but there are {n_tokens} tokens");
        }
        if u32::try_from(token_of_row.len()).is_err() {
            bail!(
                "moe routing: {} rows exceed the u32 row index",
                token_of_row.len()
            );
        }
        let mut starts = vec![0usize; n_tokens + 1];
        for &t in &token_of_row {
            starts[t as usize + 1] += 1;
        }
        for i in 0..n_tokens {
            starts[i + 1] += starts[i];
        }
        let mut fill = starts.clone();
        let mut rows = vec![0u32; token_of_row.len()];
        for (r, &t) in token_of_row.iter().enumerate() {
            rows[fill[t as usize]] = r as u32;
            fill[t as usize] += 1;
        }
        Ok(Arc::new(Self {
            n_tokens,
            n_rows: token_of_row.len(),
            token_of_row,
            starts,
            rows,
            device_index: OnceLock::new(),
        }))
    }

    /// A routing from its packed index (`token_of_row` (n_rows), `starts` (n_tokens + 1),
    /// `rows` (n_rows): the layout of [`Routing::packed_index`]) computed on the device, with no
    /// host copy: only the fused CUDA ops and the composed ops off the CPU can use it.
    pub fn from_device_index(index: Tensor, n_tokens: usize, n_rows: usize) -> Result<Arc<Self>> {
        if index.dtype() != candle_core::DType::U32 || index.dims() != [2 * n_rows + n_tokens + 1] {
            bail!(
                "moe routing: a device index for {n_rows} rows and {n_tokens} tokens must be u32 of \
                 shape ({},), got {:?} {:?}",
                2 * n_rows + n_tokens + 1,
                index.dtype(),
                index.dims()
            );
        }
        if index.device().is_cpu() {
            bail!("moe routing: a device index must not be on the CPU (use Routing::new there)");
        }
        let device_index = OnceLock::new();
        let _ = device_index.set(index);
        Ok(Arc::new(Self {
            n_tokens,
            n_rows,
            token_of_row: Vec::new(),
            starts: Vec::new(),
            rows: Vec::new(),
            device_index,
        }))
    }

    /// Errors if this routing has no host index (it was planned on the device).
    fn check_host(&self, op: &str) -> Result<()> {
        if self.token_of_row.len() != self.n_rows {
            bail!("{op}: this routing was planned on a device and has no host index for the CPU");
        }
        Ok(())
    }

    fn rows_of(&self, token: usize) -> &[u32] {
        &self.rows[self.starts[token]..self.starts[token + 1]]
    }

    /// The index the CUDA kernels read, as one u32 vector: `token_of_row`, then the CSR
    /// `starts` (n_tokens + 1), then the CSR `rows`.
    pub fn packed_index(&self) -> Vec<u32> {
        let mut packed = Vec::with_capacity(2 * self.token_of_row.len() + self.n_tokens + 1);
        packed.extend_from_slice(&self.token_of_row);
        // Every start is at most the row count, which `new` checked fits in u32.
        packed.extend(self.starts.iter().map(|&s| s as u32));
        packed.extend_from_slice(&self.rows);
        packed
    }

    /// The number of tokens and of rows.
    #[cfg(feature = "cuda-emu")]
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.n_tokens, self.n_rows)
    }

    /// The whole index on `device` as one u32 tensor: `token_of_row` (rows), `starts`
    /// (tokens + 1), `rows` (rows). Cached for the first device asked; others get a fresh copy.
    fn device_index(&self, device: &Device) -> Result<Tensor> {
        if let Some(t) = self.device_index.get() {
            if t.device().same_device(device) {
                return Ok(t.clone());
            }
        }
        self.check_host("moe routing")?;
        let packed = self.packed_index();
        let len = packed.len();
        let t = Tensor::from_vec(packed, len, device)?;
        Ok(self.device_index.get_or_init(|| t.clone()).clone())
    }

    /// `token_of_row` on `device`, for the composed ops.
    fn index(&self, device: &Device) -> Result<Tensor> {
        let n = self.n_rows;
        if device.is_cpu() {
            self.check_host("moe routing")?;
            return Tensor::from_slice(&self.token_of_row, n, device);
        }
        self.device_index(device)?.narrow(0, 0, n)
    }

    /// Runs `f` on the CUDA storage of the device index (see [`Routing::device_index`]).
    #[cfg(feature = "cuda")]
    fn with_cuda_index<R>(
        &self,
        dev: &candle_core::CudaDevice,
        op: &str,
        f: impl FnOnce(&crate::cuda::moe_dispatch::DeviceRouting<'_>) -> Result<R>,
    ) -> Result<R> {
        let index = self.device_index(&Device::Cuda(dev.clone()))?;
        let (storage, layout) = index.storage_and_layout();
        let candle_core::Storage::Cuda(storage) = &*storage else {
            bail!("{op}: the routing index is not on the CUDA device");
        };
        let routing = crate::cuda::moe_dispatch::DeviceRouting::new(
            op,
            storage,
            layout,
            self.n_rows,
            self.n_tokens,
        )?;
        f(&routing)
    }
}

/// `x` (tokens, d) -> (rows, d): row r is `x[token_of_row[r]]`.
pub fn permute(x: &Tensor, routing: &Arc<Routing>) -> Result<Tensor> {
    check_float("moe permute", "x", x)?;
    let (tokens, _) = x.dims2()?;
    if tokens != routing.n_tokens {
        bail!(
            "moe permute: x has {tokens} tokens, the routing {}",
            routing.n_tokens
        );
    }
    if !crate::has_kernel(x) {
        return x.index_select(&routing.index(x.device())?, 0);
    }
    if x.device().is_cpu() {
        routing.check_host("moe permute")?;
    }
    x.contiguous()?.apply_op1(Permute(routing.clone()))
}

/// `rows` (rows, d) with `gates` (rows,) -> (tokens, d): token t gets the sum over its rows of
/// `gates[r] * rows[r]`, added in row order.
pub fn unpermute(rows: &Tensor, gates: &Tensor, routing: &Arc<Routing>) -> Result<Tensor> {
    check_float("moe unpermute", "rows", rows)?;
    check_same_dtype("moe unpermute", "gates", gates, rows)?;
    let (n, d) = rows.dims2()?;
    if n != routing.n_rows || gates.dims() != [n] {
        bail!(
            "moe unpermute: rows {:?} and gates {:?} do not match the routing's {} rows",
            rows.dims(),
            gates.dims(),
            routing.n_rows
        );
    }
    if rows.device().is_cpu() {
        routing.check_host("moe unpermute")?;
    }
    if !crate::has_kernel(rows) {
        let weighted = rows.broadcast_mul(&gates.unsqueeze(1)?)?;
        let zeros = Tensor::zeros((routing.n_tokens, d), rows.dtype(), rows.device())?;
        return zeros.index_add(&routing.index(rows.device())?, &weighted, 0);
    }
    rows.contiguous()?
        .apply_op2(&gates.contiguous()?, Unpermute(routing.clone()))
}

fn width(l: &Layout, op: &str) -> Result<usize> {
    match l.dims() {
        [_, d] => Ok(*d),
        dims => bail!("{op}: expected a matrix, got shape {dims:?}"),
    }
}

/// Gathers rows of `src` (row length d) into `dst`: dst row r = src row `index[r]`.
fn gather<T: Elem>(src: &[T], index: &[u32], d: usize) -> Vec<T> {
    let mut dst = vec![T::from_f64(0.0); index.len() * d];
    map_rows(&mut dst, d, index.len() * d, |r, out| {
        let s = index[r] as usize * d;
        out.copy_from_slice(&src[s..s + d]);
    });
    dst
}

struct Permute(Arc<Routing>);

impl Permute {
    fn fwd<T: Elem>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<T>(s, l, self.name(), "x")?;
        let d = width(l, self.name())?;
        let y = gather(x, &self.0.token_of_row, d);
        Ok((
            T::to_cpu_storage_owned(y),
            Shape::from((self.0.token_of_row.len(), d)),
        ))
    }
}

impl CustomOp1 for Permute {
    fn name(&self) -> &'static str {
        "moelab-moe-permute"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(crate::cpu::storage_dtype(s), self.name(), T => self.fwd::<T>(s, l))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.with_cuda_index(&s.device, self.name(), |routing| {
            crate::cuda::moe_dispatch::permute_fwd(self.name(), (s, l), routing)
        })
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // dx[t] = sum of g over t's rows: an un-permute with unit gates.
        let ones = Tensor::ones(g.dim(0)?, g.dtype(), g.device())?;
        let dx = g
            .contiguous()?
            .apply_op2_no_bwd(&ones, &Unpermute(self.0.clone()))?;
        Ok(Some(dx))
    }
}

struct Unpermute(Arc<Routing>);

impl Unpermute {
    fn fwd<T: Elem>(
        &self,
        (rs, rl): (&CpuStorage, &Layout),
        (gs, gl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let rows = contiguous::<T>(rs, rl, self.name(), "rows")?;
        let gates = contiguous::<T>(gs, gl, self.name(), "gates")?;
        let d = width(rl, self.name())?;
        let routing = &self.0;
        let mut out = vec![T::from_f64(0.0); routing.n_tokens * d];
        map_rows(&mut out, d, rows.len(), |t, out| {
            let mut sum = vec![<T::A as Acc>::ZERO; d];
            for &r in routing.rows_of(t) {
                let (r, gate) = (r as usize, gates[r as usize].to_acc());
                for (s, v) in sum.iter_mut().zip(&rows[r * d..(r + 1) * d]) {
                    *s += gate * v.to_acc();
                }
            }
            for (o, s) in out.iter_mut().zip(sum) {
                *o = T::from_acc(s);
            }
        });
        Ok((
            T::to_cpu_storage_owned(out),
            Shape::from((routing.n_tokens, d)),
        ))
    }
}

impl CustomOp2 for Unpermute {
    fn name(&self) -> &'static str {
        "moelab-moe-unpermute"
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
        self.0.with_cuda_index(&s1.device, self.name(), |routing| {
            crate::cuda::moe_dispatch::unpermute_fwd(self.name(), (s1, l1), (s2, l2), routing)
        })
    }

    fn bwd(
        &self,
        rows: &Tensor,
        gates: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, d) = rows.dims2()?;
        let both =
            rows.apply_op3_no_bwd(gates, &g.contiguous()?, &UnpermuteBackward(self.0.clone()))?;
        let d_rows = both.narrow(0, 0, n * d)?.reshape((n, d))?;
        let d_gates = both.narrow(0, n * d, n)?;
        Ok((Some(d_rows), Some(d_gates)))
    }
}

/// `(rows, gates, grad)` -> d_rows (rows, d) then d_gates (rows,), flat: with t the row's token,
/// `d_rows[r] = gates[r] grad[t]`, `d_gates[r] = <rows[r], grad[t]>`.
struct UnpermuteBackward(Arc<Routing>);

impl UnpermuteBackward {
    fn run<T: Elem>(
        &self,
        (rs, rl): (&CpuStorage, &Layout),
        (gs, gl): (&CpuStorage, &Layout),
        (ds, dl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let rows = contiguous::<T>(rs, rl, self.name(), "rows")?;
        let gates = contiguous::<T>(gs, gl, self.name(), "gates")?;
        let grad = contiguous::<T>(ds, dl, self.name(), "grad")?;
        let d = width(rl, self.name())?;
        let routing = &self.0;
        let n = routing.token_of_row.len();
        if grad.len() != routing.n_tokens * d {
            bail!(
                "{}: grad {:?} does not match the routing",
                self.name(),
                dl.dims()
            );
        }
        let mut out = vec![T::from_f64(0.0); n * d + n];
        let (d_rows, d_gates) = out.split_at_mut(n * d);
        let grad_of = |r: usize| {
            let t = routing.token_of_row[r] as usize;
            &grad[t * d..(t + 1) * d]
        };
        map_rows(d_rows, d, n * d, |r, out| {
            let gate = gates[r].to_acc();
            for (o, gv) in out.iter_mut().zip(grad_of(r)) {
                *o = T::from_acc(gate * gv.to_acc());
            }
        });
        map_rows(d_gates, 1, n * d, |r, out| {
            let mut dot = <T::A as Acc>::ZERO;
            for (gv, xv) in grad_of(r).iter().zip(&rows[r * d..(r + 1) * d]) {
                dot += gv.to_acc() * xv.to_acc();
            }
            out[0] = T::from_acc(dot);
        });
        Ok((T::to_cpu_storage_owned(out), Shape::from(n * d + n)))
    }
}

impl CustomOp3 for UnpermuteBackward {
    fn name(&self) -> &'static str {
        "moelab-moe-unpermute-backward"
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
        self.0.with_cuda_index(&s1.device, self.name(), |routing| {
            crate::cuda::moe_dispatch::unpermute_bwd(
                self.name(),
                (s1, l1),
                (s2, l2),
                (s3, l3),
                routing,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::gradcheck::check_gradients;
    use crate::test_util::{max_abs_diff, rand};
    use candle_core::{DType, Device, Var};

    /// 5 tokens, 7 rows; token 3 has no rows, token 0 three.
    fn routing() -> Arc<Routing> {
        Routing::new(vec![0, 2, 0, 4, 1, 0, 2], 5).unwrap()
    }

    fn composed(x: &Tensor, gates: &Tensor, index: &Tensor, n_tokens: usize) -> Tensor {
        let rows = x.index_select(index, 0).unwrap();
        let weighted = rows.broadcast_mul(&gates.unsqueeze(1).unwrap()).unwrap();
        let d = x.dim(1).unwrap();
        Tensor::zeros((n_tokens, d), x.dtype(), x.device())
            .unwrap()
            .index_add(index, &weighted, 0)
            .unwrap()
    }

    #[test]
    fn permute_then_unpermute_matches_the_composed_ops_forward_and_backward() {
        let r = routing();
        let index = Tensor::new(&[0u32, 2, 0, 4, 1, 0, 2], &Device::Cpu).unwrap();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let x = Var::from_tensor(&rand(1, (5, 6), 1.0, dtype)).unwrap();
            let gates = Var::from_tensor(&rand(2, 7, 1.0, dtype)).unwrap();
            let probe = rand(3, (5, 6), 1.0, dtype);
            let run = |fused: bool| {
                let y = if fused {
                    unpermute(&permute(x.as_tensor(), &r).unwrap(), gates.as_tensor(), &r).unwrap()
                } else {
                    composed(x.as_tensor(), gates.as_tensor(), &index, 5)
                };
                let g = (&y * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (
                    y,
                    g.get(&x).unwrap().clone(),
                    g.get(&gates).unwrap().clone(),
                )
            };
            let ((y, dx, dg), (ry, rdx, rdg)) = (run(true), run(false));
            for (a, b) in [(&y, &ry), (&dx, &rdx), (&dg, &rdg)] {
                let d = max_abs_diff(a, b);
                assert!(d < tol, "{dtype:?}: {d}");
            }
            // The token without rows gets zeros.
            let row3 = y.get(3).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(
                row3.to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap(),
                0.0
            );
        }
    }

    #[test]
    fn the_device_index_packs_rows_then_csr_and_is_built_once() {
        let r = routing();
        let index = r.device_index(&Device::Cpu).unwrap();
        // token_of_row, then starts (6), then each token's rows in order.
        let want: Vec<u32> = [
            vec![0, 2, 0, 4, 1, 0, 2],
            vec![0, 3, 4, 6, 6, 7],
            vec![0, 2, 5, 4, 1, 6, 3],
        ]
        .concat();
        assert_eq!(index.to_vec1::<u32>().unwrap(), want);
        assert_eq!(r.device_index(&Device::Cpu).unwrap().id(), index.id());
        let rows = r.index(&Device::Cpu).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(rows, want[..7]);
    }

    #[test]
    fn gradcheck_through_both() {
        let r = routing();
        let x = Var::from_tensor(&rand(4, (5, 3), 1.0, DType::F64)).unwrap();
        let gates = Var::from_tensor(&rand(5, 7, 1.0, DType::F64)).unwrap();
        let probe = rand(6, (5, 3), 1.0, DType::F64);
        let rep = check_gradients(
            &|t| {
                unpermute(&permute(&t[0], &r)?, &t[1], &r)?
                    .mul(&probe)?
                    .sum_all()
            },
            &[x, gates],
            1e-6,
            100,
        )
        .unwrap();
        assert_eq!(rep.checked, 15 + 7);
        assert!(rep.max_rel_err < 1e-6, "{rep:?}");
    }

    #[test]
    fn bad_routing_and_shapes_are_errors() {
        let err = Routing::new(vec![0, 5], 5).unwrap_err().to_string();
        assert!(err.contains("row 1 names token 5"), "{err}");
        let r = routing();
        let x = rand(7, (4, 3), 1.0, DType::F32);
        assert!(permute(&x, &r)
            .unwrap_err()
            .to_string()
            .contains("4 tokens"));
        let rows = rand(8, (6, 3), 1.0, DType::F32);
        let gates = rand(9, 6, 1.0, DType::F32);
        assert!(unpermute(&rows, &gates, &r).is_err());
    }
}
