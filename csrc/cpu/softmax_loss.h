// The CPU host layer of the softmax losses (cross-entropy, softmax focal loss): argument checks, the choice
// of the position layout (Note [Position layouts] in softmax_loss_kernels.h), the kernels' arguments, the
// gradient buffer, threading and reductions, written once. A loss is described by a SoftmaxLoss, and its
// ops (cross_entropy.cpp, softmax_focal.cpp) are softmax_loss_forward / _backward / _forward_grad on it.
//
// Determinism: threads split the positions (or, for few long rows, the chunks of Note [Deterministic
// chunks]) with a fixed grain; each position is computed by one kernel call in a fixed order, and the loss
// is reduced by deterministic_sum, so results are bitwise identical for every thread count.
#pragma once

#include "class_losses_host.h"
#include "cpu/softmax_loss_kernels.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace xent::cpu {

enum class Layout { rows, lanes };

// The (N, C, S) view of the logits in the layout the kernels take them.
struct LayoutPlan {
  Layout layout;
  NCSView x;
};

// What differs between the softmax losses on the host.
struct SoftmaxLoss {
  const char* name;  // the PyTorch-style function name, for messages
  // The loss's kernels of the active instruction set.
  const SoftmaxLossKernels& (*kernels)();
  // Whether kernels().forward_grad_rows computes the fused forward + gradient of these positions (the
  // arguments of the fused op, its gradient set).
  bool (*fused_rows)(const LayoutPlan& plan, const SoftmaxLossArgs& args, int64_t positions);
  // Whether a gradient of `bytes` bytes, for the fused op (`fused`) or the backward op, is written with
  // non-temporal stores (SoftmaxLossArgs::stream_grad).
  bool (*streams_gradient)(const LayoutPlan& plan, const SoftmaxLossArgs& args, int64_t positions, int64_t bytes,
                           bool fused);
};

// Positions per parallel task: about 32 K logits each, so small problems stay on one thread.
inline int64_t grain_positions(int64_t C) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(C, 1)); }

// Whether rows are few and long enough to split each row's chunks across threads (Note [Deterministic
// chunks]); only where the loss's kernels have forward_row_partials.
bool split_rows(const SoftmaxLossKernels& kernels, const LayoutPlan& plan, int64_t rows, int64_t C);

// The ops. The forward returns (loss, lse); the backward grad_logits; the fused forward + gradient
// (Note [Fused gradient], xent/_fused.py) (loss, lse, grad_logits) for grad_loss = 1, reduction mean or
// sum, with the bits of the two others.
std::tuple<at::Tensor, at::Tensor> softmax_loss_forward(const SoftmaxLoss& loss, const at::Tensor& logits,
                                                        const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight,
                                                        const SoftmaxLossOptions& options);
at::Tensor softmax_loss_backward(const SoftmaxLoss& loss, const at::Tensor& grad_loss, const at::Tensor& logits,
                                 const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                 const at::Tensor& lse, const SoftmaxLossOptions& options);
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_loss_forward_grad(const SoftmaxLoss& loss,
                                                                         const at::Tensor& logits,
                                                                         const at::Tensor& target,
                                                                         const std::optional<at::Tensor>& weight,
                                                                         const SoftmaxLossOptions& options);

// The ops of `kLoss` on the CPU: the Impl of softmax_loss_ops.h's registration.
template <const SoftmaxLoss& kLoss>
struct SoftmaxLossOnCpu {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                                    const std::optional<at::Tensor>& weight,
                                                    const SoftmaxLossOptions& o) {
    return softmax_loss_forward(kLoss, logits, target, weight, o);
  }
  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                             const SoftmaxLossOptions& o) {
    return softmax_loss_backward(kLoss, grad_loss, logits, target, weight, lse, o);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_grad(const at::Tensor& logits,
                                                                     const at::Tensor& target,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     const SoftmaxLossOptions& o) {
    return softmax_loss_forward_grad(kLoss, logits, target, weight, o);
  }
};

} // namespace xent::cpu
