// CPU softmax focal loss ops: argument checks (shared with cross-entropy, csrc/cross_entropy_host.h),
// layout selection, threading and reductions around the per-ISA kernels of focal_kernels_impl.h.
//
// Layouts are cross-entropy's (Note [Position layouts] in kernels.h): rows when the class stride is 1,
// lanes when the spatial stride is 1 (K-dim logits in place, or a transposed (N, C) matrix); a tensor
// that fits neither is copied to contiguous memory. Threads split the positions with a fixed grain and
// each position is computed by one thread in a fixed order, so results are bitwise identical for every
// thread count.
#include "cpu/focal_kernels.h"
#include "cpu/grad_buffer.h"
#include "cpu/isa.h"
#include "cpu/reductions.h"
#include "cross_entropy_host.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>

namespace xent::cpu {
namespace {

const FocalKernelTable& focal_kernels() {
  const std::string& isa = active_cpu_isa();
  const FocalKernelTable* t = isa == "avx512" ? (use_avx512_bf16() ? focal_kernels_avx512_bf16() : focal_kernels_avx512())
                              : isa == "avx2"  ? focal_kernels_avx2()
                                               : nullptr;
  return t ? *t : *focal_kernels_generic();
}

DType focal_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, "xent: unsupported dtype ", t);
  }
}

void check_gamma(double gamma) {
  TORCH_CHECK_VALUE(gamma >= 0.0 && std::isfinite(gamma), "softmax_focal_loss: gamma must be a finite number >= 0, got ",
                    gamma);
}

enum class Layout { rows, lanes };

struct Plan {
  Layout layout;
  NCSView x;
};

// A (1, C, N) view of a 2-d (N, C) view: a transposed matrix (stride_n == 1) in the lanes layout.
NCSView batch_as_positions(const NCSView& v) {
  NCSView r = v;
  r.N = 1;
  r.S = v.N;
  r.stride_n = 0;
  r.stride_s = v.stride_n;
  return r;
}

bool fits(Layout layout, const NCSView& v) {
  return layout == Layout::rows ? (v.stride_c == 1 || v.C <= 1) : (v.stride_s == 1 || v.S <= 1);
}

// The layout of the logits' strides; logits that fit neither are replaced by a contiguous copy.
Plan plan_layout(at::Tensor& logits) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (auto v = ncs_view(logits)) {
      if (v->stride_c == 1 || v->C <= 1) return {Layout::rows, *v};
      if (v->S > 1 && v->stride_s == 1) return {Layout::lanes, *v};
      if (v->S == 1 && (v->stride_n == 1 || v->N <= 1)) return {Layout::lanes, batch_as_positions(*v)};
    }
    logits = contiguous_strides(logits);
  }
  TORCH_INTERNAL_ASSERT(false, "contiguous logits must fit the rows or lanes layout");
}

// The view of `t` (shaped like the logits) in the plan's layout, or nullopt when it does not fit.
std::optional<NCSView> view_in(const Plan& plan, const at::Tensor& t) {
  auto v = ncs_view(t);
  if (!v) return std::nullopt;
  if (plan.layout == Layout::lanes && plan.x.N == 1 && v->S == 1 && t.size(0) == plan.x.S) *v = batch_as_positions(*v);
  if (!fits(plan.layout, *v)) return std::nullopt;
  return v;
}

// Positions per task: about 32 K logits each, fixed, so small problems stay on one thread.
int64_t grain_positions(int64_t C) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(C, 1)); }

struct Prepared {
  at::Tensor logits, target64, prob_target, weight;
  Plan plan;
  FocalArgs args{};
  int64_t positions = 0;
  double mean_denominator = 0;
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, bool prob,
                 double gamma, int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_logits(logits, "softmax_focal_loss");
  if (prob) check_prob_target(logits, target);
  else check_index_target(logits, target);
  check_weight(logits, weight);
  check_reduction(reduction);
  check_label_smoothing(label_smoothing);
  check_gamma(gamma);
  TORCH_CHECK(logits.device().is_cpu(), "xent: the CPU kernel got logits on ", logits.device());

