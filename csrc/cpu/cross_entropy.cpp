// CPU cross-entropy ops: argument checks, layout selection, threading and reductions around the
// per-ISA kernels of kernels_impl.h.
#include "cpu/grad_buffer.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/reductions.h"
#include "cross_entropy_host.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <string>

namespace xent::cpu {
namespace {

// ---------------------------------------------------------------------------------------------------
// The kernel table of the active instruction set (csrc/cpu/isa.h).

const KernelTable& kernels() {
  const std::string& isa = active_cpu_isa();
  const KernelTable* t = isa == "avx512" ? (use_avx512_bf16() ? kernels_avx512_bf16() : kernels_avx512())
                         : isa == "avx2" ? kernels_avx2()
                                         : nullptr;
  return t ? *t : *kernels_generic();
}

std::string cpu_isa(c10::string_view isa) {
  if (!isa.empty()) set_cpu_isa(std::string(isa));
  return active_cpu_isa();
}

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, "xent: unsupported dtype ", t);
  }
}

// ---------------------------------------------------------------------------------------------------
// Layout selection (Note [Position layouts] in kernels.h).

enum class Layout { rows, lanes };

// A (1, C, N) view of a 2-d (N, C) view, so a transposed matrix (stride_n == 1) runs in the lanes layout.
NCSView batch_as_positions(const NCSView& v) {
  NCSView r = v;
  r.N = 1;
  r.S = v.N;
  r.stride_n = 0;
  r.stride_s = v.stride_n;
  return r;
}

// The views of the logits, gradient and probability target in one layout. `logits`, `grad` and
// `prob_target` may be replaced by contiguous copies / a differently strided gradient so that they fit.
struct Plan {
  Layout layout;
  NCSView x, g, t;
};

bool fits(Layout layout, const NCSView& v) {
  return layout == Layout::rows ? (v.stride_c == 1 || v.C <= 1) : (v.stride_s == 1 || v.S <= 1);
}

// Chooses the layout from the logits' strides, copying the logits to contiguous memory when they fit
// neither layout (e.g. every other class of a wider matrix).
Plan plan_layout(at::Tensor& logits) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto v = ncs_view(logits);
    if (v) {
      if (v->stride_c == 1 || v->C <= 1) return {Layout::rows, *v, *v, *v};
      if (v->stride_s == 1 || v->S <= 1) {
        if (v->S == 1) {
          if (v->stride_n == 1 || v->N <= 1) {
            const NCSView r = batch_as_positions(*v);
            return {Layout::lanes, r, r, r};
          }
        } else {
          return {Layout::lanes, *v, *v, *v};
        }
      }
    }
    logits = contiguous_strides(logits);
  }
  TORCH_INTERNAL_ASSERT(false, "contiguous logits must fit the rows or lanes layout");
}

// The view of `t` (shaped like the logits) in the plan's layout, or nullopt when it does not fit.
std::optional<NCSView> view_in(const Plan& plan, const at::Tensor& t) {
  auto v = ncs_view(t);
  if (!v) return std::nullopt;
  if (plan.layout == Layout::lanes && plan.x.N == 1 && v->S == 1 && t.size(0) == plan.x.S) {
    *v = batch_as_positions(*v);
  }
  if (!fits(plan.layout, *v)) return std::nullopt;
  return v;
}

void set_strides(const NCSView& v, int64_t& n, int64_t& c, int64_t& s) {
  n = v.stride_n;
  c = v.stride_c;
  s = v.stride_s;
}

double weight_total(const at::Tensor& weight) {
  if (!weight.defined()) return 0;
  return deterministic_sum(weight);
}

// ---------------------------------------------------------------------------------------------------
// Parallel drivers.

// Positions per task: about 32 K logits each, so small problems stay on one thread.
int64_t grain_positions(int64_t C) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(C, 1)); }

// Few long rows: split each row into chunks so every thread has work (results are unchanged, see
// Note [Deterministic chunks]).
bool split_rows(int64_t rows, int64_t C) {
  return rows < 4 * at::get_num_threads() && C >= 2 * kChunk;
}

