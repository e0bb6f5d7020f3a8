// Negative log-likelihood device code: forward gather, deterministic reduction, backward zero-fill and
// scatter.
//
// Device code only. It includes nothing but compat.cuh, the shared device headers acc_type.cuh and reduce.cuh
// (and <cstdint>), so that the same source compiles under nvcc and, as plain C++, under the SIMT emulator
// (tests/simt). Every global memory access goes through xent::cuda::load_global / store_global (the emulator
// counts the bytes). Host launch code: nll_loss.cu.
//
// Note [CUDA nll_loss kernels]
// ----------------------------
// The input holds log-probabilities (N, C, d1, ..., dk); a position p = (n, s) is numbered as in the
// contiguous (N, d1, ..., dk) target, loss and grad_loss tensors. loss_p = -w[t_p] * x[n, t_p, s], 0 where
// t_p == ignore_index (compared before the bounds check); a target outside [0, C) otherwise fails the
// device-side assert of target_check.cuh.
//
// No pass over the classes. The position dims (N, d1, ..., dk) of the tensor a kernel indexes (the input in
// the forward, the gradient in the backward) come as up to kMaxPositionDims merged (size, stride) pairs
// (PositionDims, built on the host), plus the class stride: any strided layout (transposed, sliced,
// channels-last, broadcast, misaligned) is indexed in place. Only layouts whose position dims do not merge
// into kMaxPositionDims (k >= 4 permuted spatial dims) go through a contiguous copy (nll_loss.cu).
//
// Forward (fwd_kernel): a block owns kPositionsPerBlock consecutive positions, kPositionsPerThread per
// thread (strided by kBlock, so every load of targets and losses is coalesced); each thread first loads its
// targets, then the weights and gathered log-probabilities, then stores the losses (reduction none). Every
// block also sums its losses and its weights w_t (the mean's denominator, returned as total_weight) in a
// fixed tree and stores the two partials; finish_kernel, a single block, sums the partials in a fixed order
// and writes total_weight and, for mean / sum, the loss. Traffic: O(positions), never O(N * C).
//
// Arithmetic mirrors the CPU op: a loss is -w * x in the accumulation dtype (float, double for double
// inputs; the product of two floats rounded once, as the CPU's double product rounded to float), and the
// sums over positions run in double for every dtype (total_weight counts stay exact beyond 2^24 positions),
// as do the backward's grad_loss / total_weight and its product with -w for sum / mean. So the per-position
// losses and every gradient equal the CPU op's bitwise; the sums differ only in their order.
//
// Backward: the gradient is zero except grad[n, t_p, s] = -w[t_p] * s_p, s_p = grad_loss[p] (none),
// grad_loss (sum) or grad_loss / total_weight (mean), both read on the device. Two kernels on one stream
// (so the second starts after the first has finished): zero_fill_kernel zeroes the gradient's storage (it
// is dense: numel elements from its data pointer) with 128-bit stores after a byte head that reaches 16-byte
// alignment and before a byte tail; scatter_kernel then writes one element per non-ignored position.
// Positions have distinct (n, s), so no two threads write the same element. Traffic: the gradient written
// once plus O(positions).
//
// No floating-point atomics; results depend only on the shapes and values. Indices are int64 throughout.
#pragma once

#include "acc_type.cuh"
#include "compat.cuh"
#include "merged_dims.cuh"
#include "reduce.cuh"
#include "target_check.cuh"

#include <cstdint>

namespace xent::cuda::nll {

// Every kernel runs 256-thread blocks, except finish_kernel (kFinishBlock threads), and declares
// __launch_bounds__(threads, 1): without the minimum-blocks hint ptxas caps the scatter kernels at 48
// registers and spills around position_offset's 64-bit division (scatter_kernel<double, int64_t>).
constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
constexpr int kPositionsPerThread = 4;
constexpr int kPositionsPerBlock = kBlock * kPositionsPerThread;
constexpr int kFinishBlock = 512;
// zero_fill_kernel: 16-byte vectors per thread (a block zeroes 16 KiB).
constexpr int kFillVectorsPerThread = 4;
constexpr int kFillVectorsPerBlock = kBlock * kFillVectorsPerThread;
// Merged position dims a kernel indexes directly (more: the host makes the tensor contiguous).
constexpr int kMaxPositionDims = kMaxMergedDims;

// AccType, to_acc, from_acc: acc_type.cuh; the block sums: reduce.cuh (both in xent::cuda). The host code
// names nll::AccType.
using ::xent::cuda::AccType;

// The position dims (N, d1, ..., dk) of one tensor (merged_dims.cuh: the class dim dropped too). size[0] is
// never needed.
using PositionDims = MergedDims;

// Element offset of position p (row-major over the dims).
__device__ inline int64_t position_offset(const PositionDims& d, int64_t p) {
  int64_t off = 0;
XENT_UNROLL
  for (int i = kMaxPositionDims - 1; i >= 1; --i) {
    if (i < d.ndim) {
      const int64_t q = p / d.size[i];
      off += (p - q * d.size[i]) * d.stride[i];
      p = q;
    }
  }
  return off + p * d.stride[0];
}

// What both kernels read per position: the class-index targets and class weights, and where class t of
// position p lies in the tensor they index (the input in the forward, the gradient in the backward).
template <class acc_t, class target_t>
struct Positions {
  PositionDims dims;  // the indexed tensor's position dims
  int64_t sc = 0;     // its class stride
  const target_t* target = nullptr;  // (P) contiguous
  int64_t P = 0, C = 0, ignore_index = -100;
  const acc_t* weight = nullptr;  // (C) or null

