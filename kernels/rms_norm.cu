// RMSNorm forward over the last dimension (the backward is composed from candle ops).
//
// Launch: grid = (rows, 1, 1) with one block per row, block = MOELAB_BLOCK.
#include "common.cuh"

// y[row, :] = x[row, :] / sqrt(mean(x[row, :]^2) + eps) * w.
template <typename T>
__device__ __forceinline__ void moelab_rms_norm_fwd(const T *__restrict__ x,
                                                    const T *__restrict__ w, T *__restrict__ y,
                                                    size_t d, float eps) {
  const size_t row = blockIdx.x;
  const T *xr = x + row * d;
  T *yr = y + row * d;

  float sum_sq = 0.0f;
  for (size_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = moelab_to_f32(xr[j]);
    sum_sq += v * v;
  }
  sum_sq = moelab_block_reduce(sum_sq, MoelabSum(), 0.0f);

  const float r = 1.0f / sqrtf(sum_sq / (float)d + eps);
  for (size_t j = threadIdx.x; j < d; j += blockDim.x) {
    yr[j] = moelab_from_f32<T>(moelab_to_f32(xr[j]) * r * moelab_to_f32(w[j]));
  }
}

#define MOELAB_RMS_NORM_ENTRY_POINTS(SUFFIX, TYPE)                                     \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                           \
      moelab_rms_norm_fwd_##SUFFIX(const TYPE *x, const TYPE *w, TYPE *y, size_t d,    \
                                   float eps) {                                        \
    moelab_rms_norm_fwd<TYPE>(x, w, y, d, eps);                                        \
  }

MOELAB_FOR_EACH_FLOAT(MOELAB_RMS_NORM_ENTRY_POINTS)
