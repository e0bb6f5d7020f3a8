// Cross-entropy device code: forward, backward and the deterministic reductions.
//
// Device code only. It includes nothing but compat.cuh and acc_type.cuh (and two standard headers for the
// math overloads), so that the same source compiles under nvcc and, as plain C++, under the SIMT emulator
// (tests/simt). Every global memory access goes through xent::cuda::load_global / store_global (the emulator
// counts the bytes).
// Host launch code: cross_entropy.cu.
//
// Note [CUDA cross-entropy kernels]
// ---------------------------------
// Logits are the strided (N, C, S) view of csrc/class_losses_host.h; position p = n * S + s. Two layouts,
// as on the CPU (csrc/cpu/softmax_loss_kernels.h, Note [Position layouts]):
//  * rows:  class stride 1. A row group of `row_warps` warps (1, or all 8 of a 256-thread block) owns one
//           position. It reads the row with 128-bit loads (Vec<T, 16 / sizeof(T)>) after a scalar head that
//           reaches 16-byte alignment (rows may start anywhere: a storage offset of 1 is a normal input)
//           and before a scalar tail.
//  * lanes: the spatial stride is 1 (NCHW), or S == 1 and the batch stride is 1 (a transposed (N, C)
//           matrix). A warp owns 32 consecutive positions, one per lane (coalesced), and walks the classes;
//           `class_groups` warps (1..8) share a tile of 32 positions and split its classes between them.
// Forward: one pass over the logits per position keeps an online (max, sum of exp(x - max)) pair per thread,
// plus the dot products the loss needs (sum w_c x_c for label smoothing; sum w_c q_c x_c and sum w_c q_c for
// probability targets). The pairs are merged by warp shuffles and then through shared memory, in a fixed
// order: results depend only on the shapes, strides and 16-byte alignment of the inputs, never on timing.
//
// Split rows: with few positions (fewer than ~4 per SM) and long rows, every position is cut into
// `n_chunks` chunks of `chunk` classes (chunk boundaries sit at head + k * chunk, a multiple of the vector
// width). The grid runs (position, chunk) blocks that store their partial State into a buffer, and
// fwd_merge_kernel merges each position's partials in chunk order (deterministic). The lanes layout splits
// its classes the same way when it has few positions.
//
// Reductions (mean / sum): the kernel that finishes positions also sums its block's losses (and, for
// class-index targets, the weights w_t of the positions not ignored) in a fixed tree and stores one partial
// per block; finish_kernel, a single block, sums the partials in a fixed order and divides. No floating-point
// atomics anywhere, and nothing is read back by the host.
//
// Ignored positions (class-index target == ignore_index) are not read: their loss and lse are 0, as on the
// CPU, and their gradient rows are written as zeros.
//
// Backward: the gradient is elementwise given lse, so the backward kernels read each logit once and write
// each gradient element once, over (position, chunk of classes) blocks. The upstream gradient per position
// is grad_loss[p] (reduction none) or the device scalar grad_scale = grad_loss / denominator that
// finish_kernel computes (sum, mean). Probability targets first run a kProbWsum pass (Q = sum_c w_c q_c per
// position, the forward kernels without the logits), so their backward reads the target twice.
//
// Indices: positions, offsets and class indices are int64 everywhere (inputs may exceed 2^31 elements).
#pragma once

#include "acc_type.cuh"
#include "compat.cuh"
#include "reduce.cuh"
#include "target_check.cuh"

#include <cmath>
#include <cstdint>

namespace xent::cuda::ce {

// Every kernel runs 256-thread blocks (8 warps), except finish_kernel (kFinishBlock threads). The kernels
// declare __launch_bounds__(threads, 1): without the minimum-blocks hint ptxas picks a 64-80 register target
// for the fp64 kernels and spills around the inlined exp(double); with it nothing spills (the emulator
// defines __launch_bounds__ away).
constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
constexpr int kFinishBlock = 512;
// Positions per block of target_weight_kernel (kBlock threads x 4).
constexpr int kWeightPositionsPerBlock = kBlock * 4;

// What a kernel computes.
enum Mode : int {
  kIndex = 0,        // class-index targets, no label smoothing
  kIndexSmooth = 1,  // class-index targets with label smoothing (needs sum_c w_c x_c)
  kProb = 2,         // probability targets
  kProbWsum = 3,     // probability targets, only Q = sum_c w_c q_c per position (backward pre-pass)
};

// ---------------------------------------------------------------------------------------------------------
// Scalar helpers (AccType, to_acc, from_acc and the acc_* math are acc_type.cuh's, the warp and block sums
// reduce.cuh's, TargetOp target_check.cuh's, all found from this namespace).
template <class T>
__device__ inline T neg_inf() {
  return -static_cast<T>(INFINITY);
}

template <class T>
__device__ inline T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(kFullWarpMask, v, lane_mask);
}

// target_check.cuh's check, naming cross_entropy (softmax focal loss uses it too).
__device__ inline bool target_in_range(int64_t t, int64_t C) {
  return ::xent::cuda::target_in_range<TargetOp::kCrossEntropy>(t, C);
}

// Offset of position p = n * S + s for strides (sn, ss).
__device__ inline int64_t position_offset(int64_t p, int64_t S, int64_t sn, int64_t ss) {
  if (S == 1) return p * sn;
  const int64_t n = p / S;
  return n * sn + (p - n * S) * ss;
}

// Elements before the first 16-byte aligned one in a row of `len` elements starting at `ptr` (at most len;
// len when the row can never be aligned because the pointer is not even element-aligned).
template <class T>
__device__ inline int64_t vector_head(const T* ptr, int64_t len) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(ptr);
  if (addr % sizeof(T) != 0) return len;
  const int64_t head = static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T));
  return head < len ? head : len;
}

