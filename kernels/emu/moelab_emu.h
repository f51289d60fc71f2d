// Host-C++ emulation of the parts of the CUDA execution model that kernels/*.cu use, so that
// the same, unchanged kernel sources compile with g++ or clang (moelab-kernels feature
// `cuda-emu`) and run in CI without a GPU.
//
// What it provides (the runtime, with every check, is kernels/emu/runtime.cpp):
// - gridDim / blockDim / blockIdx / threadIdx (1-3 D). A block's threads are cooperative fibers
//   on one OS thread, each with its own stack; they switch only at __syncthreads() and at the
//   warp intrinsics, so everything between two such points runs as one uninterrupted piece.
// - __shared__: `thread_local`. A block's fibers share their OS thread, and one OS thread runs
//   one block at a time, so a thread_local is exactly one block's shared variable; this also
//   keeps `extern __shared__ T name[]` valid C++ (build.rs defines each such array, sized to the
//   largest dynamic allocation, and the runtime checks accesses against the launch's bytes).
// - Warp shuffles, __syncwarp, __activemask and __ballot_sync, executed in lock-step over the
//   lanes of a warp; atomics; __half / __nv_bfloat16 with round-to-nearest-even conversions;
//   the explicitly rounded float intrinsics (the build uses -ffp-contract=off, so `a * b + c`
//   is never fused, as `__fmul_rn` / `__fadd_rn` require).
//
// This header is compiled with the kernels, so it is instrumented like them (ASan's compiler
// instrumentation calls into the runtime on every load and store): it must only touch its own
// arguments and locals, and leave all shared state to the runtime's out-of-line functions.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MOELAB_EMU 1

// Capacity of each `extern __shared__` array (build.rs defines them), and so the largest
// dynamic shared-memory launch: 48 KiB, what a launch may use without opting in to more.
#define MOELAB_EMU_MAX_DYN_SHARED 49152

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ thread_local

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
};

extern "C" {
// The calling fiber's thread index, its block's index, and the launch's dimensions.
uint3 moelab_emu_thread_idx(void);
uint3 moelab_emu_block_idx(void);
dim3 moelab_emu_block_dim(void);
dim3 moelab_emu_grid_dim(void);
// __syncthreads() at file:line (named in deadlock reports).
void moelab_emu_syncthreads(const char *file, int line);
// One warp collective: kind (see MoelabEmuWarpOp), the mask, this lane's 64-bit payload and
// argument (lane mask, delta or source lane), and width; returns this lane's result.
uint64_t moelab_emu_warp(int kind, uint32_t mask, uint64_t value, int arg, int width,
                         const char *file, int line);
// Atomic read-modify-write of a 4- or 8-byte word; returns the old value.
uint64_t moelab_emu_atomic(int op, void *addr, int bytes, uint64_t value, uint64_t compare,
                           const char *file, int line);
}

#define threadIdx (moelab_emu_thread_idx())
#define blockIdx (moelab_emu_block_idx())
#define blockDim (moelab_emu_block_dim())
#define gridDim (moelab_emu_grid_dim())
#define warpSize 32

// The kinds of moelab_emu_warp.
enum MoelabEmuWarpOp {
  MOELAB_EMU_SHFL_IDX = 0,
  MOELAB_EMU_SHFL_XOR = 1,
  MOELAB_EMU_SHFL_DOWN = 2,
  MOELAB_EMU_SHFL_UP = 3,
  MOELAB_EMU_SYNCWARP = 4,
  MOELAB_EMU_BALLOT = 5,
  MOELAB_EMU_ACTIVEMASK = 6,
};

// The kinds of moelab_emu_atomic.
enum MoelabEmuAtomicOp {
  MOELAB_EMU_ATOMIC_ADD_U = 0,
  MOELAB_EMU_ATOMIC_ADD_F32 = 1,
  MOELAB_EMU_ATOMIC_MAX_U = 2,
  MOELAB_EMU_ATOMIC_MAX_I = 3,
  MOELAB_EMU_ATOMIC_CAS = 4,
  MOELAB_EMU_ATOMIC_EXCH = 5,
  MOELAB_EMU_ATOMIC_MIN_U = 6,
  MOELAB_EMU_ATOMIC_MIN_I = 7,
};

