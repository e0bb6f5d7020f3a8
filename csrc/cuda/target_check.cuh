// The device-side check of class-index targets, shared by cross-entropy and softmax focal loss
// (cross_entropy.cuh) and nll_loss (nll_loss.cuh). Device code only: includes nothing but compat.cuh.
//
// A target that is not ignore_index must lie in [0, C); PyTorch's CUDA kernels assert it on the device, and
// so do ours: the launch fails with "device-side assert triggered" and a message naming the op.
#pragma once

#include "compat.cuh"

#include <cstdint>

// The message for op `op` (string literals, as XENT_DEVICE_ASSERT requires).
#define XENT_TARGET_OUT_OF_BOUNDS(op) \
  op ": target out of bounds: a class-index target must be in [0, C) or equal ignore_index"

namespace xent::cuda {

// The op a message names.
enum class TargetOp { kCrossEntropy, kNllLoss };

// Whether class-index target t (not ignore_index) is in [0, C); when it is not, the device-side assert fails.
// Callers read class t only when it returns true.
template <TargetOp kOp>
__device__ inline bool target_in_range(int64_t t, int64_t C) {
  if constexpr (kOp == TargetOp::kNllLoss) {
    XENT_DEVICE_ASSERT(t >= 0 && t < C, XENT_TARGET_OUT_OF_BOUNDS("nll_loss"));
  } else {
    XENT_DEVICE_ASSERT(t >= 0 && t < C, XENT_TARGET_OUT_OF_BOUNDS("cross_entropy"));
  }
  return t >= 0 && t < C;
}

} // namespace xent::cuda