// 128-bit accesses index arrays of Vec from a 16-byte aligned base (`vec_base(row + vbegin)[j]`), never
// `reinterpret_cast<Vec*>(row + c)` with an element offset c: the backend folds constant element offsets into
// the address and then only trusts their alignment (MinAlign(16, 4 * k)), splitting one STG.E.128 into
// 32/64-bit stores.
template <class T, int V>
__device__ inline const Vec<T, V>* vec_base(const T* p) {
  return reinterpret_cast<const Vec<T, V>*>(p);
}
template <class T, int V>
__device__ inline Vec<T, V>* vec_base(T* p) {
  return reinterpret_cast<Vec<T, V>*>(p);
}

template <class T>
__device__ inline bool same_alignment(const T* a, const T* b) {
  return ((reinterpret_cast<uintptr_t>(a) ^ reinterpret_cast<uintptr_t>(b)) & 15) == 0;
}

// ---------------------------------------------------------------------------------------------------------
// Kernel arguments, shared by every forward and backward kernel (passed by value).
template <class scalar_t>
struct Params {
  using acc_t = typename AccType<scalar_t>::type;
  // Logits, the (N, C, S) view. Rows layout: x_sc == 1.
  const scalar_t* x = nullptr;
  int64_t N = 0, C = 0, S = 1;
  int64_t x_sn = 0, x_ss = 0, x_sc = 1;
  // Probability targets: the logits' shape, own strides (class stride 1 in the rows layout).
  const scalar_t* tp = nullptr;
  int64_t t_sn = 0, t_ss = 0, t_sc = 1;
  // Class-index targets: int64, (N * S) contiguous.
  const int64_t* target = nullptr;
  int64_t ignore_index = -100;
  // Class weights (C) or null; weight_total: device scalar sum_c w_c, or null for C (label smoothing).
  const acc_t* weight = nullptr;
  const acc_t* weight_total = nullptr;
  acc_t one_minus_eps = 1;  // 1 - label_smoothing
  acc_t eps_over_c = 0;     // label_smoothing / C
  // Work decomposition: a block handles classes [chunk * k, ...) of its positions (rows: counted from the
  // row's vector head), k = blockIdx.x % n_chunks. n_chunks == 1: whole rows.
  int64_t chunk = 0, n_chunks = 1;
  int row_warps = 1;     // rows layout: warps per position (1 or kWarps)
  int class_groups = 1;  // lanes layout: warps per 32-position tile (1, 2, 4 or 8)
  // Forward outputs.
  acc_t* lse = nullptr;             // (P)
  scalar_t* loss = nullptr;         // (P), reduction none; else null
  acc_t* block_partials = nullptr;  // mean/sum: [n_blocks] losses then [n_blocks] weights; else null
  int64_t n_blocks = 0;
  acc_t* partials = nullptr;  // split: (P, n_chunks) States, 4 acc_t each
  acc_t* q_out = nullptr;     // kProbWsum: (P)
  // Backward inputs / output.
  const scalar_t* grad_loss = nullptr;  // reduction none: (P) contiguous; else null
  const acc_t* grad_scale = nullptr;    // sum/mean: device scalar grad_loss / denominator
  const acc_t* lse_in = nullptr;        // (P)
  const acc_t* q_in = nullptr;          // probability targets: (P) from the kProbWsum pass
  scalar_t* grad = nullptr;
  int64_t g_sn = 0, g_ss = 0, g_sc = 1;
};

// Online log-sum-exp state plus the dot products of one position (or a part of it).
template <class acc_t>
struct State {
  acc_t m;     // running max (never NaN: NaN logits reach s instead)
  acc_t s;     // sum of exp(x - m)
  acc_t dot;   // kIndexSmooth: sum w_c x_c; kProb: sum w_c q_c x_c
  acc_t wdot;  // kProb, kProbWsum: sum w_c q_c
};

