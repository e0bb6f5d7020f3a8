#include "cpu/softmax_loss.h"

#include "cpu/grad_buffer.h"
#include "cpu/isa.h"
#include "cpu/reductions.h"

#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace xent::cpu {
namespace {

// ---------------------------------------------------------------------------------------------------
// Layout selection (Note [Position layouts] in softmax_loss_kernels.h).

// A (1, C, N) view of a 2-d (N, C) view, so a transposed matrix (stride_n == 1) runs in the lanes layout.
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

// The layout of the logits' strides: rows when the class stride is 1, else lanes when the spatial stride is
// 1 (or there are no spatial positions: nothing to walk), or, for 2-d logits, a transposed matrix; logits
// that fit neither (e.g. every other class of a wider matrix) are replaced by a contiguous copy.
LayoutPlan plan_layout(at::Tensor& logits) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (auto v = ncs_view(logits)) {
      if (v->stride_c == 1 || v->C <= 1) return {Layout::rows, *v};
      if (v->S != 1 && (v->stride_s == 1 || v->S == 0)) return {Layout::lanes, *v};
      if (v->S == 1 && (v->stride_n == 1 || v->N <= 1)) return {Layout::lanes, batch_as_positions(*v)};
    }
    logits = contiguous_strides(logits);
  }
  TORCH_INTERNAL_ASSERT(false, "contiguous logits must fit the rows or lanes layout");
}

// The view of `t` (shaped like the logits) in the plan's layout, or nullopt when it does not fit.
std::optional<NCSView> view_in(const LayoutPlan& plan, const at::Tensor& t) {
  auto v = ncs_view(t);
  if (!v) return std::nullopt;
  if (plan.layout == Layout::lanes && plan.x.N == 1 && v->S == 1 && t.size(0) == plan.x.S) *v = batch_as_positions(*v);
  if (!fits(plan.layout, *v)) return std::nullopt;
  return v;
}

// ---------------------------------------------------------------------------------------------------
// Arguments.

struct Prepared {
  at::Tensor logits, target64, prob_target, weight, lse_in, grad_scale;
  LayoutPlan plan;
  SoftmaxLossArgs args{};
  int64_t positions = 0;
  double mean_denominator = 0;  // sum of w[target] over non-ignored positions, or N * S for prob targets
};

// Validates every class-index target's range (softmax_loss_ops.h checked the other arguments), picks the
// layout and fills the kernel arguments but the outputs.
Prepared prepare(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                 const SoftmaxLossOptions& o) {
  TORCH_CHECK(logits.device().is_cpu(), "xent: the CPU kernel got logits on ", logits.device());

  Prepared pr;
  pr.logits = logits;
  pr.plan = plan_layout(pr.logits);
  pr.weight = weight_for_kernel(logits, weight);
  SoftmaxLossArgs& a = pr.args;
  const NCSView& x = pr.plan.x;
  a.dtype = kernel_dtype(logits.scalar_type());
  a.logits = pr.logits.const_data_ptr();
  a.N = x.N;
  a.C = x.C;
  a.S = x.S;
  a.stride_n = x.stride_n;
  a.stride_c = x.stride_c;
  a.stride_s = x.stride_s;
  a.weight = pr.weight.defined() ? pr.weight.const_data_ptr() : nullptr;
  a.weight_sum = pr.weight.defined() ? deterministic_sum(pr.weight) : static_cast<double>(a.C);
  a.label_smoothing = o.label_smoothing;
  a.gamma = o.gamma;
  a.ignore_index = o.ignore_index;
  pr.positions = a.N * a.S;
  if (o.prob) {
    pr.prob_target = target;
    auto tv = view_in(pr.plan, pr.prob_target);
    if (!tv) {
      // Give the target the logits' strides (dense by now, or contiguous) so both stream alike.
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
    // Validated before any kernel reads x[target]; the mean's denominator comes with it.
    pr.mean_denominator = validate_targets(pr.target64, a.C, o.ignore_index, pr.weight);
  }
  return pr;
}

// The forward outputs (N, *): lse and the unreduced loss, in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> forward_outputs(Prepared& pr, const at::Tensor& logits) {
  const auto positions = position_sizes(logits);
  const auto options = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor lse = at::empty(positions, options), loss = at::empty(positions, options);
  pr.args.lse = lse.data_ptr();
  pr.args.loss = loss.data_ptr();
  return {lse, loss};
}

