// Deterministic warp and block reductions shared by the device code of every loss.
//
// Device code only: includes nothing but compat.cuh. Sums run in a fixed tree (a butterfly of warp shuffles,
// then the warps' results added by thread 0 in warp order), so a block's result depends only on the values
// each thread holds, never on timing. Kernels combine them with per-block partials in global memory and a
// single-block finish kernel that adds the partials in a fixed order: no floating-point atomics, no host
// synchronisation.
#pragma once

#include "compat.cuh"

namespace xent::cuda {

constexpr unsigned kFullWarpMask = 0xffffffffu;

// Lane 0's v, in every lane of a full warp.
template <class T>
__device__ inline T shfl_lane0(T v) {
  return __shfl_sync(kFullWarpMask, v, 0);
}

// Sum over the 32 lanes of a full warp; every lane gets the same value (lane 0's is the one used).
template <class T>
__device__ inline T warp_sum(T v) {
XENT_UNROLL
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullWarpMask, v, off);
  return v;
}

// Sums v over a block of kThreads threads (a multiple of 32) in a fixed tree; the sum is returned in
// thread 0 (the other threads' return values are meaningless). Every thread of the block must call it.
// smem: kThreads / 32 values of T.
template <int kThreads, class T>
__device__ inline T block_sum(T v, T* smem) {
  static_assert(kThreads % 32 == 0, "block_sum: whole warps");
  constexpr int kW = kThreads / 32;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    v = smem[0];
    for (int w = 1; w < kW; ++w) v += smem[w];
  }
  return v;
}

// Sums (v0, v1) over a block of kThreads threads in a fixed tree; the sums end up in thread 0's v0, v1 (the
// other threads' values are meaningless). Every thread of the block must call it. smem: 2 * kThreads / 32.
template <int kThreads, class T>
__device__ inline void block_sum2(T& v0, T& v1, T* smem) {
  static_assert(kThreads % 32 == 0, "block_sum2: whole warps");
  constexpr int kW = kThreads / 32;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  v0 = warp_sum(v0);
  v1 = warp_sum(v1);
  if (lane == 0) {
    smem[warp] = v0;
    smem[kW + warp] = v1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    v0 = smem[0];
    v1 = smem[kW];
    for (int w = 1; w < kW; ++w) {
      v0 += smem[w];
      v1 += smem[kW + w];
    }
  }
}

// A block's partial sum for a finish kernel: block_sum, then thread 0 stores it as partials[blockIdx.x].
template <int kThreads, class T>
__device__ inline void store_block_sum(T v, T* smem, T* partials) {
  v = block_sum<kThreads>(v, smem);
  if (threadIdx.x == 0) store_global(partials + blockIdx.x, v);
}

// A block's two partial sums for a finish kernel: block_sum2, then thread 0 stores them in the two halves of
// the partials buffer, partials[blockIdx.x] and partials[n_blocks + blockIdx.x].
template <int kThreads, class T>
__device__ inline void store_block_sum2(T v0, T v1, T* smem, T* partials, int64_t n_blocks) {
  block_sum2<kThreads>(v0, v1, smem);
  if (threadIdx.x == 0) {
    store_global(partials + blockIdx.x, v0);
    store_global(partials + n_blocks + blockIdx.x, v1);
  }
}

// The sum of partials[0, n) by one block of kThreads threads: thread t adds partials t, t + kThreads, ...
// in order, then block_sum. The result is in thread 0. smem: kThreads / 32 values of T.
template <int kThreads, class T>
__device__ inline T block_sum_of(const T* partials, int64_t n, T* smem) {
  T v = T(0);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) v += load_global(partials + i);
  return block_sum<kThreads>(v, smem);
}

// The sums of a[0, n) and b[0, n) (a null array sums to 0) by one block, in the order of block_sum_of; the
// results are in thread 0's sa, sb. smem: 2 * kThreads / 32 values of T.
template <int kThreads, class T>
__device__ inline void block_sum2_of(const T* a, const T* b, int64_t n, T& sa, T& sb, T* smem) {
  sa = T(0);
  sb = T(0);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    if (a != nullptr) sa += load_global(a + i);
    if (b != nullptr) sb += load_global(b + i);
  }
  block_sum2<kThreads>(sa, sb, smem);
}

} // namespace xent::cuda