inline void __syncthreads(const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  moelab_emu_syncthreads(file, line);
}

// ---- warp intrinsics ----------------------------------------------------------------------

template <typename T> inline uint64_t moelab_emu_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T> inline T moelab_emu_from_bits(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}

template <typename T>
inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize,
                     const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  return moelab_emu_from_bits<T>(moelab_emu_warp(MOELAB_EMU_SHFL_IDX, mask, moelab_emu_bits(var),
                                                 src_lane, width, file, line));
}

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize,
                         const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  return moelab_emu_from_bits<T>(moelab_emu_warp(MOELAB_EMU_SHFL_XOR, mask, moelab_emu_bits(var),
                                                 lane_mask, width, file, line));
}

template <typename T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                          const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  return moelab_emu_from_bits<T>(moelab_emu_warp(MOELAB_EMU_SHFL_DOWN, mask,
                                                 moelab_emu_bits(var), (int)delta, width, file,
                                                 line));
}

template <typename T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                        const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  return moelab_emu_from_bits<T>(moelab_emu_warp(MOELAB_EMU_SHFL_UP, mask, moelab_emu_bits(var),
                                                 (int)delta, width, file, line));
}

inline void __syncwarp(unsigned int mask = 0xffffffffu, const char *file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  moelab_emu_warp(MOELAB_EMU_SYNCWARP, mask, 0, 0, warpSize, file, line);
}

inline unsigned int __ballot_sync(unsigned int mask, int predicate,
                                  const char *file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
  return (unsigned int)moelab_emu_warp(MOELAB_EMU_BALLOT, mask, predicate != 0, 0, warpSize, file,
                                       line);
}

inline int __any_sync(unsigned int mask, int predicate, const char *file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return __ballot_sync(mask, predicate, file, line) != 0;
}

inline int __all_sync(unsigned int mask, int predicate, const char *file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return __ballot_sync(mask, predicate, file, line) == mask;
}

inline unsigned int __activemask(const char *file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
  return (unsigned int)moelab_emu_warp(MOELAB_EMU_ACTIVEMASK, 0, 0, 0, warpSize, file, line);
}

// ---- atomics --------------------------------------------------------------------------------

#define MOELAB_EMU_ATOMIC(NAME, TYPE, OP)                                                      \
  inline TYPE NAME(TYPE *address, TYPE val, const char *file = __builtin_FILE(),              \
                   int line = __builtin_LINE()) {                                             \
    return moelab_emu_from_bits<TYPE>(moelab_emu_atomic(OP, address, sizeof(TYPE),            \
                                                        moelab_emu_bits(val), 0, file, line)); \
  }

MOELAB_EMU_ATOMIC(atomicAdd, unsigned int, MOELAB_EMU_ATOMIC_ADD_U)
MOELAB_EMU_ATOMIC(atomicAdd, int, MOELAB_EMU_ATOMIC_ADD_U)
MOELAB_EMU_ATOMIC(atomicAdd, unsigned long long, MOELAB_EMU_ATOMIC_ADD_U)
MOELAB_EMU_ATOMIC(atomicAdd, float, MOELAB_EMU_ATOMIC_ADD_F32)
MOELAB_EMU_ATOMIC(atomicMax, unsigned int, MOELAB_EMU_ATOMIC_MAX_U)
MOELAB_EMU_ATOMIC(atomicMax, int, MOELAB_EMU_ATOMIC_MAX_I)
MOELAB_EMU_ATOMIC(atomicMax, unsigned long long, MOELAB_EMU_ATOMIC_MAX_U)
MOELAB_EMU_ATOMIC(atomicMin, unsigned int, MOELAB_EMU_ATOMIC_MIN_U)
MOELAB_EMU_ATOMIC(atomicMin, int, MOELAB_EMU_ATOMIC_MIN_I)
MOELAB_EMU_ATOMIC(atomicExch, unsigned int, MOELAB_EMU_ATOMIC_EXCH)
MOELAB_EMU_ATOMIC(atomicExch, int, MOELAB_EMU_ATOMIC_EXCH)
MOELAB_EMU_ATOMIC(atomicExch, float, MOELAB_EMU_ATOMIC_EXCH)
#undef MOELAB_EMU_ATOMIC