  Prepared pr;
  pr.logits = logits;
  pr.plan = plan_layout(pr.logits);
  pr.weight = weight_for_kernel(logits, weight);
  FocalArgs& a = pr.args;
  const NCSView& x = pr.plan.x;
  a.dtype = focal_dtype(logits.scalar_type());
  a.logits = pr.logits.const_data_ptr();
  a.N = x.N;
  a.C = x.C;
  a.S = x.S;
  a.stride_n = x.stride_n;
  a.stride_c = x.stride_c;
  a.stride_s = x.stride_s;
  a.weight = pr.weight.defined() ? pr.weight.const_data_ptr() : nullptr;
  a.label_smoothing = label_smoothing;
  a.gamma = gamma;
  a.ignore_index = ignore_index;
  pr.positions = a.N * a.S;
  if (prob) {
    pr.prob_target = target;
    auto tv = view_in(pr.plan, pr.prob_target);
    if (!tv) {
      pr.prob_target = at::empty_strided(pr.logits.sizes(), dense_strides_like(pr.logits), target.options());
      pr.prob_target.copy_(target);
      tv = view_in(pr.plan, pr.prob_target);
      TORCH_INTERNAL_ASSERT(tv, "probability target does not fit the logits' layout");
    }
    a.prob_target = pr.prob_target.const_data_ptr();
    a.target_stride_n = tv->stride_n;
    a.target_stride_c = tv->stride_c;
    a.target_stride_s = tv->stride_s;
    pr.mean_denominator = static_cast<double>(pr.positions);
  } else {
    pr.target64 = targets_as_int64(target);
    a.target = pr.target64.const_data_ptr<int64_t>();
    // Validated before any kernel reads x[target]; the mean's denominator (sum of w_y) comes with it.
    pr.mean_denominator = validate_targets(pr.target64, a.C, ignore_index, pr.weight);
  }
  return pr;
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, bool prob, double gamma,
                                                int64_t reduction, int64_t ignore_index, double label_smoothing) {
  Prepared pr = prepare(logits, target, weight, prob, gamma, ignore_index, label_smoothing, reduction);
  FocalArgs& a = pr.args;
  const auto acc = acc_dtype(logits.scalar_type());
  const auto positions = position_sizes(logits);
  at::Tensor lse = at::empty(positions, logits.options().dtype(acc));
  at::Tensor loss = at::empty(positions, logits.options().dtype(acc));
  a.lse = lse.data_ptr();
  a.loss = loss.data_ptr();
  if (pr.positions > 0) {
    const FocalKernelTable& k = focal_kernels();
    auto body = pr.plan.layout == Layout::rows ? k.forward_rows : k.forward_lanes;
    at::parallel_for(0, pr.positions, grain_positions(a.C), [&](int64_t p0, int64_t p1) { body(a, p0, p1); });
  }
  if (reduction == at::Reduction::None) {
    return {acc == logits.scalar_type() ? loss : loss.to(logits.scalar_type()), lse};
  }
  double total = deterministic_sum(loss);
  if (reduction == at::Reduction::Mean) total = mean_of(total, pr.mean_denominator, label_smoothing);
  return {at::scalar_tensor(total, logits.options()), lse};
}

