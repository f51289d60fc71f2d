// Causal grouped-query attention without the T x T scores: the CUDA side of
// crates/moelab-kernels/src/flash_attention.rs (its CPU reference), f32 only (the wrapper
// converts bf16/f16 first, so L keeps full precision).
//
// Layouts (contiguous, row-major): q, O, dO, dQ are (B, H, T, D); k, v, dK, dV are (B, KV, T, D);
// L, dL and delta are (B, H, T). Query head h reads kv head h / (H / KV). The forward writes O
// then L into one buffer; the backward reads k ++ v and O ++ L ++ dO ++ dL and writes
// dQ ++ dK ++ dV, the flat layouts of the CPU ops.
//
// Launch (fwd, bwd_dq, bwd_dkv): blocks of MOELAB_FA_ROWS threads, one row (a query row, or a
// key row for bwd_dkv) per thread; grid (B*H, or B*KV for bwd_dkv; ceil(T / MOELAB_FA_ROWS)).
// Each thread keeps its row vectors (D <= MOELAB_FA_MAX_D floats each) in per-thread arrays,
// which spill to local memory at large D: simple and correct, not fast. The rows every thread of
// a block reads in turn are staged in shared memory, MOELAB_FA_TILE at a time. No atomics: each
// output row is summed by one thread in a fixed order. delta: a grid-stride loop over rows.
#include "common.cuh"

// Threads (rows) per block; the Rust launcher uses the same number.
#define MOELAB_FA_ROWS 64
// Rows staged in shared memory per step: 2 x 32 x 128 floats = 32 KiB.
#define MOELAB_FA_TILE 32
// Largest head dim; the Rust launcher rejects larger ones.
#define MOELAB_FA_MAX_D 128

typedef float MoelabFaTile[MOELAB_FA_TILE][MOELAB_FA_MAX_D];

// Copies rows [r0, r0 + n) of two (T, D) matrices into shared tiles, the whole block
// cooperating; callers put a __syncthreads() before (tiles free) and after (tiles written).
__device__ __forceinline__ void moelab_fa_stage(const float *__restrict__ a,
                                                const float *__restrict__ b, size_t r0,
                                                size_t n, size_t d, MoelabFaTile &sa,
                                                MoelabFaTile &sb) {
  for (size_t e = threadIdx.x; e < n * d; e += blockDim.x) {
    const size_t r = e / d, c = e % d;
    sa[r][c] = a[(r0 + r) * d + c];
    sb[r][c] = b[(r0 + r) * d + c];
  }
}

// Loads the first d elements of `src` into `dst` (zeros past d, or everywhere if !active).
__device__ __forceinline__ void moelab_fa_load(float (&dst)[MOELAB_FA_MAX_D],
                                               const float *__restrict__ src, size_t d,
                                               bool active) {
#pragma unroll
  for (int c = 0; c < MOELAB_FA_MAX_D; ++c) {
    dst[c] = (active && c < (int)d) ? src[c] : 0.0f;
  }
}

__device__ __forceinline__ void moelab_fa_zero(float (&dst)[MOELAB_FA_MAX_D]) {
#pragma unroll
  for (int c = 0; c < MOELAB_FA_MAX_D; ++c) {
    dst[c] = 0.0f;
  }
}

__device__ __forceinline__ float moelab_fa_dot(const float (&a)[MOELAB_FA_MAX_D],
                                               const float *b, size_t d) {
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < MOELAB_FA_MAX_D; ++c) {
    if (c < (int)d) {
      s += a[c] * b[c];
    }
  }
  return s;
}

// acc += w * b over the first d elements.
__device__ __forceinline__ void moelab_fa_axpy(float (&acc)[MOELAB_FA_MAX_D], float w,
                                               const float *b, size_t d) {
#pragma unroll
  for (int c = 0; c < MOELAB_FA_MAX_D; ++c) {
    if (c < (int)d) {
      acc[c] += w * b[c];
    }
  }
}