#define MOELAB_EMU_ATOMIC_CAS_FN(TYPE)                                                           \
  inline TYPE atomicCAS(TYPE *address, TYPE compare, TYPE val,                                   \
                        const char *file = __builtin_FILE(), int line = __builtin_LINE()) {      \
    return moelab_emu_from_bits<TYPE>(moelab_emu_atomic(MOELAB_EMU_ATOMIC_CAS, address,          \
                                                        sizeof(TYPE), moelab_emu_bits(val),      \
                                                        moelab_emu_bits(compare), file, line)); \
  }
MOELAB_EMU_ATOMIC_CAS_FN(unsigned int)
MOELAB_EMU_ATOMIC_CAS_FN(int)
MOELAB_EMU_ATOMIC_CAS_FN(unsigned long long)
#undef MOELAB_EMU_ATOMIC_CAS_FN

// ---- __half and __nv_bfloat16 --------------------------------------------------------------

// Storage-only 16-bit floats (the kernels convert to f32 for all arithmetic).
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
typedef __nv_bfloat16 nv_bfloat16;

inline uint32_t moelab_emu_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

inline float moelab_emu_bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline float __bfloat162float(__nv_bfloat16 h) { return moelab_emu_bits_f32((uint32_t)h.__x << 16); }

// Round to nearest even; NaN becomes the canonical 0x7fff as on the device.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = moelab_emu_f32_bits(f);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.__x = 0x7fff;
    return h;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  h.__x = (unsigned short)(u >> 16);
  return h;
}

inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1fu;
  const uint32_t mant = h.__x & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in f32.
    const float v = (float)mant * 5.9604644775390625e-08f;
    return moelab_emu_bits_f32(moelab_emu_f32_bits(v) | sign);
  }
  if (exp == 31) {
    return moelab_emu_bits_f32(sign | 0x7f800000u | (mant << 13));
  }
  return moelab_emu_bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, overflow to infinity, subnormals rounded exactly; NaN becomes the
// canonical 0x7fff as on the device.
inline __half __float2half_rn(float f) {
  const uint32_t u = moelab_emu_f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  __half h;
  if (a > 0x7f800000u) {
    h.__x = 0x7fff;
  } else if (a >= 0x477ff000u) {
    // >= 65520 (halfway between 65504 and 2^16) rounds to infinity.
    h.__x = (unsigned short)(sign | 0x7c00u);
  } else if (a < 0x38800000u) {
    // Below the smallest normal half: a multiple of 2^-24; the scaling by 2^24 is exact, and
    // nearbyintf rounds to nearest even in the default rounding mode.
    const float scaled = moelab_emu_bits_f32(a) * 16777216.0f;
    h.__x = (unsigned short)(sign | (uint32_t)nearbyintf(scaled));
  } else {
    const uint32_t mant = a & 0x7fffffu;
    uint32_t r = (((a >> 23) - 112u) << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) {
      ++r;  // a carry out of the mantissa correctly bumps the exponent
    }
    h.__x = (unsigned short)(sign | r);
  }
  return h;
}

inline __half __float2half(float f) { return __float2half_rn(f); }

// ---- math -----------------------------------------------------------------------------------

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __int_as_float(int i) { return moelab_emu_bits_f32((uint32_t)i); }
inline int __float_as_int(float f) { return (int)moelab_emu_f32_bits(f); }
inline float __uint_as_float(unsigned int i) { return moelab_emu_bits_f32(i); }
inline unsigned int __float_as_uint(float f) { return moelab_emu_f32_bits(f); }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's overloaded min / max (float ones ignore NaN like fminf / fmaxf).
template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
