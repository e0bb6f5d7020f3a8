// Host-side helpers shared by the CPU ops: class-index target validation and deterministic sums.
//
// Sums run over fixed blocks of kReduceBlock elements (blocks in parallel, then the block sums in order),
// so they never depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace xent::cpu {

constexpr int64_t kReduceBlock = 4096;

// Independent accumulators per block: a single running double sum is a chain of dependent adds (about 4
// cycles each) that the loop cannot overlap (with the lanes, NLL's forward at 65536 x 80 fp32 takes about
// a quarter less time). The lanes are combined in a fixed order, so the result still does not depend on
// the thread count.
constexpr int kLanes = 8;

inline double combine_lanes(const double (&lane)[kLanes]) {
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Sum over [begin, end) of value(p), kLanes at a time.
template <class Value>
double block_sum(int64_t begin, int64_t end, const Value& value_ref) {
  const Value value = value_ref;  // a local copy: its captures stay in registers across the lane stores
  double lane[kLanes] = {};
  int64_t p = begin;
  for (; p + kLanes <= end; p += kLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < kLanes; ++j) lane[j] += value(p + j);
  }
  for (int j = 0; p < end; ++p, ++j) lane[j] += value(p);
  return combine_lanes(lane);
}

// Runs block_result(b, begin, end) -> double for each fixed block of kReduceBlock positions, in parallel,
// and returns the per-block results in block order.
template <class BlockResult>
std::vector<double> over_blocks(int64_t P, const BlockResult& block_result) {
  const int64_t n_blocks = (P + kReduceBlock - 1) / kReduceBlock;
  std::vector<double> out(n_blocks, 0.0);
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) out[b] = block_result(b, b * kReduceBlock, std::min(P, (b + 1) * kReduceBlock));
  });
  return out;
}

// The deterministic sum over positions [0, P) of value(p) -> double.
template <class Value>
double blocked_sum(int64_t P, const Value& value) {
  const std::vector<double> block_total =
      over_blocks(P, [&](int64_t, int64_t begin, int64_t end) { return block_sum(begin, end, value); });
  double total = 0;
  for (double s : block_total) total += s;
  return total;
}

// Class-index targets as a contiguous int64 vector (numel).
at::Tensor targets_as_int64(const at::Tensor& target);

// Raises IndexError ("Target t is out of bounds.", as PyTorch) for the first target, in position order,
// that is neither ignore_index nor in [0, C). Returns the sum of weight[target] over the non-ignored
// targets (their count when `weight` is undefined): the mean's denominator. weight: (C) float32/float64.
double validate_targets(const at::Tensor& target64, int64_t C, int64_t ignore_index, const at::Tensor& weight);

// Sum of a contiguous float32/float64 tensor, in double.
double deterministic_sum(const at::Tensor& values);

} // namespace xent::cpu
