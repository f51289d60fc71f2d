// Rotary position embedding (non-interleaved "rotate_half" layout); its backward is the same
// kernel with -sin.
//
// Launch: 1D grid-stride loop over the rows * (d / 2) rotation pairs, block = MOELAB_BLOCK,
// grid = ceil(pairs / MOELAB_BLOCK) capped by the Rust launcher (the loop covers the rest).
#include "common.cuh"

// For x (rows, d) whose row r sits at position r % t, with cos/sin (t, d/2):
// y1 = x1*cos - x2*sin, y2 = x2*cos + x1*sin for the halves x1 = x[:, :d/2], x2 = x[:, d/2:].
template <typename T>
__device__ __forceinline__ void moelab_rope_fwd(const T *__restrict__ x,
                                                const T *__restrict__ cos_table,
                                                const T *__restrict__ sin_table,
                                                T *__restrict__ y, size_t rows, size_t t,
                                                size_t d) {
  const size_t half = d / 2;
  const size_t pairs = rows * half;
  const size_t stride = (size_t)blockDim.x * gridDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += stride) {
    const size_t row = i / half;
    const size_t k = i % half;
    const size_t pos = row % t;
    const float c = moelab_to_f32(cos_table[pos * half + k]);
    const float s = moelab_to_f32(sin_table[pos * half + k]);
    const size_t lo = row * d + k;
    const size_t hi = lo + half;
    const float a = moelab_to_f32(x[lo]);
    const float b = moelab_to_f32(x[hi]);
    y[lo] = moelab_from_f32<T>(a * c - b * s);
    y[hi] = moelab_from_f32<T>(b * c + a * s);
  }
}

#define MOELAB_ROPE_ENTRY_POINTS(SUFFIX, TYPE)                                                  \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                                    \
      moelab_rope_fwd_##SUFFIX(const TYPE *x, const TYPE *cos_table, const TYPE *sin_table,     \
                               TYPE *y, size_t rows, size_t t, size_t d) {                      \
    moelab_rope_fwd<TYPE>(x, cos_table, sin_table, y, rows, t, d);                              \
  }

MOELAB_FOR_EACH_FLOAT(MOELAB_ROPE_ENTRY_POINTS)
