// Softmax over the last dimension (plain and causal) and its backward.
//
// Launch: grid = (rows, 1, 1) with one block per row of the last dim, block = MOELAB_BLOCK.
#include "common.cuh"

// y[row, :] = softmax(x[row, :n]) with y[row, n:] = 0, where n = t_k, or for `causal` the
// number of keys row (row % t_q) may see: row % t_q + (t_k - t_q) + 1 (requires t_q <= t_k).
template <typename T>
__device__ __forceinline__ void moelab_softmax_fwd(const T *__restrict__ x, T *__restrict__ y,
                                                   size_t t_q, size_t t_k, int causal) {
  const size_t row = blockIdx.x;
  const size_t visible = causal ? (row % t_q) + (t_k - t_q) + 1 : t_k;
  const T *xr = x + row * t_k;
  T *yr = y + row * t_k;

  float max = -INFINITY;
  for (size_t j = threadIdx.x; j < visible; j += blockDim.x) {
    max = fmaxf(max, moelab_to_f32(xr[j]));
  }
  max = moelab_block_reduce(max, MoelabMax(), -INFINITY);

  float sum = 0.0f;
  for (size_t j = threadIdx.x; j < visible; j += blockDim.x) {
    sum += expf(moelab_to_f32(xr[j]) - max);
  }
  sum = moelab_block_reduce(sum, MoelabSum(), 0.0f);

  const float inv = 1.0f / sum;
  for (size_t j = threadIdx.x; j < t_k; j += blockDim.x) {
    const float p = j < visible ? expf(moelab_to_f32(xr[j]) - max) * inv : 0.0f;
    yr[j] = moelab_from_f32<T>(p);
  }
}

// dx[row, :] = y * (g - sum(g * y)) over the row (masked entries have y = 0, so dx = 0 there).
template <typename T>
__device__ __forceinline__ void moelab_softmax_bwd(const T *__restrict__ y,
                                                   const T *__restrict__ g, T *__restrict__ dx,
                                                   size_t n) {
  const size_t row = blockIdx.x;
  const T *yr = y + row * n;
  const T *gr = g + row * n;
  T *dxr = dx + row * n;

  float dot = 0.0f;
  for (size_t j = threadIdx.x; j < n; j += blockDim.x) {
    dot += moelab_to_f32(yr[j]) * moelab_to_f32(gr[j]);
  }
  dot = moelab_block_reduce(dot, MoelabSum(), 0.0f);

  for (size_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float yv = moelab_to_f32(yr[j]);
    dxr[j] = moelab_from_f32<T>(yv * (moelab_to_f32(gr[j]) - dot));
  }
}

#define MOELAB_SOFTMAX_ENTRY_POINTS(SUFFIX, TYPE)                                              \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                                   \
      moelab_softmax_fwd_##SUFFIX(const TYPE *x, TYPE *y, size_t t_q, size_t t_k, int causal) { \
    moelab_softmax_fwd<TYPE>(x, y, t_q, t_k, causal);                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                                   \
      moelab_softmax_bwd_##SUFFIX(const TYPE *y, const TYPE *g, TYPE *dx, size_t n) {          \
    moelab_softmax_bwd<TYPE>(y, g, dx, n);                                                     \
  }

MOELAB_FOR_EACH_FLOAT(MOELAB_SOFTMAX_ENTRY_POINTS)