  __device__ int64_t offset(int64_t p, int64_t t) const { return position_offset(dims, p) + t * sc; }
  __device__ acc_t weight_of(int64_t t) const { return weight != nullptr ? load_global(weight + t) : acc_t(1); }
};

// The targets of a thread's K positions p0 + i * kBlock, loaded first (K loads in flight), and whether each
// is used: inside [0, P), not ignore_index, and in [0, C) (else the device-side assert fails).
template <int K, class acc_t, class target_t>
__device__ inline void load_targets(const Positions<acc_t, target_t>& pos, int64_t p0, int64_t (&t)[K],
                                    bool (&use)[K]) {
XENT_UNROLL
  for (int i = 0; i < K; ++i) {
    const int64_t p = p0 + i * kBlock;
    t[i] = p < pos.P ? static_cast<int64_t>(load_global(pos.target + p)) : pos.ignore_index;
    use[i] = false;
    if (p < pos.P && t[i] != pos.ignore_index) use[i] = target_in_range<TargetOp::kNllLoss>(t[i], pos.C);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward.

template <class scalar_t, class target_t>
struct FwdParams {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* x = nullptr;          // the input
  Positions<acc_t, target_t> pos;       // indexing the input
  scalar_t* loss = nullptr;             // reduction none: (P) contiguous; else null
  double* partials = nullptr;           // [n_blocks] loss sums, then [n_blocks] weight sums
  int64_t n_blocks = 0;
};

template <class scalar_t, class target_t>
__global__ void __launch_bounds__(kBlock, 1) fwd_kernel(const FwdParams<scalar_t, target_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int K = kPositionsPerThread;
  __shared__ double sh_sum[2 * kWarps];
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kPositionsPerBlock + threadIdx.x;
  // Targets first, then every gathered value: K independent loads in flight per thread and phase.
  int64_t t[K];
  bool use[K];
  load_targets<K>(a.pos, p0, t, use);
  acc_t w[K], x[K];
XENT_UNROLL
  for (int i = 0; i < K; ++i) {
    w[i] = acc_t(0);
    x[i] = acc_t(0);
    if (use[i]) {
      w[i] = a.pos.weight_of(t[i]);
      x[i] = to_acc(load_global(a.x + a.pos.offset(p0 + i * kBlock, t[i])));
    }
  }
  double loss_sum = 0, weight_sum = 0;
XENT_UNROLL
  for (int i = 0; i < K; ++i) {
    const int64_t p = p0 + i * kBlock;
    const acc_t l = use[i] ? -w[i] * x[i] : acc_t(0);
    loss_sum += static_cast<double>(l);
    weight_sum += static_cast<double>(w[i]);
    if (a.loss != nullptr && p < a.pos.P) store_global(a.loss + p, from_acc<scalar_t>(l));
  }
  store_block_sum2<kBlock>(loss_sum, weight_sum, sh_sum, a.partials, a.n_blocks);
}

template <class scalar_t>
struct FinishParams {
  const double* partials = nullptr;  // [n] loss sums, then [n] weight sums
  int64_t n = 0;
  bool mean = false;                  // loss = loss sum / weight sum (else the loss sum)
  scalar_t* loss = nullptr;           // mean / sum: the 0-d loss; none: null
  scalar_t* total_weight = nullptr;   // the 0-d weight sum
};

// A single block: sums the partials in a fixed order (strided per thread, then a fixed tree).
template <class scalar_t>
__global__ void __launch_bounds__(kFinishBlock, 1) finish_kernel(const FinishParams<scalar_t> f) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ double sh_sum[2 * (kFinishBlock / 32)];
  double num, den;
  block_sum2_of<kFinishBlock>(f.partials, f.partials + f.n, f.n, num, den, sh_sum);
  if (threadIdx.x == 0) {
    // Rounded to the accumulation dtype, then to scalar_t (as the CPU op's double results).
    store_global(f.total_weight, from_acc<scalar_t>(static_cast<acc_t>(den)));
    // Mean over no (or zero-weight) targets: 0 / 0 = NaN, as PyTorch.
    if (f.loss != nullptr) store_global(f.loss, from_acc<scalar_t>(static_cast<acc_t>(f.mean ? num / den : num)));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

// Zeroes bytes [0, bytes) from `base` (any alignment): a head of at most 15 single bytes up to the first
// 16-byte boundary, 16-byte vectors, a tail of at most 15 bytes. Block b zeroes vectors
// [b * kFillVectorsPerBlock, (b + 1) * kFillVectorsPerBlock); block 0 also writes the head and the tail.
__global__ void __launch_bounds__(kBlock, 1) zero_fill_kernel(unsigned char* base, int64_t bytes) {
  using V = Vec<unsigned, 4>;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base);
  int64_t head = static_cast<int64_t>((16 - (addr & 15)) & 15);
  if (head > bytes) head = bytes;
  const int64_t nvec = (bytes - head) / 16;
  const int64_t tail_begin = head + nvec * 16;
  const int64_t blk = blockIdx.x;
  if (blk == 0) {
    if (threadIdx.x < head) store_global(base + threadIdx.x, static_cast<unsigned char>(0));
    if (tail_begin + threadIdx.x < bytes) store_global(base + tail_begin + threadIdx.x, static_cast<unsigned char>(0));
  }
  // An array of vectors from the aligned base (never a cast of an element offset: see vec_base in
  // cross_entropy.cuh), so that every store is one STG.E.128.
  V* vec = reinterpret_cast<V*>(base + head);
  const V z{{0u, 0u, 0u, 0u}};
  const int64_t j0 = blk * kFillVectorsPerBlock + threadIdx.x;
XENT_UNROLL
  for (int i = 0; i < kFillVectorsPerThread; ++i) {
    const int64_t j = j0 + i * kBlock;
    if (j < nvec) store_global(vec + j, z);
  }
}

template <class scalar_t, class target_t>
struct ScatterParams {
  using acc_t = typename AccType<scalar_t>::type;
  scalar_t* grad = nullptr;        // the gradient, zeroed by zero_fill_kernel
  Positions<acc_t, target_t> pos;  // indexing the gradient
  // Upstream gradient. Reduction none: grad_loss (P) contiguous, in the input's dtype (grad_loss_s) or in
  // the accumulation dtype (grad_loss_a). Sum / mean: the 0-d grad_loss_d (double), divided by the 0-d
  // total_weight_d (double; mean only, else null).
  const scalar_t* grad_loss_s = nullptr;
  const acc_t* grad_loss_a = nullptr;
  const double* grad_loss_d = nullptr;
  const double* total_weight_d = nullptr;
  bool per_position = false;
};

template <class scalar_t, class target_t>
__global__ void __launch_bounds__(kBlock, 1) scatter_kernel(const ScatterParams<scalar_t, target_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int K = kPositionsPerThread;
  __shared__ double sh_scale;
  double scale = 0;
  if (!a.per_position) {  // uniform over the grid: the barrier is reached by every thread or none
    if (threadIdx.x == 0) {
      double s = load_global(a.grad_loss_d);
      if (a.total_weight_d != nullptr) s = s / load_global(a.total_weight_d);
      sh_scale = s;
    }
    __syncthreads();
    scale = sh_scale;
  }
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kPositionsPerBlock + threadIdx.x;
  int64_t t[K];
  bool use[K];
  load_targets<K>(a.pos, p0, t, use);
XENT_UNROLL
  for (int i = 0; i < K; ++i) {
    if (!use[i]) continue;
    const int64_t p = p0 + i * kBlock;
    const acc_t w = a.pos.weight_of(t[i]);
    acc_t g;
    if (a.per_position) {
      const acc_t s = a.grad_loss_s != nullptr ? to_acc(load_global(a.grad_loss_s + p)) : load_global(a.grad_loss_a + p);
      g = -w * s;
    } else {
      g = static_cast<acc_t>(-static_cast<double>(w) * scale);
    }
    store_global(a.grad + a.pos.offset(p, t[i]), from_acc<scalar_t>(g));
  }
}

} // namespace xent::cuda::nll
