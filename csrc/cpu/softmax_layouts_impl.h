// What the kernels of the softmax losses (cross-entropy, softmax focal) share in the two position layouts
// (Note [Position layouts] in softmax_loss_kernels.h): the addressing of rows, the tiling of positions into
// vector lanes, and a position's upstream gradient. The losses' kernel structs derive from SoftmaxRows and
// SoftmaxLanes. Per-ISA header (Note [Per-ISA headers] in simd/vec.h).
#pragma once

#include "cpu/simd/accumulate.h"
#include "cpu/simd/math.h"
#include "cpu/simd/memory.h"
#include "cpu/simd/vec.h"
#include "cpu/softmax_loss_kernels.h"

namespace xent::cpu {
namespace {

// The upstream gradient of position p (already divided by the mean's denominator).
template <class acc>
inline double grad_scale(const SoftmaxLossArgs& a, int64_t p) {
  return a.grad_scale_per_position ? static_cast<double>(static_cast<const acc*>(a.grad_scale_per_position)[p])
                                   : a.grad_scale_value;
}

// Rows layout: the class stride is 1; position `row` = n * S + s.
template <class T>
struct SoftmaxRows {
  using V = typename VecFor<T>::type;
  using acc = typename V::scalar;

  static const T* logits_row(const SoftmaxLossArgs& a, int64_t row) {
    return static_cast<const T*>(a.logits) + position_offset(row, a.S, a.stride_n, a.stride_s);
  }
  static const T* target_row(const SoftmaxLossArgs& a, int64_t row) {
    return static_cast<const T*>(a.prob_target) + position_offset(row, a.S, a.target_stride_n, a.target_stride_s);
  }
  static T* grad_row(const SoftmaxLossArgs& a, int64_t row) {
    return static_cast<T*>(a.grad) + position_offset(row, a.S, a.grad_stride_n, a.grad_stride_s);
  }
  static bool ignored(const SoftmaxLossArgs& a, int64_t row) {
    return !a.prob_target && a.target[row] == a.ignore_index;
  }
};

// Lanes layout: the spatial stride is 1; the W lanes of a vector hold W consecutive positions of one batch
// row, and the kernels walk the classes with stride stride_c (no transposed copy).
template <class T>
struct SoftmaxLanes {
  using V = typename VecFor<T>::type;
  using acc = typename V::scalar;
  static constexpr int W = V::kWidth;

  // `lanes` <= W consecutive elements at p, zeros in the other lanes.
  static V load_lanes(const T* p, int64_t lanes) { return lanes == W ? V::load(p) : load_partial<V>(p, lanes, 0); }

  // A tile: `lanes` (<= W) consecutive positions of batch row n from spatial position s on, and the first of
  // their logits, probability targets (null for class indices) and gradient elements (null without one).
  struct Tile {
    int64_t n, s, lanes;
    const T* x;
    const T* tq;
    T* g;
  };

  // Calls f(const Tile&) for every tile of up to W positions of [p_begin, p_end) within one batch row.
  template <class F>
  static void for_each_tile(const SoftmaxLossArgs& a, int64_t p_begin, int64_t p_end, F&& f) {
    int64_t p = p_begin;
    while (p < p_end) {
      const int64_t n = p / a.S, s = p % a.S;
      int64_t lanes = a.S - s;
      if (lanes > W) lanes = W;
      if (lanes > p_end - p) lanes = p_end - p;
      f(Tile{n, s, lanes, tile_logits(a, n, s), a.prob_target ? tile_target(a, n, s) : nullptr,
             a.grad ? tile_grad(a, n, s) : nullptr});
      p += lanes;
    }
  }

  // The first elements of the tile (or block) at (n, s): of the logits, the probability target and the
  // gradient.
  static const T* tile_logits(const SoftmaxLossArgs& a, int64_t n, int64_t s) {
    return static_cast<const T*>(a.logits) + n * a.stride_n + s;
  }
  static const T* tile_target(const SoftmaxLossArgs& a, int64_t n, int64_t s) {
    return static_cast<const T*>(a.prob_target) + n * a.target_stride_n + s;
  }
  static T* tile_grad(const SoftmaxLossArgs& a, int64_t n, int64_t s) {
    return static_cast<T*>(a.grad) + n * a.grad_stride_n + s;
  }

  // Per lane, the sum over the classes of exp(x - m) (LaneSums: blocked, in double), m the lane's max; a
  // lane whose max is -inf (all logits -inf) is taken relative to 0 instead, so its sum is 0 (NaN logits
  // keep it NaN).
  static LaneSums<V> exp_sums(const SoftmaxLossArgs& a, const T* x, int64_t lanes, V m) {
    acc mb[W];
    V::store(mb, m);
    for (int i = 0; i < W; ++i)
      if (mb[i] == -static_cast<acc>(kInf)) mb[i] = 0;
    const V mv = V::load(mb);
    return sum_over_class_blocks<V>(a.C, [&](int64_t c0, int64_t c1) {
      V part = V::set1(0);
      for (int64_t c = c0; c < c1; ++c) part = part + V::exp(load_lanes(x + c * a.stride_c, lanes) - mv);
      return part;
    });
  }
};

// The table of a loss whose kernels are Rows<T> and Lanes<T> (static forward_rows, backward_rows,
// forward_grad_rows; forward, backward), each entry dispatched on the dtype. Rows<T> may also have the
// split-row entries forward_row_partials, forward_row_finish and backward_row_classes.
template <template <class> class Rows, template <class> class Lanes>
constexpr SoftmaxLossKernels softmax_loss_kernels() {
  using Args = const SoftmaxLossArgs&;
  SoftmaxLossKernels k{};
  k.forward_rows = [](Args a, int64_t r0, int64_t r1) {
    dispatch_dtype(a.dtype, [&](auto t) { Rows<decltype(t)>::forward_rows(a, r0, r1); });
  };
  k.backward_rows = [](Args a, int64_t r0, int64_t r1) {
    dispatch_dtype(a.dtype, [&](auto t) { Rows<decltype(t)>::backward_rows(a, r0, r1); });
  };
  k.forward_grad_rows = [](Args a, int64_t r0, int64_t r1) {
    dispatch_dtype(a.dtype, [&](auto t) { Rows<decltype(t)>::forward_grad_rows(a, r0, r1); });
  };
  k.forward_lanes = [](Args a, int64_t p0, int64_t p1) {
    dispatch_dtype(a.dtype, [&](auto t) { Lanes<decltype(t)>::forward(a, p0, p1); });
  };
  k.backward_lanes = [](Args a, int64_t p0, int64_t p1) {
    dispatch_dtype(a.dtype, [&](auto t) { Lanes<decltype(t)>::backward(a, p0, p1); });
  };
  if constexpr (requires { &Rows<float>::forward_row_partials; }) {
    k.forward_row_partials = [](Args a, int64_t row, int64_t k0, int64_t k1, RowPartial* out) {
      dispatch_dtype(a.dtype, [&](auto t) { Rows<decltype(t)>::forward_row_partials(a, row, k0, k1, out); });
    };
    k.forward_row_finish = [](Args a, int64_t row, const RowPartial* partials, int64_t n) {
      dispatch_dtype(a.dtype, [&](auto t) { Rows<decltype(t)>::forward_row_finish(a, row, partials, n); });
    };
    k.backward_row_classes = [](Args a, int64_t row, int64_t c0, int64_t c1) {
      dispatch_dtype(a.dtype, [&](auto t) { Rows<decltype(t)>::backward_row_classes(a, row, c0, c1); });
    };
  }
  return k;
}

} // namespace
} // namespace xent::cpu
