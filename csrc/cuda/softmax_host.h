// Host code shared by the CUDA softmax losses, cross-entropy (cross_entropy.cu) and softmax focal loss
// (softmax_focal.cu): the launches of their reductions over positions with cross-entropy's finish_kernel and
// target_weight_kernel (cross_entropy.cuh, Note [CUDA cross-entropy kernels]). Their argument checks and
// options are every backend's (class_losses_host.h), their op entry points softmax_loss_ops.h's.
//
// Inline functions in a header, as host_compat.h: the emulated build compiles every .cu of csrc/cuda into one
// translation unit. No host synchronisation: every sum and quotient stays on the device.
#pragma once

#include "cross_entropy.cuh"
#include "class_losses_host.h"
#include "host_compat.h"

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <limits>
#include <tuple>

namespace xent::cuda::softmax_host {

// The forward's outputs (loss, lse): lse (N, *) in the accumulation dtype, the loss (N, *) for reduction none,
// else 0-d, in the logits' dtype. Without positions they are the results already (the loss of an empty
// input).
inline std::tuple<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& logits, int64_t reduction) {
  const auto positions = position_sizes(logits);
  at::Tensor lse = at::empty(positions, logits.options().dtype(acc_dtype(logits.scalar_type())));
  at::Tensor loss =
      reduction == at::Reduction::None ? at::empty(positions, logits.options()) : at::empty({}, logits.options());
  if (lse.numel() == 0) host::fill_empty_reduction(loss, reduction);
  return {loss, lse};
}

template <class scalar_t>
void launch_finish(const ce::FinishParams<scalar_t>& f, xent_stream_t stream) {
  auto* kernel = &ce::finish_kernel<scalar_t>;
  XENT_LAUNCH(1, ce::kFinishBlock, 0, stream, kernel)(f);
  XENT_CUDA_LAUNCH_CHECK();
}

// The forward's mean / sum into the 0-d `loss`, from the per-block partials of its last kernel ([n_blocks]
// losses, then [n_blocks] weights w_t): the summed losses, divided for mean by the number of positions P
// (probability targets) or by the summed weights (class indices; a label-smoothed mean over zero weight is
// NaN, as mean_of in class_losses_host.h).
template <class scalar_t>
void launch_forward_reduction(
    const typename AccType<scalar_t>::type* block_partials,
    int64_t n_blocks,
    const SoftmaxLossOptions& o,
    int64_t P,
    scalar_t* loss,
    xent_stream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  ce::FinishParams<scalar_t> f;
  f.num = block_partials;
  f.n = n_blocks;
  if (o.reduction == at::Reduction::Mean) {
    if (o.prob) {
      f.den_const = static_cast<acc_t>(P);
    } else {
      f.den = block_partials + n_blocks;
    }
    f.nan_if_den_zero = o.label_smoothing > 0;
  }
  f.loss_out = loss;
  launch_finish(f, stream);
}

// The backward's upstream gradient for mean / sum: the device scalar grad_loss / denominator (0-d, in the
// accumulation dtype; `acc_options`), the denominator as in the forward: 1 (sum), P (mean, probability
// targets) or the summed weights w_t of the positions not ignored (mean, class indices: target_weight_kernel
// over the (P) targets and the (C) weights or null).
template <class scalar_t>
at::Tensor launch_grad_scale(
    const scalar_t* grad_loss,
    const SoftmaxLossOptions& o,
    const int64_t* target,
    int64_t P,
    int64_t C,
    const typename AccType<scalar_t>::type* weight,
    const at::TensorOptions& acc_options,
    const char* op,
    xent_stream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  at::Tensor scale = at::empty({}, acc_options);
  ce::FinishParams<scalar_t> f;
  f.grad = grad_loss;
  f.acc_out = host::mptr<acc_t>(scale);
  at::Tensor weight_partials;  // alive until finish_kernel is issued (the allocator then keeps it for the stream)
  if (o.reduction == at::Reduction::Mean) {
    f.nan_if_den_zero = o.label_smoothing > 0;
    if (o.prob) {
      f.den_const = static_cast<acc_t>(P);
    } else {
      const int64_t blocks = host::ceil_div(P, ce::kWeightPositionsPerBlock);
      TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": input too large");
      weight_partials = at::empty({blocks}, acc_options);
      auto* kernel = &ce::target_weight_kernel<acc_t>;
      XENT_LAUNCH(static_cast<unsigned>(blocks), ce::kBlock, 0, stream, kernel)(
          target, P, C, o.ignore_index, weight, host::mptr<acc_t>(weight_partials));
      XENT_CUDA_LAUNCH_CHECK();
      f.den = host::cptr<acc_t>(weight_partials);
      f.n = blocks;
    }
  }
  launch_finish(f, stream);
  return scale;
}

} // namespace xent::cuda::softmax_host
