// SwiGLU gate `y = silu(gate) * up`, `silu(x) = x sigmoid(x)`, forward and backward, elementwise.
//
// Launch: a grid-stride loop over the n elements (any grid; the launchers use at most 2^16
// blocks of MOELAB_BLOCK threads).
#include "common.cuh"

__device__ __forceinline__ float moelab_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__device__ __forceinline__ void moelab_swiglu_fwd(const T *__restrict__ gate,
                                                  const T *__restrict__ up, T *__restrict__ y,
                                                  size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float g = moelab_to_f32(gate[i]);
    y[i] = moelab_from_f32<T>(g * moelab_sigmoid(g) * moelab_to_f32(up[i]));
  }
}

// out[0..n) = dgate = grad up s (1 + gate (1 - s)), out[n..2n) = dup = grad gate s, with
// s = sigmoid(gate): the flat layout of the CPU backward op.
template <typename T>
__device__ __forceinline__ void moelab_swiglu_bwd(const T *__restrict__ gate,
                                                  const T *__restrict__ up,
                                                  const T *__restrict__ grad,
                                                  T *__restrict__ out, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float g = moelab_to_f32(gate[i]);
    const float u = moelab_to_f32(up[i]);
    const float d = moelab_to_f32(grad[i]);
    const float s = moelab_sigmoid(g);
    out[i] = moelab_from_f32<T>(d * u * s * (1.0f + g * (1.0f - s)));
    out[n + i] = moelab_from_f32<T>(d * g * s);
  }
}

#define MOELAB_SWIGLU_ENTRY_POINTS(SUFFIX, TYPE)                                          \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                              \
      moelab_swiglu_fwd_##SUFFIX(const TYPE *gate, const TYPE *up, TYPE *y, size_t n) {   \
    moelab_swiglu_fwd<TYPE>(gate, up, y, n);                                              \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                              \
      moelab_swiglu_bwd_##SUFFIX(const TYPE *gate, const TYPE *up, const TYPE *grad,      \
                                 TYPE *out, size_t n) {                                   \
    moelab_swiglu_bwd<TYPE>(gate, up, grad, out, n);                                      \
  }

MOELAB_FOR_EACH_FLOAT(MOELAB_SWIGLU_ENTRY_POINTS)