// The reduced loss (a scalar in the logits' dtype) of the unreduced one.
at::Tensor reduce(const at::Tensor& loss, const Prepared& pr, const at::Tensor& logits, const SoftmaxLossOptions& o) {
  double total = deterministic_sum(loss);
  if (o.reduction == at::Reduction::Mean) total = mean_of(total, pr.mean_denominator, o.label_smoothing);
  return at::scalar_tensor(total, logits.options());
}

// The gradient buffer for `logits` in the plan's layout: with the logits' strides when they are dense (the
// fake kernels promise the same). Returns false when that layout fits none of the kernels' (e.g. a dense
// but permuted K-dim tensor): the caller then runs on contiguous logits and copies into `grad`.
bool attach_gradient(const SoftmaxLoss& loss, Prepared& pr, const at::Tensor& grad, bool fused) {
  auto gv = view_in(pr.plan, grad);
  if (!gv) return false;
  SoftmaxLossArgs& a = pr.args;
  a.grad = grad.data_ptr();
  a.grad_stride_n = gv->stride_n;
  a.grad_stride_c = gv->stride_c;
  a.grad_stride_s = gv->stride_s;
  a.stream_grad = loss.streams_gradient(pr.plan, a, pr.positions, static_cast<int64_t>(grad.nbytes()), fused);
  return true;
}

at::Tensor empty_gradient_like(const at::Tensor& logits) {
  return empty_grad_buffer(logits.sizes(), dense_strides_like(logits), logits.scalar_type());
}

// ---------------------------------------------------------------------------------------------------
// Parallel drivers.

template <class Body>
void over_positions(int64_t P, int64_t C, const Body& body) {
  at::parallel_for(0, P, grain_positions(C), body);
}

void run_forward(const SoftmaxLossKernels& k, const LayoutPlan& plan, const SoftmaxLossArgs& a, int64_t P) {
  if (plan.layout == Layout::lanes) {
    over_positions(P, a.C, [&](int64_t p0, int64_t p1) { k.forward_lanes(a, p0, p1); });
    return;
  }
  if (!split_rows(k, plan, P, a.C)) {
    over_positions(P, a.C, [&](int64_t r0, int64_t r1) { k.forward_rows(a, r0, r1); });
    return;
  }
  const int64_t chunks = (a.C + kChunk - 1) / kChunk;
  std::vector<RowPartial> partials(P * chunks);
  at::parallel_for(0, P * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {  // runs of chunks within one row
      const int64_t row = i / chunks, k0 = i % chunks;
      const int64_t k1 = std::min(chunks, k0 + (i1 - i));
      k.forward_row_partials(a, row, k0, k1, partials.data() + row * chunks + k0);
      i += k1 - k0;
    }
  });
  for (int64_t row = 0; row < P; ++row) k.forward_row_finish(a, row, partials.data() + row * chunks, chunks);
}

void run_backward(const SoftmaxLossKernels& k, const LayoutPlan& plan, const SoftmaxLossArgs& a, int64_t P) {
  if (plan.layout == Layout::lanes) {
    over_positions(P, a.C, [&](int64_t p0, int64_t p1) { k.backward_lanes(a, p0, p1); });
    return;
  }
  if (a.prob_target || !split_rows(k, plan, P, a.C)) {
    over_positions(P, a.C, [&](int64_t r0, int64_t r1) { k.backward_rows(a, r0, r1); });
    return;
  }
  const int64_t chunks = (a.C + kChunk - 1) / kChunk;
  at::parallel_for(0, P * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / chunks, c0 = (i % chunks) * kChunk;
      k.backward_row_classes(a, row, c0, std::min(a.C, c0 + kChunk));
    }
  });
}

// Forward and backward of the same positions back to back, in blocks of about kFusedBlockElements logits:
// the backward then reads the logits from cache instead of memory. Every position is computed by the same
// kernels as in run_forward and run_backward, so lse, loss and gradient are bitwise those of the separate
// ops.
constexpr int64_t kFusedBlockElements = int64_t(1) << 15;

void run_fused(const SoftmaxLoss& loss, const SoftmaxLossKernels& k, const LayoutPlan& plan,
               const SoftmaxLossArgs& a, int64_t P) {
  if (loss.fused_rows(plan, a, P)) {
    over_positions(P, a.C, [&](int64_t r0, int64_t r1) { k.forward_grad_rows(a, r0, r1); });
    return;
  }
  const bool lanes = plan.layout == Layout::lanes;
  if (!lanes && split_rows(k, plan, P, a.C)) {  // few long rows: nothing to fuse, every chunk is its own task
    run_forward(k, plan, a, P);
    run_backward(k, plan, a, P);
    return;
  }
  const int64_t block = std::max<int64_t>(1, kFusedBlockElements / std::max<int64_t>(a.C, 1));
  over_positions(P, a.C, [&](int64_t p0, int64_t p1) {
    for (int64_t b0 = p0; b0 < p1; b0 += block) {
      const int64_t b1 = std::min(p1, b0 + block);
      (lanes ? k.forward_lanes : k.forward_rows)(a, b0, b1);
      (lanes ? k.backward_lanes : k.backward_rows)(a, b0, b1);
    }
  });
}

} // namespace

