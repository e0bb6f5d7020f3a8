// Host launch code of the CUDA cross-entropy ops (device code and Note [CUDA cross-entropy kernels]:
// cross_entropy.cuh).
//
// The same file is compiled by g++ for the SIMT emulator (tests/simt/emulated_ops.cpp, XENT_SIMT_EMULATOR):
// then the tensors are CPU tensors, launches run the device code on the CPU and the ops are CPU kernels of
// the `xent_emulated` library. Everything that differs lives in host_compat.h.
//
// No host synchronisation: nothing computed on the device is read here. Sums for mean/sum reductions, the
// weight total of label smoothing and the mean's denominator in the backward are all reduced on the device
// in a fixed order (finish_kernel).
#include "cross_entropy.cuh"
#include "class_losses_host.h"
#include "host_compat.h"
#include "softmax_host.h"
#include "softmax_loss_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

namespace xent::cuda {
namespace {

using ce::kBlock;
using ce::kWarps;

using host::ceil_div;
using host::cptr;
using host::mptr;
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---- Layouts (Note [CUDA cross-entropy kernels]) ----
enum class Kind { Rows, Lanes };

// The kernels' (N, C, S) view of a tensor shaped like the logits.
struct View {
  int64_t N = 0, C = 0, S = 1;
  int64_t sn = 0, sc = 1, ss = 1;
};

std::optional<View> view_of(const at::Tensor& t) {
  const auto v = ncs_view(t);
  if (!v) return std::nullopt;
  View r{v->N, v->C, v->S, v->stride_n, v->stride_c, v->stride_s};
  if (r.C == 1) r.sc = 1;  // the stride of a size-1 dim means nothing
  return r;
}

bool rows_ok(const View& v) { return v.sc == 1; }
bool lanes_ok(const View& v) { return v.S > 1 ? v.ss == 1 : (v.N == 1 || v.sn == 1); }

std::optional<Kind> pick_kind(const View& v) {
  if (v.sc == 1 && !(v.C == 1 && v.S > 1 && lanes_ok(v))) return Kind::Rows;
  if (lanes_ok(v)) return Kind::Lanes;
  return std::nullopt;
}

// The logits (a contiguous copy when their layout fits neither kernel layout) and, for probability targets,
// the target with a layout the kernels accept.
struct Prepared {
  at::Tensor x;
  View xv;
  Kind kind = Kind::Rows;
  at::Tensor t;
  View tv;
};

Prepared prepare(const at::Tensor& logits, const at::Tensor* prob_target) {
  Prepared pr;
  pr.x = logits;
  auto xv = view_of(pr.x);
  std::optional<Kind> kind = xv ? pick_kind(*xv) : std::nullopt;
  if (!kind) {
    pr.x = contiguous_strides(logits);
    xv = view_of(pr.x);
    kind = pick_kind(*xv);
    TORCH_INTERNAL_ASSERT(kind.has_value());
  }
  pr.xv = *xv;
  pr.kind = *kind;
  if (prob_target != nullptr) {
    pr.t = *prob_target;
    auto tv = view_of(pr.t);
    // Rows: the target needs class stride 1 too; give it the logits' strides (128-bit loads then share
    // their alignment when the storage offsets agree). Lanes: any collapsible strides work.
    if (!tv || (pr.kind == Kind::Rows && !rows_ok(*tv))) {
      at::Tensor copy = pr.kind == Kind::Rows
          ? at::empty_strided(pr.x.sizes(), pr.x.strides(), pr.t.options())
          : at::empty(pr.t.sizes(), pr.t.options());
      copy.copy_(pr.t);
      pr.t = copy;
      tv = view_of(pr.t);
      TORCH_INTERNAL_ASSERT(tv && (pr.kind == Kind::Lanes || rows_ok(*tv)));
    }
    pr.tv = *tv;
  }
  return pr;
}

// ---- Work decomposition ----
struct Plan {
  int row_warps = 1;
  int class_groups = 1;
  int64_t chunk = 0;
  int64_t n_chunks = 1;
  int64_t grid = 0;
};

// Fewer positions than this many per SM: split long rows into chunks.
constexpr int64_t kSplitPositionsPerSM = 4;
// Rows of up to this many bytes get one warp each (8 rows per block); longer rows get the whole block.
constexpr int64_t kWarpRowMaxBytes = 8192;
// Split chunks: at least this many bytes, a multiple of a block-wide 128-bit step.
constexpr int64_t kMinChunkBytes = 16384;
// Lanes layout: classes per chunk when splitting positions' classes.
constexpr int64_t kLanesMinChunk = 256;

Plan plan_rows(int64_t P, int64_t C, int64_t elt, int sms) {
  Plan pl;
  const int64_t V = 16 / elt;
  pl.row_warps = C * elt <= kWarpRowMaxBytes ? 1 : kWarps;
  pl.chunk = C;
  const int64_t target_blocks = kSplitPositionsPerSM * sms;
  if (P < target_blocks) {
    const int64_t unit = static_cast<int64_t>(kBlock) * V;
    const int64_t want = ceil_div(target_blocks, P);
    const int64_t chunk = round_up(std::max(ceil_div(C, want), kMinChunkBytes / elt), unit);
    const int64_t n = ceil_div(C, chunk);
    if (n >= 2) {
      pl.row_warps = kWarps;
      pl.chunk = chunk;
      pl.n_chunks = n;
    }
  }
  pl.grid = ceil_div(P, kWarps / pl.row_warps) * pl.n_chunks;
  return pl;
}

Plan plan_lanes(int64_t P, int64_t C, int sms) {
  Plan pl;
  const int64_t target_blocks = kSplitPositionsPerSM * sms;
  // Warps share a tile's classes only when the tiles alone are too few to fill the GPU: a shared tile costs
  // a shared-memory merge (forward) and repeated per-position loads (backward).
  if (ceil_div(P, kBlock) < target_blocks) pl.class_groups = C >= 64 ? 8 : C >= 32 ? 4 : C >= 16 ? 2 : 1;
  pl.chunk = C;
  const int64_t tiles = ceil_div(P, 32 * (kWarps / pl.class_groups));
  if (tiles < target_blocks && C >= 2 * kLanesMinChunk) {
    const int64_t want = ceil_div(target_blocks, tiles);
    const int64_t chunk = std::max(ceil_div(C, want), kLanesMinChunk);
    const int64_t n = ceil_div(C, chunk);
    if (n >= 2) {
      pl.chunk = chunk;
      pl.n_chunks = n;
    }
  }
  pl.grid = tiles * pl.n_chunks;
  return pl;
}

Plan make_plan(const Prepared& pr, int sms) {
  const int64_t P = pr.xv.N * pr.xv.S;
  Plan pl = pr.kind == Kind::Rows ? plan_rows(P, pr.xv.C, pr.x.element_size(), sms) : plan_lanes(P, pr.xv.C, sms);
  TORCH_CHECK(
      pl.grid <= std::numeric_limits<int32_t>::max(), "cross_entropy: input too large for the CUDA kernels (",
      pl.grid, " blocks)");
  return pl;
}

// ---- Launchers ----

// Device scalar sum_c w_c (label smoothing with class weights).
template <class scalar_t>
at::Tensor weight_total(const at::Tensor& w, xent_stream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  at::Tensor total = at::empty({}, w.options());
  ce::FinishParams<scalar_t> f;
  f.num = cptr<acc_t>(w);
  f.n = w.numel();
  f.acc_out = mptr<acc_t>(total);
  softmax_host::launch_finish(f, stream);
  return total;
}

template <class scalar_t, int MODE>
void launch_forward_main(const ce::Params<scalar_t>& a, Kind kind, int64_t grid, xent_stream_t stream) {
  auto* kernel = kind == Kind::Rows ? &ce::fwd_rows_kernel<scalar_t, MODE> : &ce::fwd_lanes_kernel<scalar_t, MODE>;
  XENT_LAUNCH(static_cast<unsigned>(grid), kBlock, 0, stream, kernel)(a);
  XENT_CUDA_LAUNCH_CHECK();
}

// The plan's work decomposition in the kernel arguments.
template <class scalar_t>
void set_plan(ce::Params<scalar_t>& a, const Plan& pl) {
  a.chunk = pl.chunk;
  a.n_chunks = pl.n_chunks;
  a.row_warps = pl.row_warps;
  a.class_groups = pl.class_groups;
}

// Runs the forward kernels of MODE over every position: lse and loss (reduction none) or the per-block
// partial sums in a.block_partials (sized by forward_partial_blocks), or Q for kProbWsum.
template <class scalar_t, int MODE>
void run_forward(ce::Params<scalar_t> a, const Prepared& pr, const Plan& pl, xent_stream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t P = a.N * a.S;
  set_plan(a, pl);
  at::Tensor partials;
  if (pl.n_chunks > 1) {
    partials = at::empty({P * pl.n_chunks * 4}, pr.x.options().dtype(acc_dtype(pr.x.scalar_type())));
    a.partials = mptr<acc_t>(partials);
  }
  launch_forward_main<scalar_t, MODE>(a, pr.kind, pl.grid, stream);
  if (pl.n_chunks > 1) {
    auto* kernel = &ce::fwd_merge_kernel<scalar_t, MODE>;
    XENT_LAUNCH(static_cast<unsigned>(ceil_div(P, kBlock)), kBlock, 0, stream, kernel)(a);
    XENT_CUDA_LAUNCH_CHECK();
  }
}

// Blocks that store one partial each in the forward's last kernel.
int64_t forward_partial_blocks(int64_t P, const Plan& pl) { return pl.n_chunks > 1 ? ceil_div(P, kBlock) : pl.grid; }

template <class scalar_t>
ce::Params<scalar_t> base_params(
    const Prepared& pr,
    const at::Tensor& target,
    const at::Tensor& weight,
    const at::Tensor& weight_total,
    const SoftmaxLossOptions& o) {
  using acc_t = typename AccType<scalar_t>::type;
  ce::Params<scalar_t> a;
  a.x = cptr<scalar_t>(pr.x);
  a.N = pr.xv.N;
  a.C = pr.xv.C;
  a.S = pr.xv.S;
  a.x_sn = pr.xv.sn;
  a.x_ss = pr.xv.ss;
  a.x_sc = pr.xv.sc;
  if (pr.t.defined()) {
    a.tp = cptr<scalar_t>(pr.t);
    a.t_sn = pr.tv.sn;
    a.t_ss = pr.tv.ss;
    a.t_sc = pr.tv.sc;
  }
  a.target = cptr<int64_t>(target);
  a.ignore_index = o.ignore_index;
  a.weight = cptr<acc_t>(weight);
  a.weight_total = cptr<acc_t>(weight_total);
  a.one_minus_eps = static_cast<acc_t>(1.0 - o.label_smoothing);
  a.eps_over_c = a.C > 0 ? static_cast<acc_t>(o.label_smoothing / static_cast<double>(a.C)) : acc_t(0);
  return a;
}

int forward_mode(const SoftmaxLossOptions& o) {
  return o.prob ? ce::kProb : o.label_smoothing > 0.0 ? ce::kIndexSmooth : ce::kIndex;
}

// Calls f(std::integral_constant<int, mode>{}) for a mode of forward_mode.
template <class F>
void dispatch_mode(int mode, F&& f) {
  using host::ValueCase;
  const bool known = host::dispatch_cases<ValueCase<int{ce::kIndex}>, ValueCase<int{ce::kIndexSmooth}>,
                                          ValueCase<int{ce::kProb}>>(mode, f);
  TORCH_INTERNAL_ASSERT(known, "cross_entropy: unexpected kernel mode ", mode);
}

// ---- The ops: softmax_loss_ops.h registers them for the schemas of csrc/ops.cpp ----
struct CrossEntropyOnCuda {
  // ---- Forward ----
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                                    const std::optional<at::Tensor>& weight_opt,
                                                    const SoftmaxLossOptions& o) {
    host::DeviceGuard guard(logits.device());
    at::Tensor loss, lse;
    std::tie(loss, lse) = softmax_host::forward_outputs(logits, o.reduction);
    const int64_t P = lse.numel();
    if (P == 0) return {loss, lse};
    const Prepared pr = prepare(logits, o.prob ? &target : nullptr);
    const at::Tensor target64 = o.prob ? at::Tensor() : target.to(at::kLong).contiguous();
    const at::Tensor w = weight_for_kernel(logits, weight_opt);
    const int mode = forward_mode(o);
    const xent_stream_t stream = host::current_stream(logits.device());
    const Plan pl = make_plan(pr, host::sm_count(logits.device()));
    const int64_t n_blocks = forward_partial_blocks(P, pl);

    host::dispatch_float_dtype(logits.scalar_type(), "cross_entropy", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      using acc_t = typename AccType<scalar_t>::type;
      const at::Tensor wt = mode == ce::kIndexSmooth && w.defined() ? weight_total<scalar_t>(w, stream) : at::Tensor();
      ce::Params<scalar_t> a = base_params<scalar_t>(pr, target64, w, wt, o);
      a.lse = mptr<acc_t>(lse);
      at::Tensor block_partials;
      if (o.reduction == at::Reduction::None) {
        a.loss = mptr<scalar_t>(loss);
      } else {
        block_partials = at::empty({2 * n_blocks}, lse.options());
        a.block_partials = mptr<acc_t>(block_partials);
        a.n_blocks = n_blocks;
      }
      dispatch_mode(mode, [&](auto m) { run_forward<scalar_t, decltype(m)::value>(a, pr, pl, stream); });
      if (o.reduction != at::Reduction::None) {
        softmax_host::launch_forward_reduction(a.block_partials, n_blocks, o, P, mptr<scalar_t>(loss), stream);
      }
    });
    return {loss, lse};
  }

