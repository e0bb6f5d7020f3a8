// Host launch code of the CUDA softmax focal loss ops (device code and Note [CUDA softmax focal kernels]:
// softmax_focal.cuh). Semantics are the CPU ops' (csrc/cpu/softmax_focal.cpp).
//
// Compiled by nvcc, and by g++ for the SIMT emulator (tests/simt/emulated_ops.cpp includes it into the same
// translation unit as cross_entropy.cu: hence the namespace of its own). Differences: host_compat.h.
//
// No host synchronisation: the reductions and the mean's denominators are computed on the device in a fixed
// order (cross-entropy's finish_kernel and target_weight_kernel, launched by softmax_host.h).
#include "class_losses_host.h"
#include "host_compat.h"
#include "softmax_focal.cuh"
#include "softmax_host.h"
#include "softmax_loss_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace xent::cuda::focal_host {
namespace {

using focal::kBlock;
using focal::kWarps;

using host::ceil_div;
using host::cptr;
using host::mptr;

// `t` (shaped like the logits) and its (N, C, S) view; a contiguous copy when its strides do not collapse.
struct Viewed {
  at::Tensor t;
  NCSView v;
};

Viewed viewed(const at::Tensor& t) {
  if (auto v = ncs_view(t)) return {t, *v};
  Viewed r{contiguous_strides(t), {}};
  auto v = ncs_view(r.t);
  TORCH_INTERNAL_ASSERT(v.has_value(), "a contiguous tensor must have an (N, C, S) view");
  r.v = *v;
  return r;
}

// Inputs shared by the forward and the backward, kept alive for the launches.
struct Prepared {
  Viewed x, tp;
  at::Tensor target64, weight;
  int64_t P = 0;
  int64_t grid = 0;  // kWarps positions per block
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                 bool prob) {
  Prepared pr;
  pr.x = viewed(logits);
  if (prob) pr.tp = viewed(target);
  else pr.target64 = target.to(at::kLong).contiguous();
  pr.weight = weight_for_kernel(logits, weight);
  pr.P = pr.x.v.N * pr.x.v.S;
  pr.grid = ceil_div(pr.P, kWarps);
  TORCH_CHECK(pr.grid <= std::numeric_limits<int32_t>::max(), "softmax_focal_loss: input too large for the CUDA kernels (",
              pr.grid, " blocks)");
  return pr;
}

template <class scalar_t>
focal::Params<scalar_t> base_params(const Prepared& pr, const SoftmaxLossOptions& o) {
  using acc_t = typename AccType<scalar_t>::type;
  focal::Params<scalar_t> a;
  const NCSView& xv = pr.x.v;
  a.x = cptr<scalar_t>(pr.x.t);
  a.N = xv.N;
  a.C = xv.C;
  a.S = xv.S;
  a.x_sn = xv.stride_n;
  a.x_sc = xv.stride_c;
  a.x_ss = xv.stride_s;
  if (o.prob) {
    a.tp = cptr<scalar_t>(pr.tp.t);
    a.t_sn = pr.tp.v.stride_n;
    a.t_sc = pr.tp.v.stride_c;
    a.t_ss = pr.tp.v.stride_s;
  } else {
    a.target = cptr<int64_t>(pr.target64);
  }
  a.ignore_index = o.ignore_index;
  a.weight = cptr<acc_t>(pr.weight);
  a.one_minus_eps = static_cast<acc_t>(1.0 - o.label_smoothing);
  a.eps_over_c = a.C > 0 ? static_cast<acc_t>(o.label_smoothing / static_cast<double>(a.C)) : acc_t(0);
  a.dense = o.prob || o.label_smoothing > 0.0;
  a.gamma = static_cast<acc_t>(o.gamma);
  a.int_gamma = o.gamma >= 1 && o.gamma <= 16 && o.gamma == std::floor(o.gamma) ? static_cast<int>(o.gamma) : -1;
  return a;
}

// The ops: softmax_loss_ops.h registers them for the schemas of csrc/ops.cpp.
struct SoftmaxFocalLossOnCuda {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                                    const std::optional<at::Tensor>& weight,
                                                    const SoftmaxLossOptions& o) {
    host::DeviceGuard guard(logits.device());
    at::Tensor loss, lse;
    std::tie(loss, lse) = softmax_host::forward_outputs(logits, o.reduction);
    if (lse.numel() == 0) return {loss, lse};
    const Prepared pr = prepare(logits, target, weight, o.prob);
    const xent_stream_t stream = host::current_stream(logits.device());
    host::dispatch_float_dtype(logits.scalar_type(), "softmax_focal_loss", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      using acc_t = typename AccType<scalar_t>::type;
      focal::Params<scalar_t> a = base_params<scalar_t>(pr, o);
      a.lse = mptr<acc_t>(lse);
      at::Tensor block_partials;  // [grid] losses, then [grid] weights w_y
      if (o.reduction == at::Reduction::None) {
        a.loss = mptr<scalar_t>(loss);
      } else {
        block_partials = at::empty({2 * pr.grid}, lse.options());
        a.block_partials = mptr<acc_t>(block_partials);
        a.n_blocks = pr.grid;
      }
      auto* kernel = &focal::fwd_kernel<scalar_t>;
      XENT_LAUNCH(static_cast<unsigned>(pr.grid), kBlock, 0, stream, kernel)(a);
      XENT_CUDA_LAUNCH_CHECK();
      if (o.reduction != at::Reduction::None) {
        softmax_host::launch_forward_reduction(a.block_partials, pr.grid, o, pr.P, mptr<scalar_t>(loss), stream);
      }
    });
    return {loss, lse};
  }

  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                             const SoftmaxLossOptions& o) {
    host::DeviceGuard guard(logits.device());
    // The gradient takes the logits' dense strides (as the fake kernel promises); when those do not collapse
    // to an (N, C, S) view, a contiguous gradient is written and copied into place.
    at::Tensor grad = at::empty_strided(logits.sizes(), dense_strides_like(logits), logits.options());
    if (grad.numel() == 0) return grad;
    Viewed g = viewed(grad);
    const Prepared pr = prepare(logits, target, weight, o.prob);
    const at::Tensor lse_c = lse.contiguous();
    const at::Tensor gl = grad_loss.to(logits.scalar_type()).contiguous();
    const xent_stream_t stream = host::current_stream(logits.device());
    host::dispatch_float_dtype(logits.scalar_type(), "softmax_focal_loss", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      using acc_t = typename AccType<scalar_t>::type;
      focal::Params<scalar_t> a = base_params<scalar_t>(pr, o);
      at::Tensor scale;
      if (o.reduction == at::Reduction::None) {
        a.grad_loss = cptr<scalar_t>(gl);
      } else {
        // The device scalar grad_loss / denominator.
        scale = softmax_host::launch_grad_scale(cptr<scalar_t>(gl), o, a.target, pr.P, a.C, a.weight, lse_c.options(),
                                                "softmax_focal_loss", stream);
        a.grad_scale = cptr<acc_t>(scale);
      }
      a.lse_in = cptr<acc_t>(lse_c);
      a.grad = mptr<scalar_t>(g.t);
      a.g_sn = g.v.stride_n;
      a.g_sc = g.v.stride_c;
      a.g_ss = g.v.stride_s;
      auto* kernel = &focal::bwd_kernel<scalar_t>;
      XENT_LAUNCH(static_cast<unsigned>(pr.grid), kBlock, 0, stream, kernel)(a);
      XENT_CUDA_LAUNCH_CHECK();
    });
    if (!g.t.is_same(grad)) grad.copy_(g.t);
    return grad;
  }
};

} // namespace
} // namespace xent::cuda::focal_host

TORCH_LIBRARY_IMPL(XENT_CUDA_LIBRARY, XENT_CUDA_DISPATCH_KEY, m) {
  xent::register_softmax_focal_loss<xent::cuda::focal_host::SoftmaxFocalLossOnCuda>(m);
}
