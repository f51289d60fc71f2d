//! Causal (grouped-query) attention without the `T x T` score matrix: the tiled online softmax
//! of FlashAttention-2 (Dao 2023, Algorithm 1 forward, Algorithm 2 backward) on CPU.
//!
//! The forward op returns one flat buffer: the output `O (B*H*T*D)` followed by the per-row
//! log-sum-exp `L (B*H*T)` of the scaled scores. [`flash_attention`] narrows it to `O`, which is a
//! free, contiguous view, so backward gets `L` back through candle's `res` argument: no state in
//! the op and no second pass over the scores to recompute it. The CUDA kernels
//! (`kernels/flash_attention.cu`, feature `cuda`) use the same layouts; this file is their CPU
//! reference.

use crate::cpu::{
    check_float, contiguous, gemm_into, vectorized, Acc, Gemm, GemmElem, PAR_THRESHOLD,
};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows per tile (`B_r` in the paper): one key tile is reused from cache by this many rows.
const QUERY_TILE: usize = 64;
/// Keys per tile (`B_c` in the paper): the running max and sum are rescaled once per key tile.
const KEY_TILE: usize = 64;

/// Causal attention like [`crate::causal_attention`] (same shapes, errors and results), computed
/// tile by tile in O(T*D) memory per head instead of materialising the `T x T` scores.
///
/// This is the model's attention. Off the CPU it is [`crate::causal_attention`] unless
/// `run.kernels = "fused"` ([`crate::kernel_choice`]): the CUDA kernels
/// ([`flash_attention_fused`]) pass the emulation (feature `cuda-emu`) but are not yet shown
/// faster than the composed ops on a device.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let op = "flash_attention";
    let dims = check_inputs(op, q, k, v, scale)?;
    // On CUDA the kernels run only when chosen (`run.kernels`; off by default until the device
    // shows them faster) and the head dim fits them; otherwise the composed ops.
    let fused_on_cuda = cfg!(feature = "cuda")
        && q.device().is_cuda()
        && crate::use_fused(crate::FusedOp::FlashAttention)
        && dims.d <= crate::launch::FA_MAX_D;
    if !q.device().is_cpu() && !fused_on_cuda {
        return crate::causal_attention(q, k, v, scale);
    }
    apply(q, k, v, scale, dims)
}

/// [`flash_attention`] that always runs the fused op: the tiled CPU code, or on CUDA the kernels
/// of `kernels/flash_attention.cu` (f32 inside, head dim D at most 128), never the composed
/// fallback. The cuda_ops harness checks the kernels through it.
pub fn flash_attention_fused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = check_inputs("flash_attention_fused", q, k, v, scale)?;
    apply(q, k, v, scale, dims)
}

/// Runs the forward op on checked inputs and returns `O` in the input dtype.
fn apply(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, dims: Dims) -> Result<Tensor> {
    let dtype = q.dtype();
    // bf16/f16 run in f32: L stored in half precision would make backward's exp(S - L) off by
    // several percent, and the kernels accumulate in f32 for these types anyway.
    let work = match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        dt => dt,
    };
    let prep = |x: &Tensor| x.to_dtype(work)?.contiguous();
    let packed = prep(q)?.apply_op3(&prep(k)?, &prep(v)?, FlashAttention { scale, dims })?;
    let out = packed
        .narrow(0, 0, dims.q_len())?
        .reshape((dims.b, dims.h, dims.t, dims.d))?;
    out.to_dtype(dtype)
}

/// Shapes shared by the forward and backward ops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) kv: usize,
    pub(crate) t: usize,
    pub(crate) d: usize,
}

impl Dims {
    /// Elements of q (and of O and dQ).
    pub(crate) fn q_len(&self) -> usize {
        self.b * self.h * self.t * self.d
    }
    /// Elements of k (and of v, dK and dV).
    pub(crate) fn kv_len(&self) -> usize {
        self.b * self.kv * self.t * self.d
    }
    /// Elements of L (one per query row).
    pub(crate) fn lse_len(&self) -> usize {
        self.b * self.h * self.t
    }
    /// Query heads served by each kv head.
    fn rep(&self) -> usize {
        self.h / self.kv
    }
    /// Multiply-adds of one score pass over the causal triangle, to decide on rayon.
    fn work(&self) -> usize {
        self.b * self.h * self.t * (self.t + 1) / 2 * self.d
    }
}