at::Tensor backward_impl(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, const at::Tensor& lse, bool prob, double gamma,
                         int64_t reduction, int64_t ignore_index, double label_smoothing) {
  Prepared pr = prepare(logits, target, weight, prob, gamma, ignore_index, label_smoothing, reduction);
  check_backward_inputs(grad_loss, logits, lse, reduction);
  const auto acc = acc_dtype(logits.scalar_type());

  // The gradient takes the logits' strides when they are dense (as the fake kernel promises); when those
  // fit no kernel layout, a contiguous gradient is computed and copied into place.
  at::Tensor grad = empty_grad_buffer(logits.sizes(), dense_strides_like(logits), logits.scalar_type());
  auto gv = view_in(pr.plan, grad);
  if (!gv) {
    at::Tensor contiguous_grad = backward_impl(grad_loss, contiguous_strides(logits), target, weight, lse, prob, gamma,
                                               reduction, ignore_index, label_smoothing);
    return grad.copy_(contiguous_grad);
  }
  FocalArgs& a = pr.args;
  a.grad = grad.data_ptr();
  a.grad_stride_n = gv->stride_n;
  a.grad_stride_c = gv->stride_c;
  a.grad_stride_s = gv->stride_s;
  if (pr.positions == 0 || a.C == 0) return grad;

  at::Tensor lse_c = lse.contiguous();
  a.lse_in = lse_c.const_data_ptr();
  at::Tensor scale;
  if (reduction == at::Reduction::None) {
    scale = grad_loss.to(acc).contiguous();
    a.grad_scale_per_position = scale.const_data_ptr();
  } else {
    double g = grad_loss.item<double>();  // a CPU scalar: no device synchronization
    if (reduction == at::Reduction::Mean) g = mean_of(g, pr.mean_denominator, label_smoothing);
    a.grad_scale_value = g;
  }
  const FocalKernelTable& k = focal_kernels();
  auto body = pr.plan.layout == Layout::rows ? k.backward_rows : k.backward_lanes;
  at::parallel_for(0, pr.positions, grain_positions(a.C), [&](int64_t p0, int64_t p1) { body(a, p0, p1); });
  return grad;
}