// Forward: out[0 .. B*H*T*D) = O, out[B*H*T*D ..) = L = max + log(sum) of each row's scaled
// scores. One thread per query row i, looping over keys 0..=i with the online softmax (running
// max m and sum l, the output rescaled when m grows; divided by l at the end).
extern "C" __global__ void __launch_bounds__(MOELAB_FA_ROWS)
    moelab_flash_attn_fwd_f32(const float *__restrict__ q, const float *__restrict__ k,
                              const float *__restrict__ v, float *__restrict__ out, size_t b,
                              size_t h, size_t kv, size_t t, size_t d, float scale) {
  __shared__ MoelabFaTile ks;
  __shared__ MoelabFaTile vs;
  const size_t bh = blockIdx.x;
  const size_t row0 = (size_t)blockIdx.y * MOELAB_FA_ROWS;
  const size_t i = row0 + threadIdx.x;
  const bool active = i < t;
  const size_t kv_head = (bh / h) * kv + (bh % h) / (h / kv);
  const float *kh = k + kv_head * t * d;
  const float *vh = v + kv_head * t * d;
  float qr[MOELAB_FA_MAX_D];
  float acc[MOELAB_FA_MAX_D];
  moelab_fa_load(qr, q + (bh * t + i) * d, d, active);
  moelab_fa_zero(acc);
  float m = -INFINITY;
  float l = 0.0f;
  // Keys past the block's last row are masked for every thread of the block.
  const size_t last = min(row0 + MOELAB_FA_ROWS, t);
  for (size_t j0 = 0; j0 < last; j0 += MOELAB_FA_TILE) {
    const size_t n = min((size_t)MOELAB_FA_TILE, last - j0);
    __syncthreads();
    moelab_fa_stage(kh, vh, j0, n, d, ks, vs);
    __syncthreads();
    // Causal mask: row i sees keys j <= i.
    const size_t visible = !active || i < j0 ? 0 : min(n, i + 1 - j0);
    for (size_t jj = 0; jj < visible; ++jj) {
      const float s = moelab_fa_dot(qr, ks[jj], d) * scale;
      if (s > m) {
        // exp(-inf) = 0 on the first key, when acc and l are still 0.
        const float alpha = expf(m - s);
        l *= alpha;
#pragma unroll
        for (int c = 0; c < MOELAB_FA_MAX_D; ++c) {
          acc[c] *= alpha;
        }
        m = s;
      }
      const float p = expf(s - m);
      l += p;
      moelab_fa_axpy(acc, p, vs[jj], d);
    }
  }
  if (active) {
    const float inv = 1.0f / l;
    float *o = out + (bh * t + i) * d;
#pragma unroll
    for (int c = 0; c < MOELAB_FA_MAX_D; ++c) {
      if (c < (int)d) {
        o[c] = acc[c] * inv;
      }
    }
    out[b * h * t * d + bh * t + i] = m + logf(l);
  }
}

// delta[r] = rowsum(dO * O)[r] - dL[r] for the `rows` = B*H*T query rows; `saved` is
// O ++ L ++ dO ++ dL. A gradient on L folds in here: dS_ij = P_ij (dP_ij - delta_i).
extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)
    moelab_flash_attn_delta_f32(const float *__restrict__ saved, float *__restrict__ delta,
                                size_t rows, size_t d) {
  const float *o = saved;
  const float *d_out = saved + rows * d + rows;
  const float *d_lse = d_out + rows * d;
  for (size_t r = (size_t)blockIdx.x * blockDim.x + threadIdx.x; r < rows;
       r += (size_t)gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (size_t c = 0; c < d; ++c) {
      s += d_out[r * d + c] * o[r * d + c];
    }
    delta[r] = s - d_lse[r];
  }
}

// dQ into grads[0 .. B*H*T*D): one thread per query row i, looping over keys 0..=i with
// P_ij = exp(S_ij scale - L_i) recomputed from L, dS_ij = P_ij (dO_i . v_j - delta_i) scale and
// dQ_i = sum_j dS_ij k_j.
extern "C" __global__ void __launch_bounds__(MOELAB_FA_ROWS)
    moelab_flash_attn_bwd_dq_f32(const float *__restrict__ q, const float *__restrict__ kv_in,
                                 const float *__restrict__ saved,
                                 const float *__restrict__ delta, float *__restrict__ grads,
                                 size_t b, size_t h, size_t kv, size_t t, size_t d,
                                 float scale) {
  __shared__ MoelabFaTile ks;
  __shared__ MoelabFaTile vs;
  const size_t rows = b * h * t;
  const size_t bh = blockIdx.x;
  const size_t row0 = (size_t)blockIdx.y * MOELAB_FA_ROWS;
  const size_t i = row0 + threadIdx.x;
  const bool active = i < t;
  const size_t kv_head = (bh / h) * kv + (bh % h) / (h / kv);
  const float *kh = kv_in + kv_head * t * d;
  const float *vh = kv_in + b * kv * t * d + kv_head * t * d;
  const size_t row = bh * t + i;
  const float *lse = saved + rows * d;
  const float *d_out = lse + rows;
  float qr[MOELAB_FA_MAX_D];
  float dor[MOELAB_FA_MAX_D];
  float dq[MOELAB_FA_MAX_D];
  moelab_fa_load(qr, q + row * d, d, active);
  moelab_fa_load(dor, d_out + row * d, d, active);
  moelab_fa_zero(dq);
  const float li = active ? lse[row] : 0.0f;
  const float di = active ? delta[row] : 0.0f;
  const size_t last = min(row0 + MOELAB_FA_ROWS, t);
  for (size_t j0 = 0; j0 < last; j0 += MOELAB_FA_TILE) {
    const size_t n = min((size_t)MOELAB_FA_TILE, last - j0);
    __syncthreads();
    moelab_fa_stage(kh, vh, j0, n, d, ks, vs);
    __syncthreads();
    const size_t visible = !active || i < j0 ? 0 : min(n, i + 1 - j0);
    for (size_t jj = 0; jj < visible; ++jj) {
      const float p = expf(moelab_fa_dot(qr, ks[jj], d) * scale - li);
      const float ds = p * (moelab_fa_dot(dor, vs[jj], d) - di) * scale;
      moelab_fa_axpy(dq, ds, ks[jj], d);
    }
  }
  if (active) {
    float *g = grads + row * d;
#pragma unroll
    for (int c = 0; c < MOELAB_FA_MAX_D; ++c) {
      if (c < (int)d) {
        g[c] = dq[c];
      }
    }
  }
}