/// The checks every causal attention op makes (`attention::check_inputs`), plus the ones this
/// kernel needs.
fn check_inputs(op: &str, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Dims> {
    let (b, h, kv, t, d) = crate::attention::check_inputs(op, q, k, v)?;
    check_float(op, "q", q)?;
    if d == 0 {
        bail!(
            "{op}: head dim D must be at least 1, got shape {:?}",
            q.dims()
        );
    }
    if !scale.is_finite() {
        bail!("{op}: scale must be finite, got {scale}");
    }
    Ok(Dims { b, h, kv, t, d })
}

/// A float type the kernels compute in directly (f32, f64): storage and accumulation coincide.
trait Float: Acc + GemmElem + std::ops::MulAssign {}
impl Float for f32 {}
impl Float for f64 {}

/// Errors unless a contiguous input holds exactly `len` elements.
fn sized<'a, F: Float>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
    len: usize,
) -> Result<&'a [F]> {
    let x = contiguous::<F>(s, l, op, what)?;
    if x.len() != len {
        bail!(
            "{op}: {what} has {} elements, expected {len} (shape {:?})",
            x.len(),
            l.dims()
        );
    }
    Ok(x)
}

/// Dot product with eight independent partial sums, so the compiler can vectorise it while the
/// summation order (and so the result) stays fixed.
#[inline(always)]
fn dot<F: Acc>(a: &[F], b: &[F]) -> F {
    let mut part = [F::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            part[l] += x[l] * y[l];
        }
    }
    let mut s =
        ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    s
}

/// One chunk of each of three outputs, as rayon's `zip` hands them over.
type Chunks3<'a, F> = ((&'a mut [F], &'a mut [F]), &'a mut [F]);

/// Runs `f(index, chunks...)` over three equally split outputs, on rayon when `parallel`. Each
/// index is handled by exactly one thread in a fixed order, so results do not depend on the
/// thread count.
fn for_each_group<F: Send>(
    parallel: bool,
    a: (&mut [F], usize),
    b: (&mut [F], usize),
    c: (&mut [F], usize),
    f: impl Fn(usize, &mut [F], &mut [F], &mut [F]) -> Result<()> + Send + Sync,
) -> Result<()> {
    if a.1 == 0 || b.1 == 0 || c.1 == 0 {
        return Ok(());
    }
    let zipped = |(i, ((x, y), z)): (usize, Chunks3<'_, F>)| f(i, x, y, z);
    if parallel {
        a.0.par_chunks_mut(a.1)
            .zip(b.0.par_chunks_mut(b.1))
            .zip(c.0.par_chunks_mut(c.1))
            .enumerate()
            .try_for_each(zipped)
    } else {
        a.0.chunks_mut(a.1)
            .zip(b.0.chunks_mut(b.1))
            .zip(c.0.chunks_mut(c.1))
            .enumerate()
            .try_for_each(zipped)
    }
}

/// Forward of one (batch, query head): Algorithm 1 of FlashAttention-2 with the causal mask.
/// `q`, `out`: (T, D) of this head; `k`, `v`: (T, D) of its kv head; `lse`: (T,). The tile
/// products `S = Q_i K_j^T` and `O_i += P V_j` are gemm calls on this thread (the caller runs
/// one head per task); the online softmax runs between them on the `S` tile.
#[inline(always)]
fn forward_head<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    (t, d): (usize, usize),
    scale: F,
    out: &mut [F],
    lse: &mut [F],
) -> Result<()> {
    let zero = <F as Acc>::ZERO;
    let mut row_max = [<F as Acc>::NEG_INFINITY; QUERY_TILE];
    let mut row_sum = [zero; QUERY_TILE];
    let mut p = vec![zero; QUERY_TILE * KEY_TILE];
    for i0 in (0..t).step_by(QUERY_TILE) {
        let i1 = (i0 + QUERY_TILE).min(t);
        let rows = i1 - i0;
        row_max.fill(<F as Acc>::NEG_INFINITY);
        row_sum.fill(zero);
        let o = &mut out[i0 * d..i1 * d];
        o.fill(zero);
        // Key tiles past the last row of this query tile are fully masked: stop at the diagonal.
        for j0 in (0..i1).step_by(KEY_TILE) {
            let cols = (j0 + KEY_TILE).min(i1) - j0;
            // S (rows x cols) = Q_i (rows x D) @ K_j^T (D x cols): K_j read transposed in place.
            gemm_into(
                (rows, cols, d),
                &mut p,
                (&q[i0 * d..], d, 1),
                (&k[j0 * d..], 1, d),
                Gemm::TILE,
            )?;
            for r in 0..rows {
                let i = i0 + r;
                let prow = &mut p[r * cols..(r + 1) * cols];
                // Causal mask inside the diagonal tile: row i sees keys 0..=i.
                let visible = (i + 1).min(j0 + cols).saturating_sub(j0);
                let mut m = row_max[r];
                for s in prow[..visible].iter_mut() {
                    *s *= scale;
                    if *s > m {
                        m = *s;
                    }
                }
                // Online softmax: rescale what was summed under the old max (exp(-inf) = 0 on
                // the first tile, and m is finite because key 0 is always visible).
                let alpha = if visible == 0 {
                    <F as Acc>::ONE
                } else {
                    (row_max[r] - m).exp()
                };
                let mut sum = zero;
                for s in prow[..visible].iter_mut() {
                    *s = (*s - m).exp();
                    sum += *s;
                }
                prow[visible..].fill(zero);
                row_sum[r] = row_sum[r] * alpha + sum;
                row_max[r] = m;
                for x in o[r * d..(r + 1) * d].iter_mut() {
                    *x *= alpha;
                }
            }
            // O_i (rows x D) += P (rows x cols) @ V_j (cols x D).
            gemm_into(
                (rows, d, cols),
                o,
                (&p, cols, 1),
                (&v[j0 * d..], d, 1),
                Gemm::TILE_ADD,
            )?;
        }
        // The division is deferred to the end of the row (FA2's change to Algorithm 1).
        for r in 0..rows {
            let inv = <F as Acc>::ONE / row_sum[r];
            for x in o[r * d..(r + 1) * d].iter_mut() {
                *x *= inv;
            }
            lse[i0 + r] = row_max[r] + row_sum[r].ln();
        }
    }
    Ok(())
}

