// Kernels for the CUDA emulation's own tests (tests/emu_selftest.rs): each `broken` one has one
// classic bug the emulation must report by name; the `ok` ones are their fixed forms, which must
// run cleanly. Compiled only by the cuda-emu build (build.rs), never by nvcc.
//
// Launch: one block of 64 threads (two warps) unless a test says otherwise.

// Neighbour exchange through shared memory with the barrier between write and read missing.
extern "C" __global__ void moelab_emu_broken_race(float *out) {
  __shared__ float s[64];
  s[threadIdx.x] = (float)threadIdx.x;
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

extern "C" __global__ void moelab_emu_ok_race(float *out) {
  __shared__ float s[64];
  s[threadIdx.x] = (float)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// Threads past n return early, so the others wait at a barrier nobody else reaches.
extern "C" __global__ void moelab_emu_broken_barrier(float *out, size_t n) {
  __shared__ float s[64];
  if (threadIdx.x >= n) {
    return;
  }
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[n - 1 - threadIdx.x];
}

extern "C" __global__ void moelab_emu_ok_barrier(float *out, size_t n) {
  __shared__ float s[64];
  if (threadIdx.x < n) {
    s[threadIdx.x] = 1.0f;
  }
  __syncthreads();
  if (threadIdx.x < n) {
    out[threadIdx.x] = s[n - 1 - threadIdx.x];
  }
}

// Off by one: thread i writes s[i + 1], so the last thread writes one past the array.
extern "C" __global__ void moelab_emu_broken_shared_bounds(float *out) {
  __shared__ float s[64];
  s[threadIdx.x + 1] = (float)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// The same through dynamic shared memory, launched with fewer bytes than it indexes.
extern "C" __global__ void moelab_emu_broken_dyn_bounds(float *out) {
  extern __shared__ float moelab_emu_test_dyn[];
  moelab_emu_test_dyn[threadIdx.x] = (float)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = moelab_emu_test_dyn[63 - threadIdx.x];
}

// A half-warp reduction whose first step reads lanes 16..31, outside its 16-lane mask.
extern "C" __global__ void moelab_emu_broken_shuffle(float *out) {
  float v = (float)threadIdx.x;
  if ((threadIdx.x & 31) < 16) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      v += __shfl_down_sync(0x0000ffffu, v, offset);
    }
  }
  out[threadIdx.x] = v;
}

// The same with the offsets it meant (8, 4, 2, 1) over a 16-lane width, so that no lane reads
// past lane 15: lane 0 of each warp gets the sum of lanes 0..16.
extern "C" __global__ void moelab_emu_ok_shuffle(float *out) {
  float v = (float)threadIdx.x;
  if ((threadIdx.x & 31) < 16) {
    for (int offset = 8; offset > 0; offset >>= 1) {
      v += __shfl_down_sync(0x0000ffffu, v, offset, 16);
    }
  }
  out[threadIdx.x] = v;
}

// Every shuffle flavour over full warps: out[4 * t + i] for xor 5, down 3, up 3, idx 7.
extern "C" __global__ void moelab_emu_ok_shuffles(float *out) {
  const float v = (float)threadIdx.x;
  out[4 * threadIdx.x + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[4 * threadIdx.x + 1] = __shfl_down_sync(0xffffffffu, v, 3);
  out[4 * threadIdx.x + 2] = __shfl_up_sync(0xffffffffu, v, 3);
  out[4 * threadIdx.x + 3] = __shfl_sync(0xffffffffu, v, 7);
}

// Writes one element past its output.
extern "C" __global__ void moelab_emu_broken_global_bounds(float *out, size_t n) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) {
    out[i] = 1.0f;
  }
}

// 2-D blocks and a 3-D grid: each thread writes its coordinates' linear index.
extern "C" __global__ void moelab_emu_ok_dims(unsigned int *out) {
  const unsigned int block =
      blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned int threads = blockDim.x * blockDim.y * blockDim.z;
  out[block * threads + thread] = block * 10000u + thread;
  atomicAdd(&out[gridDim.x * gridDim.y * gridDim.z * threads], 1u);
}
