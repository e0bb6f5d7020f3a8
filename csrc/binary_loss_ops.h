// The op entry points of the binary losses, written once for every backend: each schema's argument list
// (csrc/ops.cpp) gathered into BinaryLossOptions and handed to the backend's implementation.
//
// `Impl` is the binary losses on one backend, with static functions
//   forward(input, target, weight, pos_weight, options) -> loss
//   backward(grad_loss, input, target, weight, pos_weight, options) -> grad_input
// and, where the backend has the fused forward + gradient (Note [Fused gradient], xent/_fused.py),
//   forward_grad(input, target, weight, pos_weight, options) -> (loss, grad_input).
// register_binary_losses<Impl>(m) registers their ops in a TORCH_LIBRARY_IMPL block.
#pragma once

#include "binary_losses_host.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace xent {

template <class Impl>
struct BinaryLossOps {
  using T = at::Tensor;
  using MaybeT = std::optional<at::Tensor>;
  static constexpr auto kBce = BinaryLossKind::bce;
  static constexpr auto kLogits = BinaryLossKind::bce_with_logits;
  static constexpr auto kFocal = BinaryLossKind::sigmoid_focal;

  static T bce_fwd(const T& x, const T& y, const MaybeT& w, int64_t reduction) {
    return Impl::forward(x, y, w, std::nullopt, {kBce, reduction});
  }
  static T bce_bwd(const T& g, const T& x, const T& y, const MaybeT& w, int64_t reduction) {
    return Impl::backward(g, x, y, w, std::nullopt, {kBce, reduction});
  }
  static std::tuple<T, T> bce_fwd_grad(const T& x, const T& y, const MaybeT& w, int64_t reduction) {
    return Impl::forward_grad(x, y, w, std::nullopt, {kBce, reduction});
  }
  static T logits_fwd(const T& x, const T& y, const MaybeT& w, const MaybeT& pw, int64_t reduction) {
    return Impl::forward(x, y, w, pw, {kLogits, reduction});
  }
  static T logits_bwd(const T& g, const T& x, const T& y, const MaybeT& w, const MaybeT& pw, int64_t reduction) {
    return Impl::backward(g, x, y, w, pw, {kLogits, reduction});
  }
  static std::tuple<T, T> logits_fwd_grad(const T& x, const T& y, const MaybeT& w, const MaybeT& pw,
                                          int64_t reduction) {
    return Impl::forward_grad(x, y, w, pw, {kLogits, reduction});
  }
  static T focal_fwd(const T& x, const T& y, const MaybeT& w, const MaybeT& pw, double alpha, double gamma,
                     int64_t reduction) {
    return Impl::forward(x, y, w, pw, {kFocal, reduction, alpha, gamma});
  }
  static T focal_bwd(const T& g, const T& x, const T& y, const MaybeT& w, const MaybeT& pw, double alpha,
                     double gamma, int64_t reduction) {
    return Impl::backward(g, x, y, w, pw, {kFocal, reduction, alpha, gamma});
  }
  static std::tuple<T, T> focal_fwd_grad(const T& x, const T& y, const MaybeT& w, const MaybeT& pw, double alpha,
                                         double gamma, int64_t reduction) {
    return Impl::forward_grad(x, y, w, pw, {kFocal, reduction, alpha, gamma});
  }
};

template <class Impl>
void register_binary_losses(torch::Library& m) {
  using Ops = BinaryLossOps<Impl>;
  m.impl("binary_cross_entropy_fwd", TORCH_FN(Ops::bce_fwd));
  m.impl("binary_cross_entropy_bwd", TORCH_FN(Ops::bce_bwd));
  m.impl("binary_cross_entropy_with_logits_fwd", TORCH_FN(Ops::logits_fwd));
  m.impl("binary_cross_entropy_with_logits_bwd", TORCH_FN(Ops::logits_bwd));
  m.impl("sigmoid_focal_loss_fwd", TORCH_FN(Ops::focal_fwd));
  m.impl("sigmoid_focal_loss_bwd", TORCH_FN(Ops::focal_bwd));
  if constexpr (requires { &Impl::forward_grad; }) {
    m.impl("binary_cross_entropy_fwd_grad", TORCH_FN(Ops::bce_fwd_grad));
    m.impl("binary_cross_entropy_with_logits_fwd_grad", TORCH_FN(Ops::logits_fwd_grad));
    m.impl("sigmoid_focal_loss_fwd_grad", TORCH_FN(Ops::focal_fwd_grad));
  }
}

} // namespace xent
