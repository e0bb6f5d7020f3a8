// Host-side argument checks shared by the CPU and CUDA binary-loss ops (binary_cross_entropy,
// binary_cross_entropy_with_logits, sigmoid_focal_loss): csrc/cpu/binary_losses.cpp and
// csrc/cuda/binary_losses.cu raise the same exceptions with the same messages.
#pragma once

#include "binary_loss_kind.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace xent {

// The options of a binary-loss op, gathered from its schema's arguments (csrc/ops.cpp) by binary_loss_ops.h.
struct BinaryLossOptions {
  BinaryLossKind kind;
  int64_t reduction;        // at::Reduction
  double alpha = 0, gamma = 0;  // sigmoid focal loss
};

// Exception types follow PyTorch's: NotImplementedError for a non-floating input, ValueError for a target
// of another size or a bad reduction, RuntimeError for a weight / pos_weight that does not broadcast to the
// input (or would enlarge it, as PyTorch's in-place `loss.mul_(weight)` refuses), another dtype or device.
// `name` is the PyTorch function the op mirrors; `is_bce`: binary_cross_entropy's target-size message.
void check_binary_loss_inputs(const char* name, bool is_bce, const at::Tensor& input, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                              int64_t reduction);

// The backward's upstream gradient: on the input's device, floating, the loss's shape (the input's for
// reduction none, 0-d otherwise).
void check_binary_loss_grad(const char* name, const at::Tensor& grad_loss, const at::Tensor& input,
                            int64_t reduction);

} // namespace xent
