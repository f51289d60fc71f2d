// Router top-k: for each token, the k experts with the largest selection score
// (score + bias[e]; the bias only steers the choice), in descending order, ties to the lower
// expert index, NaN counted as -inf; plus the per-expert histogram of the choices.
//
// Launch: one block of MOELAB_BLOCK threads per token, dynamic shared memory of
// n_experts * (sizeof(float) + 1) bytes; `counts` zeroed before the launch (integer atomic
// adds: the histogram does not depend on the order blocks run in).
#include "common.cuh"

#include <stdint.h>

// Whether candidate (ov, oi) beats (v, i): larger value, then lower index; UINT32_MAX is "none".
__device__ __forceinline__ bool moelab_topk_beats(float ov, uint32_t oi, float v, uint32_t i) {
  return oi != UINT32_MAX && (i == UINT32_MAX || ov > v || (ov == v && oi < i));
}

template <typename T>
__device__ __forceinline__ void moelab_router_topk(const T *__restrict__ scores,
                                                   const float *__restrict__ bias,
                                                   uint32_t *__restrict__ ids,
                                                   uint32_t *__restrict__ counts,
                                                   size_t n_experts, size_t k, int has_bias) {
  extern __shared__ float moelab_topk_smem[];
  float *selection = moelab_topk_smem;
  unsigned char *taken = reinterpret_cast<unsigned char *>(selection + n_experts);
  __shared__ float warp_v[32];
  __shared__ uint32_t warp_i[32];

  const size_t token = blockIdx.x;
  const T *row = scores + token * n_experts;
  for (size_t e = threadIdx.x; e < n_experts; e += blockDim.x) {
    float s = moelab_to_f32(row[e]);
    if (has_bias) {
      s += bias[e];
    }
    selection[e] = isnan(s) ? -INFINITY : s;
    taken[e] = 0;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  for (size_t j = 0; j < k; ++j) {
    float v = -INFINITY;
    uint32_t i = UINT32_MAX;
    for (size_t e = threadIdx.x; e < n_experts; e += blockDim.x) {
      if (!taken[e] && moelab_topk_beats(selection[e], (uint32_t)e, v, i)) {
        v = selection[e];
        i = (uint32_t)e;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
      const uint32_t oi = __shfl_xor_sync(0xffffffffu, i, offset);
      if (moelab_topk_beats(ov, oi, v, i)) {
        v = ov;
        i = oi;
      }
    }
    if (lane == 0) {
      warp_v[warp] = v;
      warp_i[warp] = i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < num_warps; ++w) {
        if (moelab_topk_beats(warp_v[w], warp_i[w], v, i)) {
          v = warp_v[w];
          i = warp_i[w];
        }
      }
      // k <= n_experts (checked by the launcher), so a candidate is always left.
      ids[token * k + j] = i;
      taken[i] = 1;
      atomicAdd(&counts[i], 1u);
    }
    __syncthreads();
  }
}

#define MOELAB_ROUTER_TOPK_ENTRY_POINTS(SUFFIX, TYPE)                                        \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                                 \
      moelab_router_topk_##SUFFIX(const TYPE *scores, const float *bias, uint32_t *ids,      \
                                  uint32_t *counts, size_t n_experts, size_t k,              \
                                  int has_bias) {                                            \
    moelab_router_topk<TYPE>(scores, bias, ids, counts, n_experts, k, has_bias);             \
  }

MOELAB_FOR_EACH_FLOAT(MOELAB_ROUTER_TOPK_ENTRY_POINTS)