// The fused forward + gradient for grad_loss = 1 (Note [Fused gradient], xent/_fused.py), class-index
// targets, reduction mean or sum. Class-index rows without label smoothing take the one-pass kernel
// (forward_grad_rows: the gradient from the forward's exponentials); the other cases run the forward and
// backward kernels back to back on blocks of about kFusedBlockElements logits, so that the backward reads
// the logits from cache. Either way lse, loss and gradient are bitwise those of the separate ops.
constexpr int64_t kFusedBlockElements = int64_t(1) << 15;

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_grad_impl(const at::Tensor& logits, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 double gamma, int64_t reduction,
                                                                 int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK(reduction == at::Reduction::Mean || reduction == at::Reduction::Sum,
              "softmax_focal_loss_fwd_grad: reduction must be mean (1) or sum (2), got ", reduction);
  Prepared pr = prepare(logits, target, weight, false, gamma, ignore_index, label_smoothing, reduction);
  FocalArgs& a = pr.args;
  // The gradient takes the logits' strides when they are dense (as the fake kernel promises); when those
  // fit no kernel layout, everything runs on contiguous logits and the gradient is copied into place.
  at::Tensor grad = empty_grad_buffer(logits.sizes(), dense_strides_like(logits), logits.scalar_type());
  auto gv = view_in(pr.plan, grad);
  if (!gv) {
    auto [loss, lse, contiguous_grad] =
        forward_grad_impl(contiguous_strides(logits), target, weight, gamma, reduction, ignore_index, label_smoothing);
    return {loss, lse, grad.copy_(contiguous_grad)};
  }
  a.grad = grad.data_ptr();
  a.grad_stride_n = gv->stride_n;
  a.grad_stride_c = gv->stride_c;
  a.grad_stride_s = gv->stride_s;
  const auto acc = acc_dtype(logits.scalar_type());
  const auto positions = position_sizes(logits);
  at::Tensor lse = at::empty(positions, logits.options().dtype(acc));
  at::Tensor loss = at::empty(positions, logits.options().dtype(acc));
  a.lse = lse.data_ptr();
  a.loss = loss.data_ptr();
  a.lse_in = lse.const_data_ptr();  // each block's backward reads the lse its forward just wrote
  // Exactly the separate backward's scale for grad_loss = 1 (backward_impl), so the gradients agree bitwise.
  a.grad_scale_value = reduction == at::Reduction::Mean ? mean_of(1.0, pr.mean_denominator, label_smoothing) : 1.0;
  const FocalKernelTable& k = focal_kernels();
  const bool rows = pr.plan.layout == Layout::rows;
  a.stream_grad = rows && a.S == 1 && a.grad_stride_c == 1 && a.grad_stride_n == a.C &&
                  static_cast<int64_t>(grad.nbytes()) >= kFocalStagedStreamGradBytes;
  if (pr.positions > 0 && a.C > 0) {
    if (rows && label_smoothing == 0) {
      at::parallel_for(0, pr.positions, grain_positions(a.C),
                       [&](int64_t p0, int64_t p1) { k.forward_grad_rows(a, p0, p1); });
    } else {
      const int64_t block = std::max<int64_t>(1, kFusedBlockElements / a.C);
      at::parallel_for(0, pr.positions, grain_positions(a.C), [&](int64_t p0, int64_t p1) {
        for (int64_t b0 = p0; b0 < p1; b0 += block) {
          const int64_t b1 = std::min(p1, b0 + block);
          (rows ? k.forward_rows : k.forward_lanes)(a, b0, b1);
          (rows ? k.backward_rows : k.backward_lanes)(a, b0, b1);
        }
      });
    }
  } else if (pr.positions > 0) {
    auto body = rows ? k.forward_rows : k.forward_lanes;
    at::parallel_for(0, pr.positions, grain_positions(a.C), [&](int64_t p0, int64_t p1) { body(a, p0, p1); });
  }
  double total = deterministic_sum(loss);
  if (reduction == at::Reduction::Mean) total = mean_of(total, pr.mean_denominator, label_smoothing);
  return {at::scalar_tensor(total, logits.options()), lse, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_focal_loss_fwd_grad(const at::Tensor& logits,
                                                                           const at::Tensor& target,
                                                                           const std::optional<at::Tensor>& weight,
                                                                           double gamma, int64_t reduction,
                                                                           int64_t ignore_index,
                                                                           double label_smoothing) {
  return forward_grad_impl(logits, target, weight, gamma, reduction, ignore_index, label_smoothing);
}

std::tuple<at::Tensor, at::Tensor> softmax_focal_loss_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight, double gamma,
                                                          int64_t reduction, int64_t ignore_index,
                                                          double label_smoothing) {
  return forward_impl(logits, target, weight, false, gamma, reduction, ignore_index, label_smoothing);
}

at::Tensor softmax_focal_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse, double gamma,
                                  int64_t reduction, int64_t ignore_index, double label_smoothing) {
  return backward_impl(grad_loss, logits, target, weight, lse, false, gamma, reduction, ignore_index, label_smoothing);
}

std::tuple<at::Tensor, at::Tensor> softmax_focal_loss_prob_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                               const std::optional<at::Tensor>& weight, double gamma,
                                                               int64_t reduction, double label_smoothing) {
  return forward_impl(logits, target, weight, true, gamma, reduction, 0, label_smoothing);
}

at::Tensor softmax_focal_loss_prob_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& lse, double gamma,
                                       int64_t reduction, double label_smoothing) {
  return backward_impl(grad_loss, logits, target, weight, lse, true, gamma, reduction, 0, label_smoothing);
}

} // namespace

TORCH_LIBRARY_IMPL(xent, CPU, m) {
  m.impl("softmax_focal_loss_fwd", &softmax_focal_loss_fwd);
  m.impl("softmax_focal_loss_bwd", &softmax_focal_loss_bwd);
  m.impl("softmax_focal_loss_fwd_grad", &softmax_focal_loss_fwd_grad);
  m.impl("softmax_focal_loss_prob_fwd", &softmax_focal_loss_prob_fwd);
  m.impl("softmax_focal_loss_prob_bwd", &softmax_focal_loss_prob_bwd);
}

} // namespace xent::cpu
