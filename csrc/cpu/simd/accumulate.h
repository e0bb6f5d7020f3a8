// Accumulation in the CPU kernels: sums of many float terms whose order and precision do not depend on the
// tiling or the thread count (Note [Per-ISA headers] in vec.h).
#pragma once

#include "cpu/simd/vec.h"

namespace xent::cpu {
namespace {

// Sums over the classes of the lanes layout (one position per lane, C terms each; also the lanes of a
// row's probability-target dot products in the rows layout, C / kWidth terms each). A running float sum
// of equal-sized terms drifts by about C eps / 2 relative (w q for uniform probability targets:
// cross-entropy's loss at C = 5000 was off by 6e-4, eager's by 1e-7). So the kernels sum kLaneSumBlock
// classes per lane in a vector, then add each block's partial to a double per lane. The blocks are fixed,
// so results do not depend on the tiling or the thread count.
constexpr int64_t kLaneSumBlock = 32;

template <class V>
struct LaneSums {
  double v[V::kWidth] = {};
  void add(V partial) {
    typename V::scalar b[V::kWidth];
    V::store(b, partial);
    for (int i = 0; i < V::kWidth; ++i) v[i] += static_cast<double>(b[i]);
  }
  double total() const {  // the lanes' sum, in lane order
    double t = 0;
    for (int i = 0; i < V::kWidth; ++i) t += v[i];
    return t;
  }
};

// Calls f(c0, c1) for the fixed blocks [c0, c1) of kLaneSumBlock classes of [0, C), in order.
template <class F>
inline void for_each_class_block(int64_t C, F&& f) {
  for (int64_t c0 = 0; c0 < C; c0 += kLaneSumBlock) f(c0, C - c0 < kLaneSumBlock ? C : c0 + kLaneSumBlock);
}

// The per-lane double sums of block_partial(c0, c1) -> V over the class blocks (for_each_class_block).
template <class V, class F>
inline LaneSums<V> sum_over_class_blocks(int64_t C, F&& block_partial) {
  LaneSums<V> sums;
  for_each_class_block(C, [&](int64_t c0, int64_t c1) { sums.add(block_partial(c0, c1)); });
  return sums;
}

// A sum of many vectors of terms (a block of the binary losses' elements, Note [Binary loss blocks]): the
// vectors are added into float lanes, flushed into a double every kFlushVectors vectors, so each lane sums
// at most 8 terms in float (a few ulp of their sum) and everything after that is summed in double.
constexpr int kFlushVectors = 8;

template <class V>
struct BlockSum {
  V run = V::set1(0);
  int in_run = 0;
  double total = 0;
  void add(V l) {
    run = run + l;
    if (++in_run == kFlushVectors) {
      total += static_cast<double>(run.reduce_add());
      run = V::set1(0);
      in_run = 0;
    }
  }
  // The first r lanes of a last, partial vector, added to the total one by one.
  void add_first(V l, int64_t r) {
    typename V::scalar buf[V::kWidth];
    V::store(buf, l);
    for (int64_t i = 0; i < r; ++i) total += static_cast<double>(buf[i]);
  }
  double result() const { return total + static_cast<double>(run.reduce_add()); }
};

} // namespace
} // namespace xent::cpu
