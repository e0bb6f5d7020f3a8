// Softmax focal loss device code: forward and backward (formulas: Note [Focal loss formula],
// csrc/cpu/softmax_focal_kernels_impl.h). Host launch code: softmax_focal.cu.
//
// Device code only, like cross_entropy.cuh, whose helpers it reuses (online log-sum-exp State, class weights,
// the target check, the block's loss sums, finish_kernel, target_weight_kernel; conversions, math and warp
// sums come from acc_type.cuh and reduce.cuh): it compiles under nvcc and, as plain C++, under the SIMT
// emulator.
//
// Note [CUDA softmax focal kernels]
// ---------------------------------
// One warp per position, any strides: the lanes walk the classes c = lane, lane + 32, ... of the strided
// (N, C, S) view (coalesced when the class stride is 1; correct, if slower, for NCHW logits, which this first
// version does not give a lanes layout of their own). Per position:
//  * forward: an online (max, sum of exp) pass gives lse; class-index targets without smoothing then need only
//    x_y (loss = w_y f(x_y - lse)); smoothing and probability targets take a second pass over the row (L2-hot)
//    summing a_c f(x_c - lse). Every sum is per lane in class order, then a fixed warp butterfly: results do
//    not depend on timing.
//  * backward: class-index targets without smoothing read each logit once and write each gradient element
//    once (dx_j = g w_y h_y ([j == y] - p_j), with 1 - p_y from expm1 at j == y); smoothing and probability
//    targets first sum H = sum_c a_c h_c over the row, then write dx_j = g (a_j h_j - p_j H).
// Reductions (mean / sum) as in cross-entropy: per-block partial sums in a fixed tree, then finish_kernel.
// Ignored positions are not read: loss and lse 0, gradient rows written as zeros.
#pragma once

#include "cross_entropy.cuh"

