// The CPU cross-entropy ops: the softmax-loss host layer (softmax_loss.h) with cross-entropy's kernels, and
// the rule for its fused rows kernel and streamed gradients.
#include "cpu/grad_buffer.h"
#include "cpu/isa.h"
#include "cpu/softmax_loss.h"
#include "softmax_loss_ops.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace xent::cpu {
namespace {

const SoftmaxLossKernels& cross_entropy_kernels() { return kernel_tables().cross_entropy; }

// Whether rows are short (Note [Short rows' gradient] in cross_entropy_kernels_impl.h): the fused op then
// takes the fused rows kernel, whose blocks of rows and their gradient stay in L1, and both ops write the
// gradient through a staging buffer.
bool short_rows(const LayoutPlan& plan, const SoftmaxLossArgs& a, int64_t positions) {
  return plan.layout == Layout::rows && !split_rows(cross_entropy_kernels(), plan, positions, a.C) &&
         fused_rows_fit(a.C, dtype_bytes(a.dtype));
}

bool streams_gradient(const LayoutPlan& plan, const SoftmaxLossArgs& a, int64_t positions, int64_t bytes, bool) {
  // Short rows stream through a staging buffer, which needs the gradient rows contiguous; it pays from
  // smaller gradients on than streaming from the exp loop (grad_buffer.h).
  if (short_rows(plan, a, positions)) return a.S == 1 && a.grad_stride_n == a.C && bytes >= kStagedStreamGradBytes;
  return bytes >= kCrossEntropyStreamGradBytes;
}

constexpr SoftmaxLoss kCrossEntropy{kCrossEntropyName, cross_entropy_kernels, short_rows, streams_gradient};

} // namespace

TORCH_LIBRARY_IMPL(xent, CPU, m) { register_cross_entropy<SoftmaxLossOnCpu<kCrossEntropy>>(m); }

} // namespace xent::cpu
