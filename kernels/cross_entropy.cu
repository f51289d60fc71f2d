// Fused cross-entropy (logsumexp - logit[target]) and its backward.
//
// Launch: grid = (rows, 1, 1) with one block per row of logits, block = MOELAB_BLOCK.
// An out-of-range target cannot be reported without a device-to-host sync, so it yields NaN
// (loss and the whole gradient row) instead of the CPU path's error; nothing is read out of range.
#include "common.cuh"

// Row max and sum(exp(x - max)) over v logits, returned to every thread of the block.
template <typename T>
__device__ __forceinline__ void moelab_row_max_sum(const T *__restrict__ xr, size_t v,
                                                   float *max_out, float *sum_out) {
  float max = -INFINITY;
  for (size_t j = threadIdx.x; j < v; j += blockDim.x) {
    max = fmaxf(max, moelab_to_f32(xr[j]));
  }
  max = moelab_block_reduce(max, MoelabMax(), -INFINITY);
  float sum = 0.0f;
  for (size_t j = threadIdx.x; j < v; j += blockDim.x) {
    sum += expf(moelab_to_f32(xr[j]) - max);
  }
  *max_out = max;
  *sum_out = moelab_block_reduce(sum, MoelabSum(), 0.0f);
}

// loss[row] = max + log(sum(exp(x - max))) - x[target[row]].
template <typename T>
__device__ __forceinline__ void moelab_cross_entropy_fwd(const T *__restrict__ logits,
                                                         const unsigned int *__restrict__ targets,
                                                         T *__restrict__ loss, size_t v) {
  const size_t row = blockIdx.x;
  const T *xr = logits + row * v;
  float max, sum;
  moelab_row_max_sum(xr, v, &max, &sum);
  if (threadIdx.x == 0) {
    const size_t target = targets[row];
    const float picked = target < v ? moelab_to_f32(xr[target]) : NAN;
    loss[row] = moelab_from_f32<T>(max + logf(sum) - picked);
  }
}

// dlogits[row, j] = (softmax(x)[j] - (j == target)) * g[row].
template <typename T>
__device__ __forceinline__ void moelab_cross_entropy_bwd(const T *__restrict__ logits,
                                                         const unsigned int *__restrict__ targets,
                                                         const T *__restrict__ g,
                                                         T *__restrict__ dlogits, size_t v) {
  const size_t row = blockIdx.x;
  const T *xr = logits + row * v;
  T *dr = dlogits + row * v;
  float max, sum;
  moelab_row_max_sum(xr, v, &max, &sum);
  const size_t target = targets[row];
  const float grad = moelab_to_f32(g[row]);
  const float scale = target < v ? grad / sum : NAN;
  for (size_t j = threadIdx.x; j < v; j += blockDim.x) {
    const float p = expf(moelab_to_f32(xr[j]) - max) * scale;
    dr[j] = moelab_from_f32<T>(j == target ? p - grad : p);
  }
}

#define MOELAB_CROSS_ENTROPY_ENTRY_POINTS(SUFFIX, TYPE)                                         \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                                    \
      moelab_cross_entropy_fwd_##SUFFIX(const TYPE *logits, const unsigned int *targets,        \
                                        TYPE *loss, size_t v) {                                 \
    moelab_cross_entropy_fwd<TYPE>(logits, targets, loss, v);                                   \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                                    \
      moelab_cross_entropy_bwd_##SUFFIX(const TYPE *logits, const unsigned int *targets,        \
                                        const TYPE *g, TYPE *dlogits, size_t v) {               \
    moelab_cross_entropy_bwd<TYPE>(logits, targets, g, dlogits, v);                             \
  }

MOELAB_FOR_EACH_FLOAT(MOELAB_CROSS_ENTROPY_ENTRY_POINTS)