template <class acc_t>
__device__ inline State<acc_t> empty_state() {
  return State<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

// Merges b into a. An all -inf (or empty) side has m == -inf and s == 0; +inf gives NaN, as it should.
template <class acc_t>
__device__ inline void merge_state(State<acc_t>& a, const State<acc_t>& b) {
  const acc_t m = acc_max(a.m, b.m);
  if (m == neg_inf<acc_t>()) {
    a.s = a.s + b.s;
  } else {
    a.s = a.s * acc_exp(a.m - m) + b.s * acc_exp(b.m - m);
  }
  a.m = m;
  a.dot += b.dot;
  a.wdot += b.wdot;
}

// Butterfly over the warp; lane 0's result is deterministic (only lane 0's is used).
template <int MODE, class acc_t>
__device__ inline void warp_merge(State<acc_t>& st) {
XENT_UNROLL
  for (int off = 16; off > 0; off >>= 1) {
    State<acc_t> o;
    if constexpr (MODE != kProbWsum) {
      o.m = shfl_xor(st.m, off);
      o.s = shfl_xor(st.s, off);
    } else {
      o.m = neg_inf<acc_t>();
      o.s = acc_t(0);
    }
    o.dot = (MODE == kIndexSmooth || MODE == kProb) ? shfl_xor(st.dot, off) : acc_t(0);
    o.wdot = (MODE == kProb || MODE == kProbWsum) ? shfl_xor(st.wdot, off) : acc_t(0);
    merge_state(st, o);
  }
}

// The States of a block's threads in shared memory, N slots, for the merge across warps.
template <class acc_t, int N>
struct StateSlots {
  acc_t m[N], s[N], dot[N], wdot[N];

  __device__ void put(int i, const State<acc_t>& st) {
    m[i] = st.m;
    s[i] = st.s;
    dot[i] = st.dot;
    wdot[i] = st.wdot;
  }
  __device__ State<acc_t> get(int i) const { return State<acc_t>{m[i], s[i], dot[i], wdot[i]}; }
  // Slots first, first + stride, ... (count of them) merged in that order.
  __device__ State<acc_t> merged(int first, int count, int stride) const {
    State<acc_t> st = get(first);
    for (int i = 1; i < count; ++i) merge_state(st, get(first + i * stride));
    return st;
  }
};

// w_c, or 1 without class weights.
template <class acc_t>
__device__ inline acc_t class_weight(const acc_t* weight, int64_t c) {
  return weight != nullptr ? load_global(weight + c) : acc_t(1);
}

template <class scalar_t>
__device__ inline typename AccType<scalar_t>::type weight_total(const Params<scalar_t>& a) {
  using acc_t = typename AccType<scalar_t>::type;
  return a.weight_total != nullptr ? load_global(a.weight_total) : static_cast<acc_t>(a.C);
}

// ---------------------------------------------------------------------------------------------------------
// Forward: accumulation of V consecutive classes c0 .. c0 + V - 1 (x[i] and t[i] already in acc_t).
template <int MODE, int V, class scalar_t, class acc_t>
__device__ inline void accumulate(
    State<acc_t>& st,
    const acc_t (&x)[V],
    const acc_t (&t)[V],
    int64_t c0,
    const Params<scalar_t>& a) {
  if constexpr (MODE != kProbWsum) {
    acc_t vmax = x[0];
XENT_UNROLL
    for (int i = 1; i < V; ++i) vmax = acc_max(vmax, x[i]);
    if (vmax > st.m) {
      st.s *= acc_exp(st.m - vmax);
      st.m = vmax;
    }
    // Only -inf seen so far: exp(x - 0) is 0 for them (and -inf - -inf would be NaN).
    const acc_t ref = st.m == neg_inf<acc_t>() ? acc_t(0) : st.m;
    acc_t sum = 0;
XENT_UNROLL
    for (int i = 0; i < V; ++i) sum += acc_exp(x[i] - ref);
    st.s += sum;
  }
  if constexpr (MODE == kIndexSmooth) {
    if (a.weight != nullptr) {
XENT_UNROLL
      for (int i = 0; i < V; ++i) st.dot += load_global(a.weight + c0 + i) * x[i];
    } else {
XENT_UNROLL
      for (int i = 0; i < V; ++i) st.dot += x[i];
    }
  }
  if constexpr (MODE == kProb || MODE == kProbWsum) {
XENT_UNROLL
    for (int i = 0; i < V; ++i) {
      const acc_t wq = class_weight(a.weight, c0 + i) * (a.one_minus_eps * t[i] + a.eps_over_c);
      st.wdot += wq;
      if constexpr (MODE == kProb) st.dot += wq * x[i];
    }
  }
}

template <int MODE>
constexpr bool reads_logits() {
  return MODE != kProbWsum;
}
template <int MODE>
constexpr bool reads_prob_target() {
  return MODE == kProb || MODE == kProbWsum;
}

// Finishes position p from its merged State: stores lse (or Q for kProbWsum) and, for reduction none, the
// loss; returns the loss and the weight w_t the mean divides by. t: the class-index target of p. Ignored
// positions were not read: their loss, weight and lse are 0 (as on the CPU).
template <int MODE, class scalar_t, class acc_t>
__device__ inline void finish_position(
    const Params<scalar_t>& a,
    int64_t p,
    int64_t x_off,
    int64_t t,
    const State<acc_t>& st,
    acc_t& loss_out,
    acc_t& weight_out) {
  if constexpr (MODE == kProbWsum) {
    store_global(a.q_out + p, st.wdot);
    loss_out = 0;
    weight_out = 0;
    return;
  } else {
    const bool ignored = MODE != kProb && t == a.ignore_index;
    const acc_t lse = ignored ? acc_t(0) : st.m + acc_log(st.s);
    store_global(a.lse + p, lse);
    acc_t loss = 0, w = 0;
    if constexpr (MODE == kProb) {
      loss = lse * st.wdot - st.dot;
      w = 1;
    } else {
      if (!ignored && target_in_range(t, a.C)) {
        const acc_t xt = to_acc(load_global(a.x + x_off + t * a.x_sc));
        const acc_t wt = class_weight(a.weight, t);
        if constexpr (MODE == kIndex) {
          loss = wt * (lse - xt);
        } else {
          loss = a.one_minus_eps * wt * (lse - xt) + a.eps_over_c * (weight_total(a) * lse - st.dot);
        }
        w = wt;
      }
    }
    if (a.loss != nullptr) store_global(a.loss + p, from_acc<scalar_t>(loss));
    loss_out = loss;
    weight_out = w;
  }
}

// Partial State of (position, chunk) in the split buffer.
template <class acc_t>
__device__ inline void store_partial(acc_t* partials, int64_t index, const State<acc_t>& st) {
  acc_t* p = partials + index * 4;
  store_global(p + 0, st.m);
  store_global(p + 1, st.s);
  store_global(p + 2, st.dot);
  store_global(p + 3, st.wdot);
}

template <class acc_t>
__device__ inline State<acc_t> load_partial(const acc_t* partials, int64_t index) {
  const acc_t* p = partials + index * 4;
  return State<acc_t>{load_global(p + 0), load_global(p + 1), load_global(p + 2), load_global(p + 3)};
}

// Mean / sum (block_partials set): the block's losses and weights w_t, summed in a fixed tree, become its
// two partials for finish_kernel. Every thread of the block must call it.
template <class acc_t>
__device__ inline void store_loss_sums(acc_t* block_partials, int64_t n_blocks, acc_t loss, acc_t w) {
  __shared__ acc_t sh_sum[2 * kWarps];
  if (block_partials != nullptr) store_block_sum2<kBlock>(loss, w, sh_sum, block_partials, n_blocks);
}

// A forward thread's position p: whether the thread has one (active), its class-index target t, whether its
// logits are skipped (not active, or ignored: not read) and, if not, their offset x_off.
struct FwdPosition {
  bool active, skip;
  int64_t t, x_off;
};

// kWarpShares: the warp shares p (rows layout), so its lane 0 loads t for all of it.
template <int MODE, bool kWarpShares, class scalar_t>
__device__ inline FwdPosition fwd_position(const Params<scalar_t>& a, int64_t p, int lane) {
  FwdPosition f;
  f.active = p < a.N * a.S;
  f.skip = !f.active;
  f.t = 0;
  if constexpr (MODE == kIndex || MODE == kIndexSmooth) {
    if (f.active) {  // uniform over the warp when it shares p
      if constexpr (kWarpShares) {
        if (lane == 0) f.t = load_global(a.target + p);
        f.t = shfl_lane0(f.t);
      } else {
        f.t = load_global(a.target + p);
      }
      f.skip = f.t == a.ignore_index;
    }
  }
  f.x_off = f.skip ? 0 : position_offset(p, a.S, a.x_sn, a.x_ss);
  return f;
}

// The end of the forward's main kernels, once every thread has put its State in `slots`: the leader thread of
// each position merges the position's `count` slots (from `first`, `stride` apart) in order, then stores the
// result as the partial of chunk k (split positions: fwd_merge_kernel finishes them) or finishes the position;
// then the block's loss sums (whole positions). Every thread of the block must call it.
template <int MODE, class scalar_t, class acc_t, int N>
__device__ inline void end_block(
    const Params<scalar_t>& a,
    const StateSlots<acc_t, N>& slots,
    bool leader,
    int first,
    int count,
    int stride,
    int64_t p,
    int64_t k,
    const FwdPosition& pos) {
  __syncthreads();
  acc_t loss = 0, w = 0;
  if (leader) {
    const State<acc_t> st = slots.merged(first, count, stride);
    if (a.n_chunks > 1) {
      store_partial(a.partials, p * a.n_chunks + k, st);
    } else {
      finish_position<MODE>(a, p, pos.x_off, pos.t, st, loss, w);
    }
  }
  if (a.n_chunks == 1) store_loss_sums(a.block_partials, a.n_blocks, loss, w);
}

// ---------------------------------------------------------------------------------------------------------
// Work decomposition and loops shared by the forward and backward kernels.

// Where a rows-layout thread works: chunk k of position p, as thread rtid of the row_threads threads
// (row_warps warps) that share the position.
struct RowsThread {
  int warp, lane, row_threads, rtid;
  int64_t k, p;
};

__device__ inline RowsThread rows_thread(int row_warps, int64_t n_chunks) {
  RowsThread r;
  r.warp = static_cast<int>(threadIdx.x) / 32;
  r.lane = static_cast<int>(threadIdx.x) % 32;
  r.row_threads = row_warps * 32;
  r.rtid = (r.warp % row_warps) * 32 + r.lane;
  const int64_t blk = blockIdx.x;
  r.k = blk % n_chunks;
  r.p = (blk / n_chunks) * (kWarps / row_warps) + r.warp / row_warps;
  return r;
}

// Where a lanes-layout thread works: chunk k of position p (its lane's in a tile of 32), as class group
// `group` of the tile's class_groups warps.
struct LanesThread {
  int warp, lane, group;
  int64_t k, p;
};

__device__ inline LanesThread lanes_thread(int class_groups, int64_t n_chunks) {
  LanesThread r;
  r.warp = static_cast<int>(threadIdx.x) / 32;
  r.lane = static_cast<int>(threadIdx.x) % 32;
  r.group = r.warp % class_groups;
  const int64_t blk = blockIdx.x;
  r.k = blk % n_chunks;
  r.p = ((blk / n_chunks) * (kWarps / class_groups) + r.warp / class_groups) * 32 + r.lane;
  return r;
}

// The classes [begin, end) of a rows-layout chunk: nvec vectors of V classes from vbegin (16-byte aligned),
// and n_scalar classes one by one: n_head from begin, then from vend to end.
struct RowSpan {
  int64_t begin, end, vbegin, vend, nvec, n_head, n_scalar;
  // Class i of the scalar part, i < n_scalar.
  __device__ int64_t scalar_class(int64_t i) const { return i < n_head ? begin + i : vend + (i - n_head); }
};

// Chunk k of a row whose first 16-byte aligned element is `head` (chunk boundaries sit at head + k * chunk).
template <int V>
__device__ inline RowSpan row_span(int64_t C, int64_t head, int64_t k, int64_t chunk, int64_t n_chunks) {
  RowSpan r;
  if (n_chunks == 1) {
    r.begin = 0;
    r.end = C;
  } else {
    r.begin = k == 0 ? 0 : head + k * chunk;
    r.end = head + (k + 1) * chunk;
    if (r.end > C) r.end = C;
    if (r.begin > r.end) r.begin = r.end;
  }
  r.vbegin = r.begin > head ? r.begin : head;
  if (r.vbegin > r.end) r.vbegin = r.end;
  r.nvec = (r.end - r.vbegin) / V;
  r.vend = r.vbegin + r.nvec * V;
  r.n_head = r.vbegin - r.begin;
  r.n_scalar = r.n_head + (r.end - r.vend);
  return r;
}

// A vector's logits and probability targets, as loaded (Vec) or converted (acc_t[V]).
template <class E>
struct LogitsAndTarget {
  E x, t;
};

// Vectors j = first, first + step, ... below n, two in flight per thread: load(j, in) for both vectors before
// use(j, in) for either (in the backward the compiler cannot move a load above a store to the gradient, which
// might alias the logits as far as it knows).
template <class In, class Load, class Use>
__device__ inline void two_vectors_in_flight(int64_t first, int64_t step, int64_t n, const Load& load, const Use& use) {
  int64_t j = first;
  for (; j + step < n; j += 2 * step) {
    In in0, in1;
    load(j, in0);
    load(j + step, in1);
    use(j, in0);
    use(j + step, in1);
  }
  if (j < n) {
    In in0;
    load(j, in0);
    use(j, in0);
  }
}

// Classes c = first, first + step, ... below end, four in flight per thread: load(c, x, t) for four classes
// before store(c, x, t) for any of them.
template <class acc_t, class Load, class Store>
__device__ inline void four_classes_in_flight(
    int64_t first,
    int64_t step,
    int64_t end,
    const Load& load,
    const Store& store) {
  int64_t c = first;
  for (; c + 3 * step < end; c += 4 * step) {
    acc_t xv[4], tv[4];
XENT_UNROLL
    for (int i = 0; i < 4; ++i) load(c + i * step, xv[i], tv[i]);
XENT_UNROLL
    for (int i = 0; i < 4; ++i) store(c + i * step, xv[i], tv[i]);
  }
  for (; c < end; c += step) {
    acc_t x, t;
    load(c, x, t);
    store(c, x, t);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward, rows layout. Block: kBlock threads = kWarps / row_warps positions (x n_chunks chunks).
template <class scalar_t, int MODE>
__global__ void __launch_bounds__(kBlock, 1) fwd_rows_kernel(const Params<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int V = 16 / sizeof(scalar_t);
  using VecT = Vec<scalar_t, V>;
  using In = LogitsAndTarget<acc_t[V]>;
  __shared__ StateSlots<acc_t, kWarps> slots;
  const RowsThread th = rows_thread(a.row_warps, a.n_chunks);
  const FwdPosition pos = fwd_position<MODE, /*kWarpShares=*/true>(a, th.p, th.lane);
  State<acc_t> st = empty_state<acc_t>();
  if (!pos.skip) {
    const scalar_t* xr = a.x + pos.x_off;
    const scalar_t* tr = reads_prob_target<MODE>() ? a.tp + position_offset(th.p, a.S, a.t_sn, a.t_ss) : nullptr;
    // The vector head follows the pointer every 128-bit load uses: the logits (the target for kProbWsum).
    const RowSpan sp = row_span<V>(a.C, vector_head(reads_logits<MODE>() ? xr : tr, a.C), th.k, a.chunk, a.n_chunks);

    // Scalar head and tail (fewer than 2 V elements, unless the row cannot be aligned at all).
    for (int64_t i = th.rtid; i < sp.n_scalar; i += th.row_threads) {
      const int64_t c = sp.scalar_class(i);
      acc_t x1[1] = {acc_t(0)}, t1[1] = {acc_t(0)};
      if constexpr (reads_logits<MODE>()) x1[0] = to_acc(load_global(xr + c));
      if constexpr (reads_prob_target<MODE>()) t1[0] = to_acc(load_global(tr + c));
      accumulate<MODE, 1>(st, x1, t1, c, a);
    }

    // 128-bit body.
    const bool t_vec = reads_prob_target<MODE>() && (!reads_logits<MODE>() || same_alignment(xr, tr));
    const VecT* xvec = reads_logits<MODE>() ? vec_base<scalar_t, V>(xr + sp.vbegin) : nullptr;
    const VecT* tvec = reads_prob_target<MODE>() ? vec_base<scalar_t, V>(tr + sp.vbegin) : nullptr;
    // Vector j holds classes c = vbegin + j * V.
    auto load_vec = [&](int64_t j, In& in) {
      const int64_t c = sp.vbegin + j * V;
      if constexpr (reads_logits<MODE>()) {
        const VecT v = load_global(xvec + j);
XENT_UNROLL
        for (int i = 0; i < V; ++i) in.x[i] = to_acc(v.val[i]);
      } else {
XENT_UNROLL
        for (int i = 0; i < V; ++i) in.x[i] = 0;
      }
      if constexpr (reads_prob_target<MODE>()) {
        if (t_vec) {
          const VecT v = load_global(tvec + j);
XENT_UNROLL
          for (int i = 0; i < V; ++i) in.t[i] = to_acc(v.val[i]);
        } else {
XENT_UNROLL
          for (int i = 0; i < V; ++i) in.t[i] = to_acc(load_global(tr + c + i));
        }
      } else {
XENT_UNROLL
        for (int i = 0; i < V; ++i) in.t[i] = 0;
      }
    };
    two_vectors_in_flight<In>(th.rtid, th.row_threads, sp.nvec, load_vec, [&](int64_t j, const In& in) {
      accumulate<MODE, V>(st, in.x, in.t, sp.vbegin + j * V, a);
    });
  }

  // Merge: warp butterfly, then the row's warps in order through shared memory.
  warp_merge<MODE>(st);
  if (th.lane == 0) slots.put(th.warp, st);
  const int rw = a.row_warps;
  end_block<MODE>(a, slots, pos.active && th.warp % rw == 0 && th.lane == 0, th.warp, rw, 1, th.p, th.k, pos);
}

// ---------------------------------------------------------------------------------------------------------
// Forward, lanes layout. Block: kWarps / class_groups tiles of 32 consecutive positions (x n_chunks chunks of
// classes); the class_groups warps of a tile take classes c = begin + group, + class_groups, ...
template <class scalar_t, int MODE>
__global__ void __launch_bounds__(kBlock, 1) fwd_lanes_kernel(const Params<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ StateSlots<acc_t, kBlock> slots;
  const int G = a.class_groups;
  const LanesThread th = lanes_thread(G, a.n_chunks);
  const FwdPosition pos = fwd_position<MODE, /*kWarpShares=*/false>(a, th.p, th.lane);
  State<acc_t> st = empty_state<acc_t>();
  if (!pos.skip) {
    const int64_t x_off = pos.x_off;
    const int64_t t_off = reads_prob_target<MODE>() ? position_offset(th.p, a.S, a.t_sn, a.t_ss) : 0;
    const int64_t begin = th.k * a.chunk;
    const int64_t end = begin + a.chunk < a.C ? begin + a.chunk : a.C;
    auto load1 = [&](int64_t c, acc_t& xv, acc_t& tv) {
      xv = reads_logits<MODE>() ? to_acc(load_global(a.x + x_off + c * a.x_sc)) : acc_t(0);
      tv = reads_prob_target<MODE>() ? to_acc(load_global(a.tp + t_off + c * a.t_sc)) : acc_t(0);
    };
    int64_t c = begin + th.group;
    // A thread walks all its position's classes (C / G of them): its dot products, running float sums of
    // that many terms, would drift by about (C / G) eps / 2 relative (equal-sized terms w q for uniform
    // probability targets: the loss 6e-4 off at C = 5000). So st.dot and st.wdot hold the sums of the last
    // kDotBlockSteps steps only, and each such block is added to a double (as the CPU's LaneSums).
    constexpr bool kHasDots = MODE == kIndexSmooth || MODE == kProb || MODE == kProbWsum;
    constexpr int kDotBlockSteps = 8;  // steps of 4 classes
    double dot_total = 0, wdot_total = 0;
    int steps_in_block = 0;
    // Four classes in flight per thread; accumulate() sees them as one 4-vector (class c + i * G).
    for (; c + 3 * G < end; c += 4 * G) {
      acc_t xv[4], tv[4];
XENT_UNROLL
      for (int i = 0; i < 4; ++i) load1(c + i * G, xv[i], tv[i]);
      if constexpr (kHasDots) {
        // The dot products need each class's own weight: feed them one by one (same online result).
XENT_UNROLL
        for (int i = 0; i < 4; ++i) {
          acc_t x1[1] = {xv[i]}, t1[1] = {tv[i]};
          accumulate<MODE, 1>(st, x1, t1, c + i * G, a);
        }
        if (++steps_in_block == kDotBlockSteps) {
          dot_total += static_cast<double>(st.dot);
          wdot_total += static_cast<double>(st.wdot);
          st.dot = st.wdot = acc_t(0);
          steps_in_block = 0;
        }
      } else {
        accumulate<MODE, 4>(st, xv, tv, c, a);
      }
    }
    for (; c < end; c += G) {
      acc_t x1[1], t1[1];
      load1(c, x1[0], t1[0]);
      accumulate<MODE, 1>(st, x1, t1, c, a);
    }
    if constexpr (kHasDots) {
      st.dot = static_cast<acc_t>(dot_total + static_cast<double>(st.dot));
      st.wdot = static_cast<acc_t>(wdot_total + static_cast<double>(st.wdot));
    }
  }

  // Merge the class groups of each tile in group order.
  slots.put(threadIdx.x, st);
  end_block<MODE>(a, slots, pos.active && th.group == 0, threadIdx.x, G, 32, th.p, th.k, pos);
}

// Forward, split positions: merges each position's n_chunks partials in order and finishes it.
// One thread per position.
template <class scalar_t, int MODE>
__global__ void __launch_bounds__(kBlock, 1) fwd_merge_kernel(const Params<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  acc_t loss = 0, w = 0;
  if (p < a.N * a.S) {
    const int64_t t = MODE == kIndex || MODE == kIndexSmooth ? load_global(a.target + p) : 0;
    State<acc_t> st = load_partial(a.partials, p * a.n_chunks);
    // The dot products summed in double, as each thread's own (fwd_lanes_kernel): a position may have
    // many chunks.
    double dot = static_cast<double>(st.dot), wdot = static_cast<double>(st.wdot);
    for (int64_t k = 1; k < a.n_chunks; ++k) {
      const State<acc_t> chunk = load_partial(a.partials, p * a.n_chunks + k);
      merge_state(st, chunk);
      dot += static_cast<double>(chunk.dot);
      wdot += static_cast<double>(chunk.wdot);
    }
    st.dot = static_cast<acc_t>(dot);
    st.wdot = static_cast<acc_t>(wdot);
    finish_position<MODE>(a, p, position_offset(p, a.S, a.x_sn, a.x_ss), t, st, loss, w);
  }
  store_loss_sums(a.block_partials, a.n_blocks, loss, w);
}

// ---------------------------------------------------------------------------------------------------------
// Reductions.

// Sum over positions of w_t (0 for ignored positions): one partial per block of kWeightPositionsPerBlock
// positions (the mean's denominator in the backward).
template <class acc_t>
__global__ void __launch_bounds__(kBlock, 1) target_weight_kernel(
    const int64_t* target,
    int64_t P,
    int64_t C,
    int64_t ignore_index,
    const acc_t* weight,
    acc_t* partials) {
  __shared__ acc_t sh_sum[kWarps];
  const int64_t blk = blockIdx.x;
  acc_t sum = 0;
XENT_UNROLL
  for (int i = 0; i < kWeightPositionsPerBlock / kBlock; ++i) {
    const int64_t p = blk * kWeightPositionsPerBlock + i * kBlock + threadIdx.x;
    if (p < P) {
      const int64_t t = load_global(target + p);
      if (t != ignore_index && target_in_range(t, C)) sum += class_weight(weight, t);
    }
  }
  store_block_sum<kBlock>(sum, sh_sum, partials);
}

template <class scalar_t>
struct FinishParams {
  using acc_t = typename AccType<scalar_t>::type;
  const acc_t* num = nullptr;  // n values summed into the numerator (null: none)
  const acc_t* den = nullptr;  // n values summed into the denominator (null: den_const)
  int64_t n = 0;
  acc_t den_const = 1;
  // A zero denominator gives NaN (num / 0 would be +-inf): a label-smoothed mean, as mean_of in
  // class_losses_host.h.
  bool nan_if_den_zero = false;
  const scalar_t* grad = nullptr;  // backward: acc_out = grad / den
  scalar_t* loss_out = nullptr;    // forward: loss_out = num / den
  acc_t* acc_out = nullptr;        // forward: acc_out = num / den (if set)
};

// A single block: sums num[0:n] and den[0:n] in a fixed order (strided per thread, then a fixed tree).
template <class scalar_t>
__global__ void __launch_bounds__(kFinishBlock, 1) finish_kernel(const FinishParams<scalar_t> f) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t sh_sum[2 * (kFinishBlock / 32)];
  acc_t num, den;
  block_sum2_of<kFinishBlock>(f.num, f.den, f.n, num, den, sh_sum);
  if (threadIdx.x == 0) {
    if (f.den == nullptr) den = f.den_const;
    if (f.nan_if_den_zero && den == acc_t(0)) den = den / den;  // 0 / 0: NaN
    if (f.grad != nullptr) {
      store_global(f.acc_out, to_acc(load_global(f.grad)) / den);
    } else {
      const acc_t v = num / den;
      if (f.loss_out != nullptr) store_global(f.loss_out, from_acc<scalar_t>(v));
      if (f.acc_out != nullptr) store_global(f.acc_out, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

// Per-position coefficients: grad_c = sm_c * A - B * w_c (label smoothing) - [c == t] D (class-index), or
// grad_c = sm_c * A - s * w_c * q_c (probability targets, A = s * Q).
template <class acc_t>
struct RowCoef {
  acc_t lse, A, B, D, s;
  int64_t t;
  bool zero;  // ignored position (or invalid target): the row's gradient is 0
};

// Loads what position p needs (called by one thread).
template <int MODE, class scalar_t, class acc_t>
__device__ inline RowCoef<acc_t> load_row_coef(const Params<scalar_t>& a, int64_t p) {
  RowCoef<acc_t> r{};
  r.s = a.grad_loss != nullptr ? to_acc(load_global(a.grad_loss + p)) : load_global(a.grad_scale);
  r.lse = load_global(a.lse_in + p);
  r.t = -1;
  r.zero = false;
  if constexpr (MODE == kProb) {
    r.A = r.s * load_global(a.q_in + p);
  } else {
    const int64_t t = load_global(a.target + p);
    r.t = t;
    if (t == a.ignore_index || !target_in_range(t, a.C)) {
      r.zero = true;
    } else {
      const acc_t wt = class_weight(a.weight, t);
      if constexpr (MODE == kIndex) {
        r.A = r.s * wt;
        r.D = r.A;
      } else {
        r.A = r.s * (a.one_minus_eps * wt + a.eps_over_c * weight_total(a));
        r.D = r.s * a.one_minus_eps * wt;
        r.B = r.s * a.eps_over_c;
      }
    }
  }
  return r;
}

template <int MODE, class scalar_t, class acc_t>
__device__ inline acc_t grad_value(const Params<scalar_t>& a, const RowCoef<acc_t>& r, int64_t c, acc_t x, acc_t t) {
  acc_t g = acc_exp(x - r.lse) * r.A;
  if constexpr (MODE == kIndexSmooth) g -= r.B * class_weight(a.weight, c);
  if constexpr (MODE == kProb) g -= r.s * class_weight(a.weight, c) * (a.one_minus_eps * t + a.eps_over_c);
  if constexpr (MODE != kProb) {
    if (c == r.t) g -= r.D;
  }
  return g;
}

// Backward, rows layout: same blocks as fwd_rows_kernel; elementwise over the chunk's classes.
template <class scalar_t, int MODE>
__global__ void __launch_bounds__(kBlock, 1) bwd_rows_kernel(const Params<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int V = 16 / sizeof(scalar_t);
  using VecT = Vec<scalar_t, V>;
  using In = LogitsAndTarget<VecT>;
  const RowsThread th = rows_thread(a.row_warps, a.n_chunks);
  const int64_t p = th.p;
  if (p >= a.N * a.S) return;  // no block-wide synchronisation below

  // Lane 0 loads the position's values and the warp shares them.
  RowCoef<acc_t> r{};
  if (th.lane == 0) r = load_row_coef<MODE, scalar_t, acc_t>(a, p);
  r.s = shfl_lane0(r.s);
  r.lse = shfl_lane0(r.lse);
  r.A = shfl_lane0(r.A);
  r.B = shfl_lane0(r.B);
  r.D = shfl_lane0(r.D);
  r.t = shfl_lane0(r.t);
  r.zero = shfl_lane0(static_cast<int>(r.zero)) != 0;

  const scalar_t* xr = a.x + position_offset(p, a.S, a.x_sn, a.x_ss);
  const scalar_t* tr = MODE == kProb ? a.tp + position_offset(p, a.S, a.t_sn, a.t_ss) : nullptr;
  scalar_t* gr = a.grad + position_offset(p, a.S, a.g_sn, a.g_ss);
  const RowSpan sp = row_span<V>(a.C, vector_head(xr, a.C), th.k, a.chunk, a.n_chunks);
  const bool t_vec = MODE == kProb && same_alignment(xr, tr);

  // The gradient row is not aligned like the logits row (a fresh gradient next to logits with an odd
  // storage offset): scalar, coalesced loads and stores, four in flight per thread. (A separate loop: given
  // the same values and addresses, the compiler would merge a scalar fallback inside the vector loop with
  // the 128-bit stores and emit 32/64-bit stores for both.)
  if (!same_alignment(xr, static_cast<const scalar_t*>(gr))) {
    four_classes_in_flight<acc_t>(
        sp.begin + th.rtid, th.row_threads, sp.end,
        [&](int64_t c, acc_t& x, acc_t& t) {
          x = r.zero ? acc_t(0) : to_acc(load_global(xr + c));
          t = MODE == kProb && !r.zero ? to_acc(load_global(tr + c)) : acc_t(0);
        },
        [&](int64_t c, acc_t x, acc_t t) {
          store_global(gr + c, from_acc<scalar_t>(r.zero ? acc_t(0) : grad_value<MODE>(a, r, c, x, t)));
        });
    return;
  }

  for (int64_t i = th.rtid; i < sp.n_scalar; i += th.row_threads) {
    const int64_t c = sp.scalar_class(i);
    acc_t g = 0;
    if (!r.zero) {
      const acc_t t = MODE == kProb ? to_acc(load_global(tr + c)) : acc_t(0);
      g = grad_value<MODE>(a, r, c, to_acc(load_global(xr + c)), t);
    }
    store_global(gr + c, from_acc<scalar_t>(g));
  }

  VecT* gvec = vec_base<scalar_t, V>(gr + sp.vbegin);
  if (r.zero) {
    VecT z;
XENT_UNROLL
    for (int i = 0; i < V; ++i) z.val[i] = from_acc<scalar_t>(acc_t(0));
    for (int64_t j = th.rtid; j < sp.nvec; j += th.row_threads) store_global(gvec + j, z);
    return;
  }
  // Vector j holds classes c = vbegin + j * V.
  const VecT* xvec = vec_base<scalar_t, V>(xr + sp.vbegin);
  const VecT* tvec = MODE == kProb ? vec_base<scalar_t, V>(tr + sp.vbegin) : nullptr;
  auto load_vec = [&](int64_t j, In& in) {
    in.x = load_global(xvec + j);
    if constexpr (MODE == kProb) {
      if (t_vec) {
        in.t = load_global(tvec + j);
      } else {
        const int64_t c = sp.vbegin + j * V;
XENT_UNROLL
        for (int i = 0; i < V; ++i) in.t.val[i] = load_global(tr + c + i);
      }
    }
  };
  auto emit_vec = [&](int64_t j, const In& in) {
    const int64_t c = sp.vbegin + j * V;
    VecT gv;
XENT_UNROLL
    for (int i = 0; i < V; ++i) {
      const acc_t t = MODE == kProb ? to_acc(in.t.val[i]) : acc_t(0);
      gv.val[i] = from_acc<scalar_t>(grad_value<MODE>(a, r, c + i, to_acc(in.x.val[i]), t));
    }
    store_global(gvec + j, gv);
  };
  two_vectors_in_flight<In>(th.rtid, th.row_threads, sp.nvec, load_vec, emit_vec);
}

// Backward, lanes layout: same blocks as fwd_lanes_kernel; each thread writes its position's classes
// c = begin + group, + class_groups, ... of the block's chunk.
template <class scalar_t, int MODE>
__global__ void __launch_bounds__(kBlock, 1) bwd_lanes_kernel(const Params<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  const int G = a.class_groups;
  const LanesThread th = lanes_thread(G, a.n_chunks);
  const int64_t p = th.p;
  if (p >= a.N * a.S) return;

  const RowCoef<acc_t> r = load_row_coef<MODE, scalar_t, acc_t>(a, p);
  const int64_t x_off = position_offset(p, a.S, a.x_sn, a.x_ss);
  const int64_t t_off = MODE == kProb ? position_offset(p, a.S, a.t_sn, a.t_ss) : 0;
  const int64_t g_off = position_offset(p, a.S, a.g_sn, a.g_ss);
  const int64_t begin = th.k * a.chunk;
  const int64_t end = begin + a.chunk < a.C ? begin + a.chunk : a.C;
  if (r.zero) {
    for (int64_t c = begin + th.group; c < end; c += G) {
      store_global(a.grad + g_off + c * a.g_sc, from_acc<scalar_t>(acc_t(0)));
    }
    return;
  }
  four_classes_in_flight<acc_t>(
      begin + th.group, G, end,
      [&](int64_t c, acc_t& x, acc_t& t) {
        x = to_acc(load_global(a.x + x_off + c * a.x_sc));
        t = MODE == kProb ? to_acc(load_global(a.tp + t_off + c * a.t_sc)) : acc_t(0);
      },
      [&](int64_t c, acc_t x, acc_t t) {
        store_global(a.grad + g_off + c * a.g_sc, from_acc<scalar_t>(grad_value<MODE>(a, r, c, x, t)));
      });
}

} // namespace xent::cuda::ce