namespace xent::cuda::focal {

using ce::kBlock;
using ce::kWarps;

template <class scalar_t>
struct Params {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* x = nullptr;  // logits, (N, C, S) strided
  int64_t N = 0, C = 0, S = 1;
  int64_t x_sn = 0, x_sc = 1, x_ss = 0;
  const scalar_t* tp = nullptr;  // probability targets, (N, C, S) strided, or null
  int64_t t_sn = 0, t_sc = 1, t_ss = 0;
  const int64_t* target = nullptr;  // class indices, (N * S) contiguous, or null
  int64_t ignore_index = -100;
  const acc_t* weight = nullptr;  // (C) or null
  acc_t one_minus_eps = 1;        // 1 - label_smoothing
  acc_t eps_over_c = 0;           // label_smoothing / C
  bool dense = false;             // smoothing or probability targets: the row's second pass
  acc_t gamma = 2;                // >= 0
  int int_gamma = -1;             // gamma when it is an integer in [1, 16] (powers by products), else -1
  // Forward outputs.
  acc_t* lse = nullptr;             // (P)
  scalar_t* loss = nullptr;         // (P), reduction none; else null
  acc_t* block_partials = nullptr;  // mean/sum: [n_blocks] losses then [n_blocks] weights w_y; else null
  int64_t n_blocks = 0;
  // Backward.
  const scalar_t* grad_loss = nullptr;  // reduction none: (P) contiguous; else null
  const acc_t* grad_scale = nullptr;    // sum/mean: device scalar grad_loss / denominator
  const acc_t* lse_in = nullptr;        // (P)
  scalar_t* grad = nullptr;             // (N, C, S) strided
  int64_t g_sn = 0, g_sc = 1, g_ss = 0;
};

using ce::class_weight;

// The focal terms of one class from l = log p (Note [Focal loss formula]): f = -(1 - p)^gamma l and
// h = p f'(p). NaN stays NaN.
template <class acc_t>
struct Terms {
  acc_t p, om, f, h;
};

template <class scalar_t, class acc_t>
__device__ inline Terms<acc_t> focal_terms(const Params<scalar_t>& a, acc_t l) {
  Terms<acc_t> r;
  r.p = acc_exp(l);
  // 1 - p from expm1: accurate near p = 1, the confident predictions the focal term is about.
  r.om = -acc_expm1(l);
  if (a.gamma == acc_t(0)) {
    r.f = -l;
    r.h = acc_t(-1);
    return r;
  }
  acc_t pw_m1;  // (1 - p)^(gamma - 1)
  if (a.int_gamma >= 1) {
    pw_m1 = acc_t(1);
    for (int k = 1; k < a.int_gamma; ++k) pw_m1 *= r.om;
  } else {
    pw_m1 = acc_exp((a.gamma - acc_t(1)) * acc_log(r.om));
  }
  r.f = pw_m1 * r.om * -l;
  r.h = pw_m1 * (a.gamma * r.p * l - r.om);
  // p == 1: (1 - p)^(gamma - 1) may be inf (gamma < 1) times 0; the limits are f = 0 and h = 0.
  if (r.om == acc_t(0)) {
    r.f = acc_t(0);
    r.h = acc_t(0);
  }
  return r;
}

// a_c = w_c q_c of class c; y: the class-index target (unused for probability targets).
template <class scalar_t, class acc_t>
__device__ inline acc_t coef(const Params<scalar_t>& a, int64_t t_off, int64_t c, int64_t y) {
  const acc_t w = class_weight(a.weight, c);
  if (a.tp != nullptr) {
    const acc_t t = to_acc(load_global(a.tp + t_off + c * a.t_sc));
    return w * (a.one_minus_eps * t + a.eps_over_c);
  }
  return w * (c == y ? a.one_minus_eps + a.eps_over_c : a.eps_over_c);
}

// lse of the row at x_off over the warp (every lane gets lane 0's value).
template <class scalar_t>
__device__ inline typename AccType<scalar_t>::type warp_row_lse(const Params<scalar_t>& a, int64_t x_off, int lane) {
  using acc_t = typename AccType<scalar_t>::type;
  ce::State<acc_t> st = ce::empty_state<acc_t>();
  for (int64_t c = lane; c < a.C; c += 32) {
    const acc_t v = to_acc(load_global(a.x + x_off + c * a.x_sc));
    const acc_t m = acc_max(st.m, v);
    if (m == ce::neg_inf<acc_t>()) {
      st.s += acc_exp(v);  // v is -inf (adds 0) or NaN (propagates)
    } else {
      st.s = st.s * acc_exp(st.m - m) + acc_exp(v - m);
    }
    st.m = m;
  }
  ce::warp_merge<ce::kIndex>(st);
  const acc_t m = shfl_lane0(st.m), s = shfl_lane0(st.s);
  return m + acc_log(s);
}

// A warp per position, kWarps per block: the thread's lane and its warp's position p.
struct WarpThread {
  int lane;
  int64_t p;
};

__device__ inline WarpThread warp_thread() {
  return WarpThread{static_cast<int>(threadIdx.x) % 32,
                    static_cast<int64_t>(blockIdx.x) * kWarps + static_cast<int>(threadIdx.x) / 32};
}

// Position p's class-index target y (-1 for probability targets), loaded by lane 0 and shared by the warp.
// False when the position is skipped: y == ignore_index, or y out of range (the device-side assert fails).
template <class scalar_t>
__device__ inline bool read_target(const Params<scalar_t>& a, int64_t p, int lane, int64_t& y) {
  y = -1;
  if (a.target == nullptr) return true;
  y = shfl_lane0(lane == 0 ? load_global(a.target + p) : int64_t(0));
  return y != a.ignore_index && ce::target_in_range(y, a.C);
}

// ---------------------------------------------------------------------------------------------------------
// Forward. Block: kBlock threads = kWarps positions.
template <class scalar_t>
__global__ void __launch_bounds__(kBlock, 1) fwd_kernel(const Params<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  const auto [lane, p] = warp_thread();
  acc_t loss = 0, wy = 0;
  if (p < a.N * a.S) {
    int64_t y;
    if (read_target(a, p, lane, y)) {
      const int64_t x_off = ce::position_offset(p, a.S, a.x_sn, a.x_ss);
      const acc_t lse = warp_row_lse(a, x_off, lane);
      if (!a.dense) {
        if (lane == 0) {  // only lane 0's loss and weight are used
          wy = class_weight(a.weight, y);
          const acc_t xy = to_acc(load_global(a.x + x_off + y * a.x_sc));
          loss = wy * focal_terms(a, xy - lse).f;
        }
      } else {
        if (lane == 0 && a.target != nullptr) wy = class_weight(a.weight, y);
        const int64_t t_off = a.tp != nullptr ? ce::position_offset(p, a.S, a.t_sn, a.t_ss) : 0;
        acc_t sum = 0;
        for (int64_t c = lane; c < a.C; c += 32) {
          const acc_t l = to_acc(load_global(a.x + x_off + c * a.x_sc)) - lse;
          const acc_t ac = coef<scalar_t, acc_t>(a, t_off, c, y);
          // As on the CPU, a_c == 0 still multiplies f (0 * inf = NaN where p_c == 0).
          sum += ac * focal_terms(a, l).f;
        }
        loss = shfl_lane0(warp_sum(sum));
      }
      if (lane == 0) store_global(a.lse + p, lse);
    } else if (lane == 0) {
      store_global(a.lse + p, acc_t(0));
    }
    if (lane == 0 && a.loss != nullptr) store_global(a.loss + p, from_acc<scalar_t>(loss));
  }
  if (lane != 0) loss = wy = acc_t(0);  // only lane 0's are the position's
  ce::store_loss_sums(a.block_partials, a.n_blocks, loss, wy);
}

// ---------------------------------------------------------------------------------------------------------
// Backward. Block: kBlock threads = kWarps positions.
template <class scalar_t>
__global__ void __launch_bounds__(kBlock, 1) bwd_kernel(const Params<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  const auto [lane, p] = warp_thread();
  if (p >= a.N * a.S) return;
  const int64_t g_off = ce::position_offset(p, a.S, a.g_sn, a.g_ss);
  int64_t y;
  if (!read_target(a, p, lane, y)) {
    for (int64_t c = lane; c < a.C; c += 32) store_global(a.grad + g_off + c * a.g_sc, from_acc<scalar_t>(acc_t(0)));
    return;
  }
  // Per-position scalars are loaded by lane 0 and broadcast (one load per warp, not 32).
  acc_t g = 0, lse = 0;
  if (lane == 0) {
    g = a.grad_loss != nullptr ? to_acc(load_global(a.grad_loss + p)) : load_global(a.grad_scale);
    lse = load_global(a.lse_in + p);
  }
  g = shfl_lane0(g);
  lse = shfl_lane0(lse);
  const int64_t x_off = ce::position_offset(p, a.S, a.x_sn, a.x_ss);
  if (!a.dense) {
    acc_t k = 0, om_y = 0;  // g w_y h_y and 1 - p_y
    if (lane == 0) {
      const Terms<acc_t> ty = focal_terms(a, to_acc(load_global(a.x + x_off + y * a.x_sc)) - lse);
      k = g * class_weight(a.weight, y) * ty.h;
      om_y = ty.om;
    }
    k = shfl_lane0(k);
    om_y = shfl_lane0(om_y);
    for (int64_t c = lane; c < a.C; c += 32) {
      acc_t d;
      if (c == y) {
        d = k * om_y;
      } else {
        d = -k * acc_exp(to_acc(load_global(a.x + x_off + c * a.x_sc)) - lse);
      }
      store_global(a.grad + g_off + c * a.g_sc, from_acc<scalar_t>(d));
    }
    return;
  }
  const int64_t t_off = a.tp != nullptr ? ce::position_offset(p, a.S, a.t_sn, a.t_ss) : 0;
  acc_t H = 0;
  for (int64_t c = lane; c < a.C; c += 32) {
    const acc_t ac = coef<scalar_t, acc_t>(a, t_off, c, y);
    H += ac * focal_terms(a, to_acc(load_global(a.x + x_off + c * a.x_sc)) - lse).h;
  }
  H = shfl_lane0(warp_sum(H));
  for (int64_t c = lane; c < a.C; c += 32) {
    const acc_t ac = coef<scalar_t, acc_t>(a, t_off, c, y);
    const Terms<acc_t> tc = focal_terms(a, to_acc(load_global(a.x + x_off + c * a.x_sc)) - lse);
    store_global(a.grad + g_off + c * a.g_sc, from_acc<scalar_t>(g * (ac * tc.h - tc.p * H)));
  }
}

} // namespace xent::cuda::focal