void run_forward(const Plan& plan, const CrossEntropyArgs& args, int64_t P) {
  const KernelTable& k = kernels();
  if (plan.layout == Layout::lanes) {
    at::parallel_for(0, P, grain_positions(args.C), [&](int64_t p0, int64_t p1) { k.forward_lanes(args, p0, p1); });
    return;
  }
  if (!split_rows(P, args.C)) {
    at::parallel_for(0, P, grain_positions(args.C), [&](int64_t r0, int64_t r1) { k.forward_rows(args, r0, r1); });
    return;
  }
  const int64_t chunks = (args.C + kChunk - 1) / kChunk;
  std::vector<RowPartial> partials(P * chunks);
  at::parallel_for(0, P * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {  // runs of chunks within one row
      const int64_t row = i / chunks, k0 = i % chunks;
      const int64_t k1 = std::min(chunks, k0 + (i1 - i));
      k.forward_row_partials(args, row, k0, k1, partials.data() + row * chunks + k0);
      i += k1 - k0;
    }
  });
  for (int64_t row = 0; row < P; ++row) k.forward_row_finish(args, row, partials.data() + row * chunks, chunks);
}

void run_backward(const Plan& plan, const CrossEntropyArgs& args, int64_t P) {
  const KernelTable& k = kernels();
  if (plan.layout == Layout::lanes) {
    at::parallel_for(0, P, grain_positions(args.C), [&](int64_t p0, int64_t p1) { k.backward_lanes(args, p0, p1); });
    return;
  }
  if (args.prob_target || !split_rows(P, args.C)) {
    at::parallel_for(0, P, grain_positions(args.C),
                     [&](int64_t r0, int64_t r1) { k.backward_rows(args, r0, r1, 0, args.C); });
    return;
  }
  const int64_t chunks = (args.C + kChunk - 1) / kChunk;
  at::parallel_for(0, P * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / chunks, c0 = (i % chunks) * kChunk;
      k.backward_rows(args, row, row + 1, c0, std::min(args.C, c0 + kChunk));
    }
  });
}

// Forward and backward of the same positions back to back (the fused forward + gradient), in blocks of
// about kFusedBlockElements logits: the backward then reads the logits from cache instead of memory.
// Every position is computed by the same kernels as in run_forward and run_backward, so lse, loss and
// gradient are bitwise those of the separate ops.
constexpr int64_t kFusedBlockElements = int64_t(1) << 15;

// Whether rows are short (Note [Short rows' gradient] in kernels_impl.h): run_fused then takes the fused
// rows kernel (KernelTable::forward_grad_rows), whose blocks of rows and their gradient stay in L1, and
// both ops write the gradient through a staging buffer.
bool short_rows(const Plan& plan, const CrossEntropyArgs& args, int64_t P) {
  return plan.layout == Layout::rows && !split_rows(P, args.C) && fused_rows_fit(args.C, dtype_bytes(args.dtype));
}

