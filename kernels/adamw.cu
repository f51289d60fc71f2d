// The optimizer's device kernels: the fused AdamW update of one f32 parameter in place, and the
// sum of squares of a gradient (the global grad norm's terms) as a two-pass block reduction.
#include "common.cuh"

// One AdamW step per element, in place, with g = scale grad:
//   m = m keep1 + g take1;  v = v keep2 + g^2 take2;
//   p = p keep - lr (m inv_c1) / (sqrt(v inv_c2) + eps).
// Every operation is an explicitly rounded f32 intrinsic (no FMA contraction), in the order the
// composed tensor update performs them one op at a time, so both give the same bits.
// Launch: grid-stride over the n elements.
extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)
    moelab_adamw_f32(float *__restrict__ p, float *__restrict__ m, float *__restrict__ v,
                     const float *__restrict__ grad, size_t n, float scale, float keep1,
                     float take1, float keep2, float take2, float inv_c1, float inv_c2,
                     float eps, float lr, float keep) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float g = __fmul_rn(grad[i], scale);
    const float mi = __fadd_rn(__fmul_rn(m[i], keep1), __fmul_rn(g, take1));
    const float vi = __fadd_rn(__fmul_rn(v[i], keep2), __fmul_rn(__fmul_rn(g, g), take2));
    const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(vi, inv_c2)), eps);
    const float step = __fdiv_rn(__fmul_rn(mi, inv_c1), denom);
    m[i] = mi;
    v[i] = vi;
    p[i] = __fsub_rn(__fmul_rn(p[i], keep), __fmul_rn(step, lr));
  }
}

// Pass 1 of sum(x^2): block b sums the squares of its grid-stride share (in f32) into
// partials[b]. Launch: any grid of MOELAB_BLOCK-thread blocks; the launcher fixes it from n
// alone, so the result does not depend on the device.
template <typename T>
__device__ __forceinline__ void moelab_sum_squares_partial(const T *__restrict__ x,
                                                           float *__restrict__ partials,
                                                           size_t n) {
  float sum = 0.0f;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float v = moelab_to_f32(x[i]);
    sum += v * v;
  }
  sum = moelab_block_reduce(sum, MoelabSum(), 0.0f);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sum;
  }
}

// Pass 2: out[0] = sum of the n partials. Launch: one block of MOELAB_BLOCK threads.
extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)
    moelab_sum_f32(const float *__restrict__ partials, float *__restrict__ out, size_t n) {
  float sum = 0.0f;
  for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
    sum += partials[i];
  }
  sum = moelab_block_reduce(sum, MoelabSum(), 0.0f);
  if (threadIdx.x == 0) {
    out[0] = sum;
  }
}

#define MOELAB_SUM_SQUARES_ENTRY_POINTS(SUFFIX, TYPE)                                     \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                              \
      moelab_sum_squares_partial_##SUFFIX(const TYPE *x, float *partials, size_t n) {     \
    moelab_sum_squares_partial<TYPE>(x, partials, n);                                     \
  }

MOELAB_FOR_EACH_FLOAT(MOELAB_SUM_SQUARES_ENTRY_POINTS)