// dK, dV into grads[B*H*T*D ..) (dK, then dV): one thread per key row j of a kv head, looping
// over the query rows j..T of every query head of its group in order: dV_j = sum_i P_ij dO_i,
// dK_j = sum_i dS_ij q_i, with P and dS as in bwd_dq. Query rows are staged with their L and
// delta in shared memory.
extern "C" __global__ void __launch_bounds__(MOELAB_FA_ROWS)
    moelab_flash_attn_bwd_dkv_f32(const float *__restrict__ q, const float *__restrict__ kv_in,
                                  const float *__restrict__ saved,
                                  const float *__restrict__ delta, float *__restrict__ grads,
                                  size_t b, size_t h, size_t kv, size_t t, size_t d,
                                  float scale) {
  __shared__ MoelabFaTile qs;
  __shared__ MoelabFaTile dos;
  __shared__ float lse_s[MOELAB_FA_TILE];
  __shared__ float delta_s[MOELAB_FA_TILE];
  const size_t rows = b * h * t;
  const size_t nq = rows * d;
  const size_t nk = b * kv * t * d;
  const size_t g = blockIdx.x;  // batch * KV + kv head
  const size_t row0 = (size_t)blockIdx.y * MOELAB_FA_ROWS;
  const size_t j = row0 + threadIdx.x;
  const bool active = j < t;
  const size_t rep = h / kv;
  const size_t krow = g * t + j;
  const float *lse = saved + nq;
  const float *d_out = lse + rows;
  float kr[MOELAB_FA_MAX_D];
  float vr[MOELAB_FA_MAX_D];
  float dk[MOELAB_FA_MAX_D];
  float dv[MOELAB_FA_MAX_D];
  moelab_fa_load(kr, kv_in + krow * d, d, active);
  moelab_fa_load(vr, kv_in + nk + krow * d, d, active);
  moelab_fa_zero(dk);
  moelab_fa_zero(dv);
  for (size_t r = 0; r < rep; ++r) {
    // Query head (g % KV) * rep + r of batch g / KV.
    const size_t bh = (g / kv) * h + (g % kv) * rep + r;
    const float *qh = q + bh * t * d;
    const float *doh = d_out + bh * t * d;
    // Query rows before the block's first key see none of its keys.
    for (size_t i0 = row0; i0 < t; i0 += MOELAB_FA_TILE) {
      const size_t n = min((size_t)MOELAB_FA_TILE, t - i0);
      __syncthreads();
      moelab_fa_stage(qh, doh, i0, n, d, qs, dos);
      for (size_t e = threadIdx.x; e < n; e += blockDim.x) {
        lse_s[e] = lse[bh * t + i0 + e];
        delta_s[e] = delta[bh * t + i0 + e];
      }
      __syncthreads();
      if (!active) {
        continue;
      }
      // Causal mask: key j is seen by rows i >= j.
      for (size_t ii = j > i0 ? j - i0 : 0; ii < n; ++ii) {
        const float p = expf(moelab_fa_dot(kr, qs[ii], d) * scale - lse_s[ii]);
        moelab_fa_axpy(dv, p, dos[ii], d);
        const float ds = p * (moelab_fa_dot(vr, dos[ii], d) - delta_s[ii]) * scale;
        moelab_fa_axpy(dk, ds, qs[ii], d);
      }
    }
  }
  if (active) {
    float *gk = grads + nq + krow * d;
    float *gv = grads + nq + nk + krow * d;
#pragma unroll
    for (int c = 0; c < MOELAB_FA_MAX_D; ++c) {
      if (c < (int)d) {
        gk[c] = dk[c];
        gv[c] = dv[c];
      }
    }
  }
}