void run_fused(const Plan& plan, const CrossEntropyArgs& args, int64_t P) {
  const KernelTable& k = kernels();
  const bool lanes = plan.layout == Layout::lanes;
  if (short_rows(plan, args, P)) {
    at::parallel_for(0, P, grain_positions(args.C),
                     [&](int64_t r0, int64_t r1) { k.forward_grad_rows(args, r0, r1); });
    return;
  }
  if (!lanes && split_rows(P, args.C)) {  // few long rows: nothing to fuse, every chunk is its own task
    run_forward(plan, args, P);
    run_backward(plan, args, P);
    return;
  }
  const int64_t block = std::max<int64_t>(1, kFusedBlockElements / std::max<int64_t>(args.C, 1));
  at::parallel_for(0, P, grain_positions(args.C), [&](int64_t p0, int64_t p1) {
    for (int64_t b0 = p0; b0 < p1; b0 += block) {
      const int64_t b1 = std::min(p1, b0 + block);
      if (lanes) {
        k.forward_lanes(args, b0, b1);
        k.backward_lanes(args, b0, b1);
      } else {
        k.forward_rows(args, b0, b1);
        k.backward_rows(args, b0, b1, 0, args.C);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The ops.

struct Prepared {
  at::Tensor logits, target64, prob_target, weight;
  Plan plan;
  CrossEntropyArgs args{};
  int64_t positions = 0;
  double mean_denominator = 0;  // sum of w[target] over non-ignored positions, or N * S for prob targets
};

// Checks the arguments (including every class-index target's range), picks the layout and fills the
// kernel arguments. The gradient, when given, must fit the chosen layout (see backward_impl).
Prepared prepare(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                 bool prob, int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_logits(logits, "cross_entropy");
  if (prob) check_prob_target(logits, target);
  else check_index_target(logits, target);
  check_weight(logits, weight);
  check_reduction(reduction);
  check_label_smoothing(label_smoothing);
  TORCH_CHECK(logits.device().is_cpu(), "xent: the CPU kernel got logits on ", logits.device());

  Prepared pr;
  pr.logits = logits;
  pr.plan = plan_layout(pr.logits);
  pr.weight = weight_for_kernel(logits, weight);
  CrossEntropyArgs& a = pr.args;
  a.dtype = kernel_dtype(logits.scalar_type());
  a.logits = pr.logits.const_data_ptr();
  a.N = pr.plan.x.N;
  a.C = pr.plan.x.C;
  a.S = pr.plan.x.S;
  set_strides(pr.plan.x, a.stride_n, a.stride_c, a.stride_s);
  a.weight = pr.weight.defined() ? pr.weight.const_data_ptr() : nullptr;
  a.weight_sum = pr.weight.defined() ? weight_total(pr.weight) : static_cast<double>(a.C);
  a.label_smoothing = label_smoothing;
  a.ignore_index = ignore_index;
  pr.positions = a.N * a.S;
  if (prob) {
    pr.prob_target = target;
    auto tv = view_in(pr.plan, pr.prob_target);
    if (!tv) {
      // Give the target the logits' strides (dense by now, or contiguous) so both stream alike.
      pr.prob_target = at::empty_strided(pr.logits.sizes(), dense_strides_like(pr.logits), target.options());
      pr.prob_target.copy_(target);
      tv = view_in(pr.plan, pr.prob_target);
      TORCH_INTERNAL_ASSERT(tv, "probability target does not fit the logits' layout");
    }
    pr.plan.t = *tv;
    a.prob_target = pr.prob_target.const_data_ptr();
    set_strides(pr.plan.t, a.target_stride_n, a.target_stride_c, a.target_stride_s);
    pr.mean_denominator = static_cast<double>(pr.positions);
  } else {
    pr.target64 = targets_as_int64(target);
    a.target = pr.target64.const_data_ptr<int64_t>();
    // Validated before any kernel reads x[target]; the mean's denominator comes with it.
    pr.mean_denominator = validate_targets(pr.target64, a.C, ignore_index, pr.weight);
  }
  return pr;
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, bool prob, int64_t reduction,
                                                int64_t ignore_index, double label_smoothing) {
  Prepared pr = prepare(logits, target, weight, prob, ignore_index, label_smoothing, reduction);
  CrossEntropyArgs& a = pr.args;
  const auto acc = acc_dtype(logits.scalar_type());
  const auto positions = position_sizes(logits);
  at::Tensor lse = at::empty(positions, logits.options().dtype(acc));
  at::Tensor loss = at::empty(positions, logits.options().dtype(acc));
  a.lse = lse.data_ptr();
  a.loss = loss.data_ptr();
  if (pr.positions > 0) run_forward(pr.plan, a, pr.positions);

  if (reduction == at::Reduction::None) {
    return {acc == logits.scalar_type() ? loss : loss.to(logits.scalar_type()), lse};
  }
  double total = deterministic_sum(loss);
  if (reduction == at::Reduction::Mean) total = mean_of(total, pr.mean_denominator, label_smoothing);
  return {at::scalar_tensor(total, logits.options()), lse};
}

// The gradient buffer for `logits` in the plan's layout: with the logits' strides when they are dense
// (the fake kernels promise the same), else undefined (the caller runs on contiguous logits and copies).
at::Tensor grad_buffer_for(const Prepared& pr, const at::Tensor& logits, CrossEntropyArgs& a) {
  at::Tensor grad = empty_grad_buffer(logits.sizes(), dense_strides_like(logits), logits.scalar_type());
  auto gv = view_in(pr.plan, grad);
  if (!gv) return at::Tensor();
  a.grad = grad.data_ptr();
  set_strides(*gv, a.grad_stride_n, a.grad_stride_c, a.grad_stride_s);
  const auto bytes = static_cast<int64_t>(grad.nbytes());
  if (short_rows(pr.plan, a, pr.positions)) {
    // Short rows stream through a staging buffer, which needs the gradient rows contiguous; it pays from
    // smaller gradients on than streaming from the exp loop (grad_buffer.h, Note [Short rows' gradient]).
    a.stream_grad = a.S == 1 && a.grad_stride_n == a.C && bytes >= kStagedStreamGradBytes;
  } else {
    a.stream_grad = bytes >= kCrossEntropyStreamGradBytes;
  }
  return grad;
}

// The forward, and the gradient for grad_loss = 1, in one pass (Note [Fused gradient], xent/_fused.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_grad_impl(const at::Tensor& logits, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& weight, bool prob,
                                                                 int64_t reduction, int64_t ignore_index,
                                                                 double label_smoothing) {
  TORCH_CHECK(reduction == at::Reduction::Mean || reduction == at::Reduction::Sum,
              prob ? "cross_entropy_prob_fwd_grad" : "cross_entropy_fwd_grad",
              ": reduction must be mean (1) or sum (2), got ", reduction);
  Prepared pr = prepare(logits, target, weight, prob, ignore_index, label_smoothing, reduction);
  CrossEntropyArgs& a = pr.args;
  at::Tensor grad = grad_buffer_for(pr, logits, a);
  if (!grad.defined()) {  // a dense layout no kernel takes (e.g. permuted K-dim): as backward_impl does
    auto [loss, lse, contiguous_grad] =
        forward_grad_impl(contiguous_strides(logits), target, weight, prob, reduction, ignore_index, label_smoothing);
    at::Tensor g = empty_grad_buffer(logits.sizes(), dense_strides_like(logits), logits.scalar_type());
    return {loss, lse, g.copy_(contiguous_grad)};
  }
  const auto acc = acc_dtype(logits.scalar_type());
  const auto positions = position_sizes(logits);
  at::Tensor lse = at::empty(positions, logits.options().dtype(acc));
  at::Tensor loss = at::empty(positions, logits.options().dtype(acc));
  a.lse = lse.data_ptr();
  a.loss = loss.data_ptr();
  a.lse_in = lse.const_data_ptr();  // each block's backward reads the lse its forward just wrote
  // Exactly the separate backward's scale for grad_loss = 1 (backward_impl), so the gradients agree bitwise.
  a.grad_scale_value = reduction == at::Reduction::Mean ? mean_of(1.0, pr.mean_denominator, label_smoothing) : 1.0;
  if (pr.positions > 0 && a.C > 0) run_fused(pr.plan, a, pr.positions);
  else if (pr.positions > 0) run_forward(pr.plan, a, pr.positions);

  double total = deterministic_sum(loss);
  if (reduction == at::Reduction::Mean) total = mean_of(total, pr.mean_denominator, label_smoothing);
  return {at::scalar_tensor(total, logits.options()), lse, grad};
}

at::Tensor backward_impl(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, const at::Tensor& lse, bool prob, int64_t reduction,
                         int64_t ignore_index, double label_smoothing) {
  Prepared pr = prepare(logits, target, weight, prob, ignore_index, label_smoothing, reduction);
  check_backward_inputs(grad_loss, logits, lse, reduction);
  const auto acc = acc_dtype(logits.scalar_type());

  // The gradient takes the logits' strides when they are dense (the fake kernel promises the same). When
  // that layout fits none of the kernels' (e.g. a dense but permuted K-dim tensor), the kernel writes a
  // contiguous gradient from contiguous logits and it is copied into place.
  CrossEntropyArgs& a = pr.args;
  at::Tensor grad = grad_buffer_for(pr, logits, a);
  if (!grad.defined()) {
    at::Tensor contiguous_grad =
        backward_impl(grad_loss, contiguous_strides(logits), target, weight, lse, prob, reduction, ignore_index, label_smoothing);
    at::Tensor g = empty_grad_buffer(logits.sizes(), dense_strides_like(logits), logits.scalar_type());
    return g.copy_(contiguous_grad);
  }
  if (pr.positions == 0 || a.C == 0) return grad;

  at::Tensor lse_c = lse.contiguous();
  a.lse_in = lse_c.const_data_ptr();
  at::Tensor scale;
  if (reduction == at::Reduction::None) {
    scale = grad_loss.to(acc).contiguous();
    a.grad_scale_per_position = scale.const_data_ptr();
  } else {
    // A CPU scalar: reading it is not a device synchronization.
    double g = grad_loss.item<double>();
    if (reduction == at::Reduction::Mean) g = mean_of(g, pr.mean_denominator, label_smoothing);
    a.grad_scale_value = g;
  }
  run_backward(pr.plan, a, pr.positions);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                     const std::optional<at::Tensor>& weight, int64_t reduction,
                                                     int64_t ignore_index, double label_smoothing) {
  return forward_impl(logits, target, weight, false, reduction, ignore_index, label_smoothing);
}

at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t reduction,
                             int64_t ignore_index, double label_smoothing) {
  return backward_impl(grad_loss, logits, target, weight, lse, false, reduction, ignore_index, label_smoothing);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_grad(const at::Tensor& logits, const at::Tensor& target,
                                                                      const std::optional<at::Tensor>& weight,
                                                                      int64_t reduction, int64_t ignore_index,
                                                                      double label_smoothing) {
  return forward_grad_impl(logits, target, weight, false, reduction, ignore_index, label_smoothing);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_fwd_grad(const at::Tensor& logits,
                                                                           const at::Tensor& target,
                                                                           const std::optional<at::Tensor>& weight,
                                                                           int64_t reduction, double label_smoothing) {
  return forward_grad_impl(logits, target, weight, true, reduction, 0, label_smoothing);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_prob_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight, int64_t reduction,
                                                          double label_smoothing) {
  return forward_impl(logits, target, weight, true, reduction, 0, label_smoothing);
}

at::Tensor cross_entropy_prob_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t reduction,
                                  double label_smoothing) {
  return backward_impl(grad_loss, logits, target, weight, lse, true, reduction, 0, label_smoothing);
}

at::Tensor cpu_exp(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "_cpu_exp expects a float32 CPU tensor");
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  kernels().exp_f32(xc.const_data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  return y;
}

std::vector<int64_t> cpu_grad_cache(int64_t capacity) { return grad_cache_control(capacity); }

} // namespace

TORCH_LIBRARY_IMPL(xent, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cross_entropy_fwd_grad", &cross_entropy_fwd_grad);
  m.impl("cross_entropy_prob_fwd", &cross_entropy_prob_fwd);
  m.impl("cross_entropy_prob_bwd", &cross_entropy_prob_bwd);
  m.impl("cross_entropy_prob_fwd_grad", &cross_entropy_prob_fwd_grad);
  m.impl("_cpu_exp", &cpu_exp);
}

// Ops without tensor arguments have nothing to dispatch on: register them for every key.
TORCH_LIBRARY_IMPL(xent, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa", &cpu_isa);
  m.impl("_cpu_grad_cache", &cpu_grad_cache);
}

} // namespace xent::cpu
