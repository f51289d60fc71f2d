// MoE dispatch: permute token rows into expert order (a row gather) and un-permute the experts'
// outputs back to their tokens with the gate-weighted combine fused in, plus the un-permute's
// backward. The permute's backward is the un-permute with unit gates (the same kernel).
//
// The routing index is a u32 array: token_of_row[rows], then the CSR over tokens
// starts[n_tokens + 1] and row_ids[rows] (token t's rows are row_ids[starts[t]..starts[t + 1]],
// ascending). Every output element is written by exactly one thread, and sums run in row order,
// so results do not depend on the launch shape and need no atomics.
#include "common.cuh"

#include <stdint.h>

// y[r, :] = x[token_of_row[r], :] for r < rows. Launch: grid-stride over rows * d elements.
template <typename T>
__device__ __forceinline__ void moelab_moe_gather(const T *__restrict__ x,
                                                  const uint32_t *__restrict__ token_of_row,
                                                  T *__restrict__ y, size_t rows, size_t d) {
  const size_t n = rows * d;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / d;
    y[i] = x[(size_t)token_of_row[r] * d + (i - r * d)];
  }
}

// out[t, :] = sum over token t's rows r (ascending) of gates[r] * rows_in[r, :]; zero for a
// token without rows. Launch: grid-stride over n_tokens * d elements.
template <typename T>
__device__ __forceinline__ void moelab_moe_combine(const T *__restrict__ rows_in,
                                                   const T *__restrict__ gates,
                                                   const uint32_t *__restrict__ starts,
                                                   const uint32_t *__restrict__ row_ids,
                                                   T *__restrict__ out, size_t n_tokens,
                                                   size_t d) {
  const size_t n = n_tokens * d;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const size_t t = i / d;
    const size_t j = i - t * d;
    float sum = 0.0f;
    for (uint32_t k = starts[t]; k < starts[t + 1]; ++k) {
      const size_t r = row_ids[k];
      sum += moelab_to_f32(gates[r]) * moelab_to_f32(rows_in[r * d + j]);
    }
    out[i] = moelab_from_f32<T>(sum);
  }
}

// The un-permute's backward, with t = token_of_row[r]: out[r * d + j] = gates[r] grad[t, j]
// (d_rows), out[rows * d + r] = <rows_in[r, :], grad[t, :]> (d_gates). Launch: one block per
// row, block = MOELAB_BLOCK.
template <typename T>
__device__ __forceinline__ void moelab_moe_unpermute_bwd(const T *__restrict__ rows_in,
                                                         const T *__restrict__ gates,
                                                         const T *__restrict__ grad,
                                                         const uint32_t *__restrict__ token_of_row,
                                                         T *__restrict__ out, size_t rows,
                                                         size_t d) {
  const size_t r = blockIdx.x;
  const T *g = grad + (size_t)token_of_row[r] * d;
  const T *x = rows_in + r * d;
  T *d_row = out + r * d;
  const float gate = moelab_to_f32(gates[r]);
  float dot = 0.0f;
  for (size_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float gv = moelab_to_f32(g[j]);
    d_row[j] = moelab_from_f32<T>(gate * gv);
    dot += gv * moelab_to_f32(x[j]);
  }
  dot = moelab_block_reduce(dot, MoelabSum(), 0.0f);
  if (threadIdx.x == 0) {
    out[rows * d + r] = moelab_from_f32<T>(dot);
  }
}

#define MOELAB_MOE_DISPATCH_ENTRY_POINTS(SUFFIX, TYPE)                                        \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                                  \
      moelab_moe_gather_##SUFFIX(const TYPE *x, const uint32_t *token_of_row, TYPE *y,        \
                                 size_t rows, size_t d) {                                     \
    moelab_moe_gather<TYPE>(x, token_of_row, y, rows, d);                                     \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                                  \
      moelab_moe_combine_##SUFFIX(const TYPE *rows_in, const TYPE *gates,                     \
                                  const uint32_t *starts, const uint32_t *row_ids, TYPE *out, \
                                  size_t n_tokens, size_t d) {                                \
    moelab_moe_combine<TYPE>(rows_in, gates, starts, row_ids, out, n_tokens, d);              \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)                                  \
      moelab_moe_unpermute_bwd_##SUFFIX(const TYPE *rows_in, const TYPE *gates,               \
                                        const TYPE *grad, const uint32_t *token_of_row,       \
                                        TYPE *out, size_t rows, size_t d) {                   \
    moelab_moe_unpermute_bwd<TYPE>(rows_in, gates, grad, token_of_row, out, rows, d);         \
  }

MOELAB_FOR_EACH_FLOAT(MOELAB_MOE_DISPATCH_ENTRY_POINTS)