  // ---- Backward ----
  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight_opt, const at::Tensor& lse,
                             const SoftmaxLossOptions& o) {
    host::DeviceGuard guard(logits.device());
    at::Tensor grad = at::empty_strided(logits.sizes(), dense_strides_like(logits), logits.options());
    if (grad.numel() == 0) return grad;
    const Prepared pr = prepare(logits, o.prob ? &target : nullptr);
    const int64_t P = pr.xv.N * pr.xv.S;
    // The gradient is written in the kernels' layout: when grad's own layout does not fit it, into a
    // temporary with the (possibly copied) logits' strides, copied into grad at the end.
    at::Tensor gk = grad;
    auto gv = view_of(gk);
    if (!gv || (pr.kind == Kind::Rows && !rows_ok(*gv))) {
      gk = at::empty_strided(pr.x.sizes(), pr.x.strides(), logits.options());
      gv = view_of(gk);
      TORCH_INTERNAL_ASSERT(gv && (pr.kind == Kind::Lanes || rows_ok(*gv)));
    }
    const at::Tensor target64 = o.prob ? at::Tensor() : target.to(at::kLong).contiguous();
    const at::Tensor w = weight_for_kernel(logits, weight_opt);
    const at::Tensor lse_c = lse.contiguous();
    const at::Tensor gl = grad_loss.to(logits.scalar_type()).contiguous();
    const int mode = forward_mode(o);
    const xent_stream_t stream = host::current_stream(logits.device());
    const Plan pl = make_plan(pr, host::sm_count(logits.device()));

    host::dispatch_float_dtype(logits.scalar_type(), "cross_entropy", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      using acc_t = typename AccType<scalar_t>::type;
      const auto acc_opts = lse_c.options();
      const at::Tensor wt = mode == ce::kIndexSmooth && w.defined() ? weight_total<scalar_t>(w, stream) : at::Tensor();
      ce::Params<scalar_t> a = base_params<scalar_t>(pr, target64, w, wt, o);

      // Upstream gradient: per position, or the device scalar grad_loss / denominator.
      at::Tensor scale;
      if (o.reduction == at::Reduction::None) {
        a.grad_loss = cptr<scalar_t>(gl);
      } else {
        scale = softmax_host::launch_grad_scale(cptr<scalar_t>(gl), o, a.target, P, a.C, a.weight, acc_opts,
                                                "cross_entropy", stream);
        a.grad_scale = cptr<acc_t>(scale);
      }

      // Probability targets: Q = sum_c w_c q_c per position first.
      at::Tensor q;
      if (o.prob) {
        q = at::empty({P}, acc_opts);
        ce::Params<scalar_t> qa = a;
        qa.q_out = mptr<acc_t>(q);
        run_forward<scalar_t, ce::kProbWsum>(qa, pr, pl, stream);
        a.q_in = cptr<acc_t>(q);
      }

      a.lse_in = cptr<acc_t>(lse_c);
      a.grad = mptr<scalar_t>(gk);
      a.g_sn = gv->sn;
      a.g_ss = gv->ss;
      a.g_sc = gv->sc;
      set_plan(a, pl);
      dispatch_mode(mode, [&](auto m) {
        constexpr int M = decltype(m)::value;
        auto* kernel = pr.kind == Kind::Rows ? &ce::bwd_rows_kernel<scalar_t, M> : &ce::bwd_lanes_kernel<scalar_t, M>;
        XENT_LAUNCH(static_cast<unsigned>(pl.grid), kBlock, 0, stream, kernel)(a);
        XENT_CUDA_LAUNCH_CHECK();
      });
    });
    if (!gk.is_same(grad)) grad.copy_(gk);
    return grad;
  }
};

} // namespace
} // namespace xent::cuda

TORCH_LIBRARY_IMPL(XENT_CUDA_LIBRARY, XENT_CUDA_DISPATCH_KEY, m) {
  xent::register_cross_entropy<xent::cuda::CrossEntropyOnCuda>(m);
}
