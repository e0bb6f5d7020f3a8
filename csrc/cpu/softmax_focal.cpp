// The CPU softmax focal loss ops: the softmax-loss host layer (softmax_loss.h) with the focal kernels, and
// the rule for its fused rows kernel and streamed gradients.
#include "cpu/grad_buffer.h"
#include "cpu/isa.h"
#include "cpu/softmax_loss.h"
#include "softmax_loss_ops.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace xent::cpu {
namespace {

const SoftmaxLossKernels& softmax_focal_kernels() { return kernel_tables().softmax_focal; }

// The fused rows kernel computes the gradient of class-index rows without label smoothing from the
// forward's exponentials, rows of any length; other positions run the forward and backward kernels back
// to back on blocks of positions.
bool fused_rows(const LayoutPlan& plan, const SoftmaxLossArgs& a, int64_t) {
  return plan.layout == Layout::rows && a.label_smoothing == 0;
}

// Only the fused rows kernel streams (its staged blocks, with contiguous gradient rows).
bool streams_gradient(const LayoutPlan& plan, const SoftmaxLossArgs& a, int64_t, int64_t bytes, bool fused) {
  return fused && plan.layout == Layout::rows && a.S == 1 && a.grad_stride_c == 1 && a.grad_stride_n == a.C &&
         bytes >= kFocalStagedStreamGradBytes;
}

constexpr SoftmaxLoss kSoftmaxFocalLoss{kSoftmaxFocalLossName, softmax_focal_kernels, fused_rows, streams_gradient};

} // namespace

TORCH_LIBRARY_IMPL(xent, CPU, m) { register_softmax_focal_loss<SoftmaxLossOnCpu<kSoftmaxFocalLoss>>(m); }

} // namespace xent::cpu
