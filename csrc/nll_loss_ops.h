// The op entry points of the negative log-likelihood, written once for every backend: the arguments checked
// (class_losses_host.h) and handed to the backend's implementation, two functions of the ops' signatures
//   kForward(input, target, weight, reduction, ignore_index) -> (loss, total_weight)
//   kBackward(grad_loss, input, target, weight, total_weight, reduction, ignore_index) -> grad_input
// register_nll_loss<kForward, kBackward>(m) registers them in a TORCH_LIBRARY_IMPL block.
#pragma once

#include "class_losses_host.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace xent {

using NllForward = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                          const std::optional<at::Tensor>&, int64_t, int64_t);
using NllBackward = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, const at::Tensor&, int64_t, int64_t);

template <NllForward kForward, NllBackward kBackward>
struct NllLossOps {
  static std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& input, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t reduction,
                                                int64_t ignore_index) {
    check_nll_loss_args(input, target, weight, reduction);
    return kForward(input, target, weight, reduction, ignore_index);
  }
  static at::Tensor bwd(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight, const at::Tensor& total_weight, int64_t reduction,
                        int64_t ignore_index) {
    check_nll_loss_args(input, target, weight, reduction);
    check_nll_loss_backward_inputs(grad_loss, input, total_weight, reduction);
    return kBackward(grad_loss, input, target, weight, total_weight, reduction, ignore_index);
  }
};

template <NllForward kForward, NllBackward kBackward>
void register_nll_loss(torch::Library& m) {
  m.impl("nll_loss_fwd", TORCH_FN((NllLossOps<kForward, kBackward>::fwd)));
  m.impl("nll_loss_bwd", TORCH_FN((NllLossOps<kForward, kBackward>::bwd)));
}

} // namespace xent