bool split_rows(const SoftmaxLossKernels& kernels, const LayoutPlan& plan, int64_t rows, int64_t C) {
  return kernels.forward_row_partials && plan.layout == Layout::rows && rows < 4 * at::get_num_threads() &&
         C >= 2 * kChunk;
}

std::tuple<at::Tensor, at::Tensor> softmax_loss_forward(const SoftmaxLoss& loss, const at::Tensor& logits,
                                                        const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight,
                                                        const SoftmaxLossOptions& o) {
  Prepared pr = prepare(logits, target, weight, o);
  auto [lse, unreduced] = forward_outputs(pr, logits);
  if (pr.positions > 0) run_forward(loss.kernels(), pr.plan, pr.args, pr.positions);
  if (o.reduction == at::Reduction::None) {
    return {unreduced.scalar_type() == logits.scalar_type() ? unreduced : unreduced.to(logits.scalar_type()), lse};
  }
  return {reduce(unreduced, pr, logits, o), lse};
}

at::Tensor softmax_loss_backward(const SoftmaxLoss& loss, const at::Tensor& grad_loss, const at::Tensor& logits,
                                 const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                 const at::Tensor& lse, const SoftmaxLossOptions& o) {
  Prepared pr = prepare(logits, target, weight, o);
  at::Tensor grad = empty_gradient_like(logits);
  if (!attach_gradient(loss, pr, grad, /*fused=*/false)) {
    return grad.copy_(softmax_loss_backward(loss, grad_loss, contiguous_strides(logits), target, weight, lse, o));
  }
  if (pr.positions == 0 || pr.args.C == 0) return grad;
  SoftmaxLossArgs& a = pr.args;
  pr.lse_in = lse.contiguous();
  a.lse_in = pr.lse_in.const_data_ptr();
  if (o.reduction == at::Reduction::None) {
    pr.grad_scale = grad_loss.to(acc_dtype(logits.scalar_type())).contiguous();
    a.grad_scale_per_position = pr.grad_scale.const_data_ptr();
  } else {
    // A CPU scalar: reading it is not a device synchronization.
    const double g = grad_loss.item<double>();
    a.grad_scale_value = o.reduction == at::Reduction::Mean ? mean_of(g, pr.mean_denominator, o.label_smoothing) : g;
  }
  run_backward(loss.kernels(), pr.plan, a, pr.positions);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_loss_forward_grad(const SoftmaxLoss& loss,
                                                                         const at::Tensor& logits,
                                                                         const at::Tensor& target,
                                                                         const std::optional<at::Tensor>& weight,
                                                                         const SoftmaxLossOptions& o) {
  TORCH_CHECK(o.reduction == at::Reduction::Mean || o.reduction == at::Reduction::Sum, loss.name,
              o.prob ? "_prob" : "", "_fwd_grad: reduction must be mean (1) or sum (2), got ", o.reduction);
  Prepared pr = prepare(logits, target, weight, o);
  at::Tensor grad = empty_gradient_like(logits);
  if (!attach_gradient(loss, pr, grad, /*fused=*/true)) {
    auto [reduced, lse, contiguous_grad] = softmax_loss_forward_grad(loss, contiguous_strides(logits), target, weight, o);
    return {reduced, lse, grad.copy_(contiguous_grad)};
  }
  SoftmaxLossArgs& a = pr.args;
  auto [lse, unreduced] = forward_outputs(pr, logits);
  a.lse_in = lse.const_data_ptr();  // each block's backward reads the lse its forward just wrote
  // Exactly the separate backward's scale for grad_loss = 1, so the gradients agree bitwise.
  a.grad_scale_value = o.reduction == at::Reduction::Mean ? mean_of(1.0, pr.mean_denominator, o.label_smoothing) : 1.0;
  const SoftmaxLossKernels& k = loss.kernels();
  if (pr.positions > 0 && a.C > 0) run_fused(loss, k, pr.plan, a, pr.positions);
  else if (pr.positions > 0) run_forward(k, pr.plan, a, pr.positions);
  return {reduce(unreduced, pr, logits, o), lse, grad};
}

} // namespace xent::cpu