/// Forward op on (q, k, v); output: O then L, flat (see the module comment).
struct FlashAttention {
    scale: f64,
    dims: Dims,
}

impl FlashAttention {
    fn fwd<F: Float>(
        &self,
        (qs, ql): (&CpuStorage, &Layout),
        (ks, kl): (&CpuStorage, &Layout),
        (vs, vl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let dm = self.dims;
        let q = sized::<F>(qs, ql, self.name(), "q", dm.q_len())?;
        let k = sized::<F>(ks, kl, self.name(), "k", dm.kv_len())?;
        let v = sized::<F>(vs, vl, self.name(), "v", dm.kv_len())?;
        let (t, d, rep) = (dm.t, dm.d, dm.rep());
        let scale = <F as Acc>::from_f64(self.scale);
        let mut packed = vec![<F as Acc>::ZERO; dm.q_len() + dm.lse_len()];
        let (out, lse) = packed.split_at_mut(dm.q_len());
        let head = |bh: usize, (out, lse): (&mut [F], &mut [F])| {
            let (bi, hi) = (bh / dm.h, bh % dm.h);
            // Grouped-query heads read their kv head in place: no expanded k/v copies.
            let kvo = (bi * dm.kv + hi / rep) * t * d;
            vectorized(
                #[inline(always)]
                || {
                    forward_head(
                        &q[bh * t * d..(bh + 1) * t * d],
                        &k[kvo..kvo + t * d],
                        &v[kvo..kvo + t * d],
                        (t, d),
                        scale,
                        out,
                        lse,
                    )
                },
            )
        };
        // One (batch, head) per task, each computed by one thread in a fixed order, so results
        // do not depend on the thread count.
        if t > 0 && dm.work() > PAR_THRESHOLD {
            out.par_chunks_mut(t * d)
                .zip(lse.par_chunks_mut(t))
                .enumerate()
                .try_for_each(|(bh, chunks)| head(bh, chunks))?;
        } else if t > 0 {
            out.chunks_mut(t * d)
                .zip(lse.chunks_mut(t))
                .enumerate()
                .try_for_each(|(bh, chunks)| head(bh, chunks))?;
        }
        let n = packed.len();
        Ok((F::to_cpu_storage_owned(packed), Shape::from(n)))
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "moelab-flash-attention"
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
        crate::cpu::f32_f64_dispatch!(crate::cpu::storage_dtype(s1), self.name(), F => self.fwd::<F>((s1, l1), (s2, l2), (s3, l3)))
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
        crate::cuda::flash_attention::flash_attention_fwd(
            self.name(),
            &self.dims,
            self.scale,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = self.dims;
        // A CustomOp3 has three inputs and the backward needs six: k/v and (O, L)/(dO, dL) go
        // in pairs. The copies are O(T*D) per head against the O(T^2*D) backward itself.
        let kv = Tensor::cat(&[k.flatten_all()?, v.flatten_all()?], 0)?;
        let saved = Tensor::cat(&[res.flatten_all()?, grad.flatten_all()?], 0)?;
        let packed = q.contiguous()?.apply_op3_no_bwd(
            &kv,
            &saved,
            &FlashAttentionBackward {
                scale: self.scale,
                dims: dm,
            },
        )?;
        let (nq, nk) = (dm.q_len(), dm.kv_len());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = packed.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Inputs of one query head's backward.
struct HeadGrad<'a, F> {
    q: &'a [F],
    out: &'a [F],
    lse: &'a [F],
    d_out: &'a [F],
    d_lse: &'a [F],
}

/// Backward of one query head: Algorithm 2 of FlashAttention-2 with the causal mask. Adds into
/// `dq` (this head), `dk`, `dv` (its kv head, shared with the other heads of the group). Per
/// (key tile j, query tile i): `S = Q_i K_j^T`, `P = exp(S scale - L)`, `dV_j += P^T dO_i`,
/// `dP = dO_i V_j^T`, `dS = P (dP - D) scale`, `dQ_i += dS K_j`, `dK_j += dS^T Q_i`, each product
/// a gemm call on this thread.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_head<F: Float>(
    g: &HeadGrad<'_, F>,
    k: &[F],
    v: &[F],
    (t, d): (usize, usize),
    scale: F,
    delta: &mut [F],
    dq: &mut [F],
    (dk, dv): (&mut [F], &mut [F]),
) -> Result<()> {
    let zero = <F as Acc>::ZERO;
    // D_i = rowsum(dO_i * O_i); a gradient on L_i (dL/dS_ij = P_ij) folds into it with a minus
    // sign, since dS_ij = P_ij (dP_ij - D_i + dL_i).
    for (i, di) in delta.iter_mut().enumerate() {
        *di = dot(&g.d_out[i * d..(i + 1) * d], &g.out[i * d..(i + 1) * d]) - g.d_lse[i];
    }
    let mut p = vec![zero; QUERY_TILE * KEY_TILE];
    let mut ds = vec![zero; QUERY_TILE * KEY_TILE];
    // Outer loop over key tiles so the tile's K, V, dK and dV stay in cache while query tiles
    // stream past; query tiles above the diagonal see none of its keys and are skipped.
    for j0 in (0..t).step_by(KEY_TILE) {
        let cols = (j0 + KEY_TILE).min(t) - j0;
        for i0 in (j0 / QUERY_TILE * QUERY_TILE..t).step_by(QUERY_TILE) {
            let rows = (i0 + QUERY_TILE).min(t) - i0;
            gemm_into(
                (rows, cols, d),
                &mut p,
                (&g.q[i0 * d..], d, 1),
                (&k[j0 * d..], 1, d),
                Gemm::TILE,
            )?;
            // P recomputed from L: exp(S - L) is already normalised; masked entries are 0.
            for r in 0..rows {
                let i = i0 + r;
                let visible = (i + 1).min(j0 + cols).saturating_sub(j0);
                let prow = &mut p[r * cols..(r + 1) * cols];
                for s in prow[..visible].iter_mut() {
                    *s = (*s * scale - g.lse[i]).exp();
                }
                prow[visible..].fill(zero);
            }
            // dV_j (cols x D) += P^T (cols x rows) @ dO_i (rows x D).
            gemm_into(
                (cols, d, rows),
                &mut dv[j0 * d..],
                (&p, 1, cols),
                (&g.d_out[i0 * d..], d, 1),
                Gemm::TILE_ADD,
            )?;
            // dP (rows x cols) = dO_i (rows x D) @ V_j^T (D x cols).
            gemm_into(
                (rows, cols, d),
                &mut ds,
                (&g.d_out[i0 * d..], d, 1),
                (&v[j0 * d..], 1, d),
                Gemm::TILE,
            )?;
            for r in 0..rows {
                let di = delta[i0 + r];
                let (prow, dsrow) = (
                    &p[r * cols..(r + 1) * cols],
                    &mut ds[r * cols..(r + 1) * cols],
                );
                for (x, &pv) in dsrow.iter_mut().zip(prow) {
                    *x = pv * (*x - di) * scale;
                }
            }
            // dQ_i (rows x D) += dS (rows x cols) @ K_j (cols x D).
            gemm_into(
                (rows, d, cols),
                &mut dq[i0 * d..],
                (&ds, cols, 1),
                (&k[j0 * d..], d, 1),
                Gemm::TILE_ADD,
            )?;
            // dK_j (cols x D) += dS^T (cols x rows) @ Q_i (rows x D).
            gemm_into(
                (cols, d, rows),
                &mut dk[j0 * d..],
                (&ds, 1, cols),
                (&g.q[i0 * d..], d, 1),
                Gemm::TILE_ADD,
            )?;
        }
    }
    Ok(())
}

/// Backward op on (q, k ++ v, O ++ L ++ dO ++ dL); output: dQ ++ dK ++ dV, flat.
struct FlashAttentionBackward {
    scale: f64,
    dims: Dims,
}

impl FlashAttentionBackward {
    fn run<F: Float>(
        &self,
        (qs, ql): (&CpuStorage, &Layout),
        (kvs, kvl): (&CpuStorage, &Layout),
        (ss, sl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let dm = self.dims;
        let (nq, nk, nl) = (dm.q_len(), dm.kv_len(), dm.lse_len());
        let q = sized::<F>(qs, ql, self.name(), "q", nq)?;
        let kv = sized::<F>(kvs, kvl, self.name(), "k/v", 2 * nk)?;
        let saved = sized::<F>(ss, sl, self.name(), "saved output/grad", 2 * (nq + nl))?;
        let (k, v) = kv.split_at(nk);
        let (out, rest) = saved.split_at(nq);
        let (lse, rest) = rest.split_at(nl);
        let (d_out, d_lse) = rest.split_at(nq);
        let (t, d, rep) = (dm.t, dm.d, dm.rep());
        let scale = <F as Acc>::from_f64(self.scale);
        let mut packed = vec![<F as Acc>::ZERO; nq + 2 * nk];
        let (dq, dkv) = packed.split_at_mut(nq);
        let (dk, dv) = dkv.split_at_mut(nk);
        // One task per (batch, kv head): its query heads run in order, so the sums into the
        // shared dK/dV have a fixed order whatever the thread count.
        for_each_group(
            dm.work() > PAR_THRESHOLD,
            (dq, rep * t * d),
            (dk, t * d),
            (dv, t * d),
            |group, dq, dk, dv| {
                let kvo = group * t * d;
                let (kg, vg) = (&k[kvo..kvo + t * d], &v[kvo..kvo + t * d]);
                let mut delta = vec![<F as Acc>::ZERO; t];
                for r in 0..rep {
                    let bh = group * rep + r;
                    let (qo, lo) = (bh * t * d, bh * t);
                    let head = HeadGrad {
                        q: &q[qo..qo + t * d],
                        out: &out[qo..qo + t * d],
                        lse: &lse[lo..lo + t],
                        d_out: &d_out[qo..qo + t * d],
                        d_lse: &d_lse[lo..lo + t],
                    };
                    vectorized(
                        #[inline(always)]
                        || {
                            backward_head(
                                &head,
                                kg,
                                vg,
                                (t, d),
                                scale,
                                &mut delta,
                                &mut dq[r * t * d..(r + 1) * t * d],
                                (&mut *dk, &mut *dv),
                            )
                        },
                    )?;
                }
                Ok(())
            },
        )?;
        let n = packed.len();
        Ok((F::to_cpu_storage_owned(packed), Shape::from(n)))
    }
}

impl CustomOp3 for FlashAttentionBackward {
    fn name(&self) -> &'static str {
        "moelab-flash-attention-backward"
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
        crate::cpu::f32_f64_dispatch!(crate::cpu::storage_dtype(s1), self.name(), F => self.run::<F>((s1, l1), (s2, l2), (s3, l3)))
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
        crate::cuda::flash_attention::flash_attention_bwd(
            self.name(),
            &self.dims,
            self.scale,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::attention::causal_attention;
    use crate::gradcheck::check_gradients;
    use crate::test_util::{max_abs_diff, rand, to_f64_vec};
    use candle_core::Var;

    /// q (B, H, T, D), k and v (B, KV, T, D) with distinct seeds.
    fn inputs(
        seed: u64,
        (b, h, kv, t, d): (usize, usize, usize, usize, usize),
        dtype: DType,
    ) -> [Tensor; 3] {
        [
            rand(seed, (b, h, t, d), 1.0, dtype),
            rand(seed + 1, (b, kv, t, d), 1.0, dtype),
            rand(seed + 2, (b, kv, t, d), 1.0, dtype),
        ]
    }

    /// Gradients of sum(attn(q, k, v) * r) with respect to q, k, v.
    fn grads(
        attn: fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>,
        x: &[Tensor; 3],
        r: &Tensor,
        scale: f64,
    ) -> Vec<Tensor> {
        let vars: Vec<Var> = x.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let g = attn(&vars[0], &vars[1], &vars[2], scale)
            .unwrap()
            .mul(r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        vars.iter()
            .map(|v| g.get(v.as_tensor()).unwrap().clone())
            .collect()
    }

    #[test]
    fn forward_matches_causal_attention() {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
            for t in [1, 5, 63, 64, 65, 130] {
                for d in [8, 64] {
                    for (h, kv) in [(4, 4), (4, 2), (4, 1)] {
                        for b in [1, 2] {
                            let [q, k, v] = inputs(t as u64, (b, h, kv, t, d), dtype);
                            let scale = 1.0 / (d as f64).sqrt();
                            let got = flash_attention(&q, &k, &v, scale).unwrap();
                            assert_eq!(got.dims(), &[b, h, t, d]);
                            assert_eq!(got.dtype(), dtype);
                            let diff =
                                max_abs_diff(&got, &causal_attention(&q, &k, &v, scale).unwrap());
                            assert!(
                                diff < tol,
                                "{dtype:?} B={b} H={h} KV={kv} T={t} D={d}: {diff}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn head_dims_16_32_128() {
        for d in [16, 32, 128] {
            let [q, k, v] = inputs(20, (1, 2, 1, 130, d), DType::F64);
            let scale = 1.0 / (d as f64).sqrt();
            let diff = max_abs_diff(
                &flash_attention(&q, &k, &v, scale).unwrap(),
                &causal_attention(&q, &k, &v, scale).unwrap(),
            );
            assert!(diff < 1e-10, "D={d}: {diff}");
        }
    }

    #[test]
    fn log_sum_exp_matches_the_scores() {
        let (b, h, kv, t, d) = (2, 4, 2, 70, 8);
        let [q, k, v] = inputs(30, (b, h, kv, t, d), DType::F64);
        let scale = 0.3;
        let packed = q
            .apply_op3_no_bwd(
                &k,
                &v,
                &FlashAttention {
                    scale,
                    dims: Dims { b, h, kv, t, d },
                },
            )
            .unwrap();
        let lse = to_f64_vec(&packed.narrow(0, b * h * t * d, b * h * t).unwrap());
        let (q, k) = (to_f64_vec(&q), to_f64_vec(&k));
        let mut worst: f64 = 0.0;
        for bh in 0..b * h {
            let ko = (bh / h * kv + bh % h / (h / kv)) * t * d;
            for i in 0..t {
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[bh * t * d + i * d + c] * k[ko + j * d + c])
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let want = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                worst = worst.max((lse[bh * t + i] - want).abs());
            }
        }
        assert!(worst < 1e-12, "{worst}");
    }

    #[test]
    fn gradients_match_causal_attention() {
        for t in [1, 5, 64, 65, 130] {
            for d in [8, 64] {
                for (h, kv) in [(4, 4), (4, 2), (4, 1)] {
                    let shape = (2, h, kv, t, d);
                    let x = inputs(40 + t as u64, shape, DType::F64);
                    let r = rand(50, (2, h, t, d), 1.0, DType::F64);
                    let scale = 1.0 / (d as f64).sqrt();
                    let got = grads(flash_attention, &x, &r, scale);
                    let want = grads(causal_attention, &x, &r, scale);
                    for (name, (g, w)) in ["q", "k", "v"].iter().zip(got.iter().zip(&want)) {
                        assert_eq!(g.dims(), w.dims());
                        let diff = max_abs_diff(g, w);
                        assert!(diff < 1e-9, "d{name} H={h} KV={kv} T={t} D={d}: {diff}");
                    }
                }
            }
        }
    }

    #[test]
    fn gradcheck_gqa() {
        // T = 67 crosses a tile boundary; 4 query heads share 2 kv heads.
        for (t, max) in [(4, 100), (67, 60)] {
            let [q, k, v] = inputs(60, (1, 4, 2, t, 3), DType::F64);
            let vars = [q, k, v].map(|x| Var::from_tensor(&x).unwrap());
            let r = rand(63, (1, 4, t, 3), 1.0, DType::F64);
            let rep = check_gradients(
                &|x| {
                    flash_attention(&x[0], &x[1], &x[2], 0.5)?
                        .mul(&r)?
                        .sum_all()
                },
                &vars,
                1e-6,
                max,
            )
            .unwrap();
            println!("flash_attention T={t}: {rep:?}");
            assert_eq!(rep.checked, max.min(4 * t * 3) + 2 * max.min(2 * t * 3));
            assert!(rep.max_rel_err < 1e-5, "{rep:?}");
        }
    }

    #[test]
    fn gradcheck_through_log_sum_exp() {
        // Nothing public reads L, but backward handles a gradient on it; check that path too.
        let (b, h, kv, t, d) = (1, 2, 1, 66, 3);
        let [q, k, v] = inputs(70, (b, h, kv, t, d), DType::F64);
        let vars = [q, k, v].map(|x| Var::from_tensor(&x).unwrap());
        let r = rand(73, b * h * t * (d + 1), 1.0, DType::F64);
        let dims = Dims { b, h, kv, t, d };
        let rep = check_gradients(
            &|x| {
                x[0].apply_op3(&x[1], &x[2], FlashAttention { scale: 0.7, dims })?
                    .mul(&r)?
                    .sum_all()
            },
            &vars,
            1e-6,
            60,
        )
        .unwrap();
        println!("flash_attention with L: {rep:?}");
        assert_eq!(rep.checked, 180);
        assert!(rep.max_rel_err < 1e-5, "{rep:?}");
    }

    #[test]
    fn bit_identical_across_thread_counts() {
        let run = |threads: usize, dtype: DType| -> Vec<Vec<f64>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                // Large enough for the rayon path in forward and backward.
                let x = inputs(80, (2, 4, 2, 130, 64), dtype);
                let r = rand(83, (2, 4, 130, 64), 1.0, dtype);
                let scale = 0.125;
                let mut all = vec![to_f64_vec(
                    &flash_attention(&x[0], &x[1], &x[2], scale).unwrap(),
                )];
                all.extend(grads(flash_attention, &x, &r, scale).iter().map(to_f64_vec));
                all
            })
        };
        for dtype in [DType::F32, DType::F64] {
            let (one, two) = (run(1, dtype), run(2, dtype));
            for (a, b) in one.iter().zip(&two) {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{dtype:?}"
                );
            }
        }
    }

    #[test]
    fn errors_name_the_op() {
        let f = DType::F32;
        let cases = [
            // q not 4-d
            (
                rand(1, (4, 3, 2), 1.0, f),
                rand(2, (1, 2, 3, 2), 1.0, f),
                rand(3, (1, 2, 3, 2), 1.0, f),
            ),
            // k not 4-d
            (
                rand(1, (1, 4, 3, 2), 1.0, f),
                rand(2, (2, 3, 2), 1.0, f),
                rand(3, (2, 3, 2), 1.0, f),
            ),
            // v differs from k
            (
                rand(1, (1, 4, 3, 2), 1.0, f),
                rand(2, (1, 2, 3, 2), 1.0, f),
                rand(3, (1, 2, 4, 2), 1.0, f),
            ),
            // D differs
            (
                rand(1, (1, 4, 3, 2), 1.0, f),
                rand(2, (1, 2, 3, 4), 1.0, f),
                rand(3, (1, 2, 3, 4), 1.0, f),
            ),
            // 4 heads over 3 kv heads
            (
                rand(1, (1, 4, 3, 2), 1.0, f),
                rand(2, (1, 3, 3, 2), 1.0, f),
                rand(3, (1, 3, 3, 2), 1.0, f),
            ),
            // dtypes differ
            (
                rand(1, (1, 4, 3, 2), 1.0, f),
                rand(2, (1, 2, 3, 2), 1.0, DType::F64),
                rand(3, (1, 2, 3, 2), 1.0, f),
            ),
            // integer inputs
            (
                rand(1, (1, 4, 3, 2), 1.0, DType::U32),
                rand(2, (1, 2, 3, 2), 1.0, DType::U32),
                rand(3, (1, 2, 3, 2), 1.0, DType::U32),
            ),
            // D = 0
            (
                rand(1, (1, 4, 3, 0), 1.0, f),
                rand(2, (1, 2, 3, 0), 1.0, f),
                rand(3, (1, 2, 3, 0), 1.0, f),
            ),
        ];
        for (i, (q, k, v)) in cases.iter().enumerate() {
            let err = flash_attention(q, k, v, 1.0).unwrap_err().to_string();
            assert!(err.starts_with("flash_attention: "), "case {i}: {err}");
        }
        let [q, k, v] = inputs(90, (1, 2, 1, 3, 2), f);
        let err = flash_attention(&q, &k, &v, f64::NAN)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("flash_attention: scale"), "{err}");
    }

    #[test]
    fn fused_entry_matches_on_cpu_and_checks_its_inputs() {
        // On the CPU both entries run the same op: identical results, forward and backward.
        let x = inputs(120, (2, 4, 2, 37, 16), DType::F32);
        let r = rand(123, (2, 4, 37, 16), 1.0, DType::F32);
        let a = flash_attention(&x[0], &x[1], &x[2], 0.25).unwrap();
        let b = flash_attention_fused(&x[0], &x[1], &x[2], 0.25).unwrap();
        assert_eq!(to_f64_vec(&a), to_f64_vec(&b));
        let ga = grads(flash_attention, &x, &r, 0.25);
        let gb = grads(flash_attention_fused, &x, &r, 0.25);
        for (g, w) in ga.iter().zip(&gb) {
            assert_eq!(to_f64_vec(g), to_f64_vec(w));
        }
        let err = flash_attention_fused(&x[0], &x[0], &x[2], 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("flash_attention_fused: "), "{err}");
        let err = flash_attention_fused(&x[0], &x[1], &x[2], f64::INFINITY)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("flash_attention_fused: scale"), "{err}");
    }

    #[test]
    fn non_contiguous_and_half_inputs() {
        // (B, T, H, D) transposed to (B, H, T, D), as a model would hand them over.
        let q = rand(100, (2, 9, 4, 8), 1.0, DType::F32)
            .transpose(1, 2)
            .unwrap();
        let k = rand(101, (2, 9, 2, 8), 1.0, DType::F32)
            .transpose(1, 2)
            .unwrap();
        let v = rand(102, (2, 9, 2, 8), 1.0, DType::F32)
            .transpose(1, 2)
            .unwrap();
        assert!(!q.is_contiguous());
        let want = causal_attention(&q, &k, &v, 0.35).unwrap();
        let diff = max_abs_diff(&flash_attention(&q, &k, &v, 0.35).unwrap(), &want);
        assert!(diff < 1e-5, "{diff}");
        for dtype in [DType::BF16, DType::F16] {
            let [q, k, v] = [&q, &k, &v].map(|x| x.to_dtype(dtype).unwrap());
            let got = flash_attention(&q, &k, &v, 0.35).unwrap();
            assert_eq!(got.dtype(), dtype);
            let diff = max_abs_diff(&got, &causal_attention(&q, &k, &v, 0.35).unwrap());
            assert!(diff < 2e-2, "{dtype:?}: {diff}");
        }
    }

    #[test]
    fn empty_sequence() {
        let [q, k, v] = inputs(110, (2, 4, 2, 0, 8), DType::F32);
        let vars = [q, k, v].map(|x| Var::from_tensor(&x).unwrap());
        let out = flash_attention(&vars[0], &vars[1], &vars[2], 1.0).unwrap();
        assert_eq!(out.dims(), &[2, 4, 0, 8]);
        let g = out.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(vars[1].as_tensor()).unwrap().dims(), &[2, 2, 0, 8]);
    }
}
