// Host-side helpers shared by the CPU ops: class-index target validation and deterministic sums.
//
// Sums run over fixed blocks of kReduceBlock elements (blocks in parallel, then the block sums in order),
// so they never depend on the thread count.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace xent::cpu {

constexpr int64_t kReduceBlock = 4096;

// Class-index targets as a contiguous int64 vector (numel).
at::Tensor targets_as_int64(const at::Tensor& target);

// Raises IndexError ("Target t is out of bounds.", as PyTorch) for the first target, in position order,
// that is neither ignore_index nor in [0, C). Returns the sum of weight[target] over the non-ignored
// targets (their count when `weight` is undefined): the mean's denominator. weight: (C) float32/float64.
double validate_targets(const at::Tensor& target64, int64_t C, int64_t ignore_index, const at::Tensor& weight);

// Sum of a contiguous float32/float64 tensor, in double.
double deterministic_sum(const at::Tensor& values);

} // namespace xent::cpu
