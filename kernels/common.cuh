// Shared helpers for moelab's row kernels: element <-> f32 conversion and block reductions.
//
// Every kernel accumulates in f32 whatever the storage type, reads and writes rows of contiguous
// row-major tensors, and is launched with a block size that is a multiple of 32 (see
// MOELAB_BLOCK) so that full-warp shuffles are valid.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stddef.h>

// Threads per block of every row kernel; the Rust launchers use the same number.
#define MOELAB_BLOCK 256

__device__ __forceinline__ float moelab_to_f32(float v) { return v; }
__device__ __forceinline__ float moelab_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float moelab_to_f32(__half v) { return __half2float(v); }

// Round-to-nearest-even conversion back to the storage type.
template <typename T> __device__ __forceinline__ T moelab_from_f32(float v);
template <> __device__ __forceinline__ float moelab_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 moelab_from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half moelab_from_f32<__half>(float v) {
  return __float2half_rn(v);
}

struct MoelabSum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// NaN-ignoring like the CPU reference's `if v > m { v } else { m }` fold.
struct MoelabMax {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op> __device__ __forceinline__ float moelab_warp_reduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Reduces `v` over the whole block and returns the result to every thread. Every thread of the
// block must call it (no early returns before it). blockDim.x must be a multiple of 32 and at
// most 1024. Safe to call several times in a row: the trailing barrier keeps a later call from
// overwriting the scratch before everyone has read this call's result.
template <typename Op>
__device__ __forceinline__ float moelab_block_reduce(float v, Op op, float identity) {
  __shared__ float warp_partials[32];
  __shared__ float block_result;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  v = moelab_warp_reduce(v, op);
  if (lane == 0) {
    warp_partials[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    float w = lane < num_warps ? warp_partials[lane] : identity;
    w = moelab_warp_reduce(w, op);
    if (lane == 0) {
      block_result = w;
    }
  }
  __syncthreads();
  const float result = block_result;
  __syncthreads();
  return result;
}

// Calls MACRO(suffix, type) for each storage type; kernels use it to emit one `extern "C"` entry
// point per type, named `<kernel>_<suffix>` (the names the Rust launchers look up).
#define MOELAB_FOR_EACH_FLOAT(MACRO) \
  MACRO(f32, float)                  \
  MACRO(bf16, __nv_bfloat16)         \
  MACRO(f16, __half)
