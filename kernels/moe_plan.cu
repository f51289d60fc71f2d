// The MoE dispatch plan on the device: from each token's k chosen experts (router_topk's ids) and
// the per-expert row offsets (the exclusive prefix sum of router_topk's histogram), the routing
// index kernels/moe_dispatch.cu reads, without copying the ids to the host. Rows are grouped by
// expert and, within an expert, in token order: the order the host plan (crates/moelab-model's
// DispatchPlan without a capacity) and crate::moe_dispatch::Routing give.
//
// Output `index` is the packed routing index: token_of_row (rows), starts (tokens + 1), row_ids
// (rows, each token's rows ascending); `assignment_of_row[r]` is the flat token * k + slot of row
// r (to gather the gates); `row_of_assignment` is scratch (its inverse). rows = tokens * k.
#include "common.cuh"

#include <stdint.h>

// Launch: one block of MOELAB_BLOCK threads per expert. The block walks the assignments in
// order, blockDim at a time; a warp ballot and the per-warp counts give each of the expert's
// assignments its rank, so rows keep token order (a stable counting sort).
extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)
    moelab_moe_plan_scatter(const uint32_t *__restrict__ ids, const uint32_t *__restrict__ offsets,
                            uint32_t *__restrict__ index, uint32_t *__restrict__ assignment_of_row,
                            uint32_t *__restrict__ row_of_assignment, size_t n_assign,
                            size_t k) {
  __shared__ uint32_t warp_counts[32];
  __shared__ uint32_t base;
  const uint32_t expert = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  if (threadIdx.x == 0) {
    base = offsets[expert];
  }
  __syncthreads();
  for (size_t a0 = 0; a0 < n_assign; a0 += blockDim.x) {
    const size_t a = a0 + threadIdx.x;
    const bool mine = a < n_assign && ids[a] == expert;
    const unsigned int ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) {
      warp_counts[warp] = __popc(ballot);
    }
    __syncthreads();
    uint32_t row = base + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) {
      row += warp_counts[w];
    }
    if (mine) {
      index[row] = (uint32_t)(a / k);
      assignment_of_row[row] = (uint32_t)a;
      row_of_assignment[a] = row;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 0; w < num_warps; ++w) {
        base += warp_counts[w];
      }
    }
    __syncthreads();
  }
}

// Launch: a grid-stride loop over the tokens. Token t's rows are its k assignments' rows,
// sorted ascending (insertion sort: k is small), at starts[t] = t * k.
extern "C" __global__ void __launch_bounds__(MOELAB_BLOCK)
    moelab_moe_plan_csr(const uint32_t *__restrict__ row_of_assignment,
                        uint32_t *__restrict__ index, size_t tokens, size_t k) {
  const size_t rows = tokens * k;
  uint32_t *starts = index + rows;
  uint32_t *row_ids = starts + tokens + 1;
  for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < tokens;
       t += (size_t)gridDim.x * blockDim.x) {
    uint32_t *out = row_ids + t * k;
    for (size_t j = 0; j < k; ++j) {
      const uint32_t r = row_of_assignment[t * k + j];
      size_t i = j;
      while (i > 0 && out[i - 1] > r) {
        out[i] = out[i - 1];
        --i;
      }
      out[i] = r;
    }
    starts[t] = (uint32_t)(t * k);
    if (t + 1 == tokens) {
      starts[tokens] = (uint32_t)rows;
    }
  }
}
