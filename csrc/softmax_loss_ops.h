// The op entry points of the softmax losses, written once for every backend: each schema's argument list
// (csrc/ops.cpp) gathered into SoftmaxLossOptions, checked (class_losses_host.h) and handed to the backend's
// implementation of the loss.
//
// `Impl` is one loss on one backend, with static functions
//   forward(logits, target, weight, options) -> (loss, lse)
//   backward(grad_loss, logits, target, weight, lse, options) -> grad_logits
// and, where the backend has the fused forward + gradient (Note [Fused gradient], xent/_fused.py),
//   forward_grad(logits, target, weight, options) -> (loss, lse, grad_logits).
// register_cross_entropy<Impl>(m) / register_softmax_focal_loss<Impl>(m) register its ops in a
// TORCH_LIBRARY_IMPL block.
#pragma once

#include "class_losses_host.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace xent {

using Loss2 = std::tuple<at::Tensor, at::Tensor>;              // (loss, lse)
using Loss3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (loss, lse, grad_logits)
using MaybeWeight = std::optional<at::Tensor>;

template <class Impl>
constexpr bool has_fused_op = requires { &Impl::forward_grad; };

inline constexpr char kCrossEntropyName[] = "cross_entropy";
inline constexpr char kSoftmaxFocalLossName[] = "softmax_focal_loss";

// The entry points of one softmax loss, named kName in messages; `Gamma...` is empty for cross-entropy and
// `double` for the softmax focal loss, whose schemas take gamma after the weight. They check the arguments
// (class_losses_host.h) before the backend's implementation runs.
template <class Impl, const char* kName, class... Gamma>
struct SoftmaxLossOps {
  static SoftmaxLossOptions index(Gamma... gamma, int64_t reduction, int64_t ignore_index, double eps) {
    return {false, reduction, ignore_index, eps, (0.0 + ... + gamma)};
  }
  static SoftmaxLossOptions prob(Gamma... gamma, int64_t reduction, double eps) {
    return {true, reduction, 0, eps, (0.0 + ... + gamma)};
  }
  static void check(const at::Tensor& logits, const at::Tensor& target, const MaybeWeight& weight,
                    const SoftmaxLossOptions& o) {
    check_softmax_loss_args(kName, logits, target, weight, o, sizeof...(Gamma) > 0);
  }
  static Loss2 forward(const at::Tensor& logits, const at::Tensor& target, const MaybeWeight& weight,
                       const SoftmaxLossOptions& o) {
    check(logits, target, weight, o);
    return Impl::forward(logits, target, weight, o);
  }
  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                             const MaybeWeight& weight, const at::Tensor& lse, const SoftmaxLossOptions& o) {
    check(logits, target, weight, o);
    check_backward_inputs(grad_loss, logits, lse, o.reduction);
    return Impl::backward(grad_loss, logits, target, weight, lse, o);
  }
  static Loss3 forward_grad(const at::Tensor& logits, const at::Tensor& target, const MaybeWeight& weight,
                            const SoftmaxLossOptions& o) {
    check(logits, target, weight, o);
    return Impl::forward_grad(logits, target, weight, o);
  }

  static Loss2 fwd(const at::Tensor& logits, const at::Tensor& target, const MaybeWeight& weight, Gamma... gamma,
                   int64_t reduction, int64_t ignore_index, double eps) {
    return forward(logits, target, weight, index(gamma..., reduction, ignore_index, eps));
  }
  static at::Tensor bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                        const MaybeWeight& weight, const at::Tensor& lse, Gamma... gamma, int64_t reduction,
                        int64_t ignore_index, double eps) {
    return backward(grad_loss, logits, target, weight, lse, index(gamma..., reduction, ignore_index, eps));
  }
  static Loss3 fwd_grad(const at::Tensor& logits, const at::Tensor& target, const MaybeWeight& weight,
                        Gamma... gamma, int64_t reduction, int64_t ignore_index, double eps) {
    return forward_grad(logits, target, weight, index(gamma..., reduction, ignore_index, eps));
  }
  static Loss2 prob_fwd(const at::Tensor& logits, const at::Tensor& target, const MaybeWeight& weight,
                        Gamma... gamma, int64_t reduction, double eps) {
    return forward(logits, target, weight, prob(gamma..., reduction, eps));
  }
  static at::Tensor prob_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                             const MaybeWeight& weight, const at::Tensor& lse, Gamma... gamma, int64_t reduction,
                             double eps) {
    return backward(grad_loss, logits, target, weight, lse, prob(gamma..., reduction, eps));
  }
  static Loss3 prob_fwd_grad(const at::Tensor& logits, const at::Tensor& target, const MaybeWeight& weight,
                             Gamma... gamma, int64_t reduction, double eps) {
    return forward_grad(logits, target, weight, prob(gamma..., reduction, eps));
  }
};

template <class Impl>
void register_cross_entropy(torch::Library& m) {
  using Ops = SoftmaxLossOps<Impl, kCrossEntropyName>;
  m.impl("cross_entropy_fwd", TORCH_FN(Ops::fwd));
  m.impl("cross_entropy_bwd", TORCH_FN(Ops::bwd));
  m.impl("cross_entropy_prob_fwd", TORCH_FN(Ops::prob_fwd));
  m.impl("cross_entropy_prob_bwd", TORCH_FN(Ops::prob_bwd));
  if constexpr (has_fused_op<Impl>) {
    m.impl("cross_entropy_fwd_grad", TORCH_FN(Ops::fwd_grad));
    m.impl("cross_entropy_prob_fwd_grad", TORCH_FN(Ops::prob_fwd_grad));
  }
}

template <class Impl>
void register_softmax_focal_loss(torch::Library& m) {
  using Ops = SoftmaxLossOps<Impl, kSoftmaxFocalLossName, double>;
  m.impl("softmax_focal_loss_fwd", TORCH_FN(Ops::fwd));
  m.impl("softmax_focal_loss_bwd", TORCH_FN(Ops::bwd));
  m.impl("softmax_focal_loss_prob_fwd", TORCH_FN(Ops::prob_fwd));
  m.impl("softmax_focal_loss_prob_bwd", TORCH_FN(Ops::prob_bwd));
  if constexpr (has_fused_op<Impl>) m.impl("softmax_focal_loss_fwd_grad", TORCH_FN(Ops::fwd_grad));
}

} // namespace xent
