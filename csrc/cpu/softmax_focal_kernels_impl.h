// The CPU softmax focal loss kernels, written once and compiled per instruction set (kernels_instantiate.h;
// interface and layouts: softmax_loss_kernels.h). Each position is computed by one thread in a fixed order,
// and vector lanes never mix positions' arithmetic in the lanes layout, so results do not depend on the
// thread count. Per-ISA header (Note [Per-ISA headers] in simd/vec.h).
//
// Note [Focal loss formula]
// -------------------------
// Per position, with p = softmax(x), q the target distribution (class index y: q_c = (1 - eps) [c == y]
// + eps / C; probabilities t: q_c = (1 - eps) t_c + eps / C), a_c = w_c q_c and
// f(p) = -(1 - p)^gamma log p:
//     loss = sum_c a_c f(p_c)
//     dloss/dx_j = a_j h_j - p_j sum_c a_c h_c,   h_c = p_c f'(p_c) = (1 - p_c)^(gamma - 1) (gamma p_c log p_c - (1 - p_c))
// log p_c = x_c - lse as in cross-entropy; 1 - p_c = -expm1(log p_c), accurate when p_c is near 1 (the
// confident predictions the focal term is about) for the log p it is given: 1 - exp(log p) would add an
// error of an ulp of 1. What remains is cross-entropy's own limit, the absolute error of log p = x - lse
// (a few ulp of |lse|, lse being rounded to the accumulation dtype), which bounds the relative accuracy
// of 1 - p once 1 - p is below it. Both terms of h are <= 0, so h has no cancellation; at p_c == 1, h is
// its limit: 0 for gamma > 0, -1 for gamma == 0.
// For class-index targets without smoothing only p_y enters, and the gradient is cross-entropy's shape
// times a per-position factor: dx_j = -w_y h_y p_j (j != y), dx_y = w_y h_y (1 - p_y).
#pragma once

#include "cpu/softmax_layouts_impl.h"

namespace xent::cpu {
namespace {

// 1 - p = -expm1(l) for l = log p <= 0. float: exp(l) - 1 loses relative accuracy only as p nears 1,
// where |l| is small and the Taylor series of expm1 converges fast: up to l^8 / 8! it is within 7e-10
// relative for l in [-0.35, 0]. Below -0.35, p < 0.71 and 1 - p rounds well (about 3 ulp).
inline VecF one_minus_exp(VecF l, VecF p) {
  VecF e = VecF::set1(1.0f / 40320.0f);
  e = VecF::fma(e, l, VecF::set1(1.0f / 5040.0f));
  e = VecF::fma(e, l, VecF::set1(1.0f / 720.0f));
  e = VecF::fma(e, l, VecF::set1(1.0f / 120.0f));
  e = VecF::fma(e, l, VecF::set1(1.0f / 24.0f));
  e = VecF::fma(e, l, VecF::set1(1.0f / 6.0f));
  e = VecF::fma(e, l, VecF::set1(0.5f));
  e = VecF::fma(e, l, VecF::set1(1.0f));
  const VecF near_one = VecF::set1(0.0f) - e * l;  // -expm1(l)
  return vselect(vlt(VecF::set1(-0.35f), l), near_one, VecF::set1(1.0f) - p);
}
inline VecD1 one_minus_exp(VecD1 l, VecD1) { return {-__builtin_expm1(l.v)}; }

// The per-class focal terms of Note [Focal loss formula] from l = log p (NaN stays NaN).
template <class V>
struct FocalTerms {
  using acc = typename V::scalar;
  double gamma;
  int int_gamma;  // gamma when it is an integer in [1, 16] (powers by products), else -1

  explicit FocalTerms(double g) : gamma(g), int_gamma(-1) {
    if (g >= 1 && g <= 16 && g == static_cast<double>(static_cast<int>(g))) int_gamma = static_cast<int>(g);
  }

  // p = exp(l), om = 1 - p, f = -(1 - p)^gamma l, h = p f'(p).
  void operator()(V l, V& p, V& om, V& f, V& h) const {
    p = V::exp(l);
    om = one_minus_exp(l, p);
    const V zero = V::set1(0);
    if (gamma == 0) {
      f = zero - l;
      h = V::set1(-1);
      return;
    }
    V pw_m1;  // (1 - p)^(gamma - 1)
    if (int_gamma >= 1) {
      pw_m1 = V::set1(1);
      for (int k = 1; k < int_gamma; ++k) pw_m1 = pw_m1 * om;
    } else {
      pw_m1 = V::exp(V::set1(static_cast<acc>(gamma - 1)) * vlog(om));
    }
    const V pw = pw_m1 * om;
    f = pw * (zero - l);
    h = pw_m1 * (V::set1(static_cast<acc>(gamma)) * p * l - om);
    // p == 1: (1 - p)^(gamma - 1) may be inf (gamma < 1) times 0; the limits are f = 0, h = 0.
    const auto at_one = veq(om, zero);
    if (mask_any(at_one)) {
      f = vselect(at_one, zero, f);
      h = vselect(at_one, zero, h);
    }
  }
};

// Terms of W gathered log-probabilities (one per position): the per-position factor of the class-index
// path, vectorized across positions.
template <class V>
struct GatheredTerms {
  using acc = typename V::scalar;
  acc p[V::kWidth], om[V::kWidth], f[V::kWidth], h[V::kWidth];
  GatheredTerms(const FocalTerms<V>& terms, const acc* l) {
    V pv, omv, fv, hv;
    terms(V::load(l), pv, omv, fv, hv);
    V::store(p, pv);
    V::store(om, omv);
    V::store(f, fv);
    V::store(h, hv);
  }
};

// ---------------------------------------------------------------------------------------------------
// Rows layout: the class stride is 1.

template <class T>
struct SoftmaxFocalRows : SoftmaxRows<T> {
  using Base = SoftmaxRows<T>;
  using typename Base::V;
  using typename Base::acc;
  static constexpr int W = V::kWidth;
  using Base::grad_row;
  using Base::ignored;
  using Base::logits_row;
  using Base::target_row;

  // How many rows ahead to prefetch logits: kStreamPrefetchBytes of them, at least the next row. One row
  // ahead is too close for short rows (320 bytes at C = 80 fp32): the data arrives after it is needed.
  // Computed once per kernel call (prefetch_row is called for every row).
  static int64_t rows_ahead(const SoftmaxLossArgs& a) {
    const int64_t row_bytes = a.C * static_cast<int64_t>(sizeof(T));
    return row_bytes >= kStreamPrefetchBytes ? 1 : kStreamPrefetchBytes / (row_bytes > 0 ? row_bytes : 1);
  }

  // The row whose logits to prefetch while working on `row`, `ahead` (rows_ahead) rows on; null past row_end.
  static const T* prefetch_row(const SoftmaxLossArgs& a, int64_t row, int64_t ahead, int64_t row_end) {
    return row + ahead < row_end ? logits_row(a, row + ahead) : nullptr;
  }

  // The max of a row as log-sum-exp shifts by it: four accumulators; an all -inf row gives 0 (every
  // exp(x - 0) is then 0 and lse = -inf); a NaN logit makes its exp (and lse) NaN. `next` (or null): a
  // row ahead to prefetch meanwhile (prefetch_row), for callers that take the max of consecutive rows back
  // to back.
  static acc row_shift(const T* x, int64_t C, const T* next = nullptr) {
    const V neg_inf = V::set1(-static_cast<acc>(kInf));
    V m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
    constexpr int64_t kLineElems = 64 / sizeof(T);
    int64_t i = 0;
    for (; i + 4 * W <= C; i += 4 * W) {
      if (next)
        for (int64_t l = 0; l < 4 * W; l += kLineElems) prefetch(next + i + l);
      m0 = V::max(m0, V::load(x + i));
      m1 = V::max(m1, V::load(x + i + W));
      m2 = V::max(m2, V::load(x + i + 2 * W));
      m3 = V::max(m3, V::load(x + i + 3 * W));
    }
    for (; i + W <= C; i += W) {
      if (next && i % kLineElems == 0) prefetch(next + i);
      m0 = V::max(m0, V::load(x + i));
    }
    if (i < C) {
      if (next) prefetch(next + i);
      m0 = V::max(m0, load_partial<V>(x + i, C - i, -static_cast<acc>(kInf)));
    }
    const acc m = V::max(V::max(m0, m1), V::max(m2, m3)).reduce_max();
    return m == -static_cast<acc>(kInf) ? acc(0) : m;
  }

  // The sum of exp(x - m) over one row, m = row_shift(x, C), four accumulators (block_lse takes its log).
  // When `e` is not null the exponentials exp(x - m) are stored there too (padded_to_vectors<V>(C)
  // elements, padding lanes 0): the fused kernel's gradient reuses them (see sparse_grad_row). While the exponentials run
  // from L1, a row ahead (`next`, prefetch_row; or null) is prefetched: its max pass would otherwise wait
  // on memory.
  // Prefetches never fault, so a next row shorter than the prefetch is harmless.
  static acc row_exp_sum(const T* x, int64_t C, const T* next, acc m, acc* e) {
    const V mv = V::set1(m), zero = V::set1(0);
    V s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    auto term = [&](int64_t i, V v) {
      const V ev = V::exp(v - mv);
      if (e) V::store(e + i, ev);
      return ev;
    };
    int64_t i = 0;
    constexpr int64_t kLineElems = 64 / sizeof(T);
    for (; i + 4 * W <= C; i += 4 * W) {
      if (next)
        for (int64_t l = 0; l < 4 * W; l += kLineElems) prefetch(next + i + l);
      s0 = s0 + term(i, V::load(x + i));
      s1 = s1 + term(i + W, V::load(x + i + W));
      s2 = s2 + term(i + 2 * W, V::load(x + i + 2 * W));
      s3 = s3 + term(i + 3 * W, V::load(x + i + 3 * W));
    }
    for (; i + W <= C; i += W) {
      if (next && i % kLineElems == 0) prefetch(next + i);
      s0 = s0 + term(i, V::load(x + i));
    }
    if (i < C) {
      if (next) prefetch(next + i);
      s0 = s0 + term(i, load_partial<V>(x + i, C - i, -static_cast<acc>(kInf)));
    }
    return ((s0 + s1) + (s2 + s3)).reduce_add();
  }

  // m (row_shift) and sum (row_exp_sum, exponentials kept in e + i * e_stride when e is not null) of the
  // block's rows r0 + i, i < rows; ignored rows are skipped (their m, sum stay as the caller set them).
  // When the block's logits and exponentials fit in L1 together, the maxes of all its rows are taken
  // first: their horizontal reductions then overlap one another, where each row's exp pass would
  // otherwise wait for its own (short rows, C = 80: the reductions are a large part of a row's work).
  // Longer rows would be read a second time from L2, for reductions that are a small part of their work.
  // Same arithmetic per row either way.
  // `ahead`: rows_ahead(a), for the prefetches. `between_rows()` is called after each row's exp pass (the
  // fused kernel steps the previous block's gradient copy-out there).
  template <class F>
  static void block_exp_sums(const SoftmaxLossArgs& a, int64_t r0, int64_t rows, int64_t row_end, int64_t ahead, acc* m,
                             acc* sum, acc* e, int64_t e_stride, F&& between_rows) {
    constexpr int64_t kMaxesFirstBytes = int64_t(32) << 10;
    const bool maxes_first =
        padded_to_vectors<V>(a.C) * static_cast<int64_t>(sizeof(T) + sizeof(acc)) * W <= kMaxesFirstBytes;
    if (maxes_first)
      for (int64_t i = 0; i < rows; ++i)
        if (!ignored(a, r0 + i)) m[i] = row_shift(logits_row(a, r0 + i), a.C);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = r0 + i;
      if (ignored(a, row)) continue;
      const T* x = logits_row(a, row);
      if (!maxes_first) m[i] = row_shift(x, a.C);
      sum[i] = row_exp_sum(x, a.C, prefetch_row(a, row, ahead, row_end), m[i], e ? e + i * e_stride : nullptr);
      between_rows();
    }
  }

  // lse = m + log(sum) of the W rows of a block (per lane: the same bits in whichever lane a row is),
  // in double and rounded once.
  static void block_lse(const acc* m, const acc* sum, acc* lse) {
    if constexpr (sizeof(acc) == sizeof(double)) {
      for (int i = 0; i < W; ++i) lse[i] = m[i] + __builtin_log(sum[i]);
    } else {
      for (int i = 0; i < W; ++i)
        lse[i] = static_cast<acc>(static_cast<double>(m[i]) + log_of_exp_sum(static_cast<double>(sum[i])));
      for (int i = 0; i < W; ++i)  // an all -inf row (sum 0): lse -inf; NaN logits: NaN
        if (!(sum[i] > 0)) lse[i] = sum[i] == 0 ? -static_cast<acc>(kInf) : sum[i];
    }
  }

  // exp(m - lse) per lane: the factor from the exponentials exp(x - m) to p = exp(x - lse).
  static void block_shift_to_p(const acc* m, const acc* lse, acc* out) {
    V::store(out, V::exp(V::load(m) - V::load(lse)));
  }

  // Calls body(c, n, lanes_valid, xv, tv, wv) over classes [0, C) of a row in vectors of W; the tail
  // vector has its padding lanes' x set to `x_fill`, t and w to 0, and `valid` 0 there (1 elsewhere).
  template <class F>
  static void for_each_vector(const SoftmaxLossArgs& a, const T* x, const T* tq, acc x_fill, F&& body) {
    const acc* w = static_cast<const acc*>(a.weight);
    const V one = V::set1(1);
    int64_t c = 0;
    for (; c + W <= a.C; c += W)
      body(c, W, V::load(x + c), tq ? V::load(tq + c) : V::set1(0), w ? V::load(w + c) : one, one);
    if (c < a.C) {
      const int64_t n = a.C - c;
      acc ones[W];
      for (int i = 0; i < W; ++i) ones[i] = 1;
      body(c, n, load_partial<V>(x + c, n, x_fill), tq ? load_partial<V>(tq + c, n, 0) : V::set1(0),
           w ? load_partial<V>(w + c, n, 0) : load_partial<V>(ones, n, 0), load_partial<V>(ones, n, 0));
    }
  }

  // a_c = w_c q_c over a vector: probability targets q = (1 - eps) t + eps / C; class-index targets the
  // smoothing part eps / C only (the target's (1 - eps) w_y is added by the caller).
  static V coef_vector(const SoftmaxLossArgs& a, V tv, V wv, V valid) {
    const acc eoc = static_cast<acc>(a.label_smoothing / static_cast<double>(a.C));
    if (a.prob_target) return V::fma(tv, V::set1(static_cast<acc>(1.0 - a.label_smoothing)), V::set1(eoc)) * wv * valid;
    return V::set1(eoc) * wv;  // wv is 0 in padding lanes
  }

  static bool dense_path(const SoftmaxLossArgs& a) { return a.prob_target || a.label_smoothing > 0; }

  static void forward_rows(const SoftmaxLossArgs& a, int64_t row_begin, int64_t row_end) {
    const FocalTerms<V> terms(a.gamma);
    const int64_t ahead = rows_ahead(a);
    const acc* w = static_cast<const acc*>(a.weight);
    acc* lse_out = static_cast<acc*>(a.lse);
    acc* loss_out = static_cast<acc*>(a.loss);
    // Blocks of W rows: their lse first, then the target terms of the block in one vector.
    for (int64_t r0 = row_begin; r0 < row_end; r0 += W) {
      const int64_t rows = row_end - r0 < W ? row_end - r0 : W;
      acc l_t[W], m[W], sum[W], lse[W];
      for (int i = 0; i < W; ++i) l_t[i] = m[i] = 0, sum[i] = 1;
      block_exp_sums(a, r0, rows, row_end, ahead, m, sum, nullptr, 0, [] {});
      block_lse(m, sum, lse);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = r0 + i;
        const bool skip = ignored(a, row);
        lse_out[row] = skip ? 0 : lse[i];
        if (!a.prob_target && !skip) l_t[i] = to_acc(logits_row(a, row)[a.target[row]]) - lse[i];
      }
      if (a.prob_target) {
        for (int64_t i = 0; i < rows; ++i) loss_out[r0 + i] = dense_loss(a, terms, r0 + i, lse_out[r0 + i], 0);
        continue;
      }
      const GatheredTerms<V> t(terms, l_t);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = r0 + i;
        if (ignored(a, row)) {
          loss_out[row] = 0;
          continue;
        }
        const int64_t y = a.target[row];
        const double w_y = w ? static_cast<double>(w[y]) : 1.0;
        double loss = (1.0 - a.label_smoothing) * w_y * static_cast<double>(t.f[i]);
        if (a.label_smoothing > 0) loss = dense_loss(a, terms, row, lse_out[row], loss);
        loss_out[row] = static_cast<acc>(loss);
      }
    }
  }

  // base + sum_c a_c f(p_c) over the row (a_c as coef_vector).
  static double dense_loss(const SoftmaxLossArgs& a, const FocalTerms<V>& terms, int64_t row, acc lse, double base) {
    const T* x = logits_row(a, row);
    const T* tq = a.prob_target ? target_row(a, row) : nullptr;
    const V lse_v = V::set1(lse);
    V sum = V::set1(0);
    for_each_vector(a, x, tq, lse, [&](int64_t, int64_t, V xv, V tv, V wv, V valid) {
      V p, om, f, h;
      terms(xv - lse_v, p, om, f, h);
      sum = V::fma(coef_vector(a, tv, wv, valid), f, sum);
    });
    return base + static_cast<double>(sum.reduce_add());
  }

  // The gradient row of a class-index target without smoothing (Note [Focal loss formula]):
  //   dx_j = -s w_y h_y p_j (j != y), then the target element s w_y h_y (1 - p_y) exactly,
  // with p_j = exp(x_j - m) shift_to_p, m = row_shift(x), shift_to_p = exp(m - lse) (block_shift_to_p):
  // the fused kernel has exp(x_j - m) from its exp sum (`e`, padded_to_vectors<V>(C) elements) and saves
  // one exp per logit; the backward op (e null) recomputes them with the same arithmetic, so both write
  // the same bits.
  // h_y, om_y: the target's focal terms (GatheredTerms of x_y - lse). `next`: a row ahead to prefetch, or null
  // (see row_exp_sum).
  static void sparse_grad_row(const SoftmaxLossArgs& a, int64_t row, const T* x, T* g, acc m, acc shift_to_p, acc h_y,
                              acc om_y, const acc* e, const T* next) {
    const acc* w = static_cast<const acc*>(a.weight);
    const double s = grad_scale<acc>(a, row);
    const int64_t y = a.target[row];
    const double swh = s * (w ? static_cast<double>(w[y]) : 1.0) * static_cast<double>(h_y);
    const V k = V::set1(static_cast<acc>(-swh) * shift_to_p);
    const V mv = V::set1(m);
    constexpr int64_t kLineElems = 64 / sizeof(T);
    int64_t c = 0;
    for (; c + W <= a.C; c += W) {
      if (next && c % kLineElems == 0) prefetch(next + c);
      V::store(g + c, k * (e ? V::load(e + c) : V::exp(V::load(x + c) - mv)));
    }
    if (c < a.C) {
      const V ev = e ? V::load(e + c) : V::exp(load_partial<V>(x + c, a.C - c, -static_cast<acc>(kInf)) - mv);
      store_partial(g + c, a.C - c, k * ev);
    }
    from_acc(g + y, static_cast<acc>(swh * static_cast<double>(om_y)));
  }

  static void zero_row(const SoftmaxLossArgs& a, T* g) {
    const V zero = V::set1(0);
    int64_t c = 0;
    for (; c + W <= a.C; c += W) V::store(g + c, zero);
    if (c < a.C) store_partial(g + c, a.C - c, zero);
  }

  // The fused forward + gradient of class-index rows without smoothing (!dense_path), grad scale
  // a.grad_scale_value: per block of W rows, forward_rows' lse and loss (same arithmetic, same bits), the
  // exponentials exp(x - m) kept in an L1/L2 buffer, then backward_rows' gradient from them
  // (sparse_grad_row). Rows too long for the buffer recompute the exponentials (the same bits).
  static void forward_grad_rows(const SoftmaxLossArgs& a, int64_t row_begin, int64_t row_end) {
    constexpr int64_t kBufferElems = (int64_t(64) << 10) / sizeof(acc);
    alignas(64) acc e_buf[kBufferElems];
    const FocalTerms<V> terms(a.gamma);
    const int64_t ahead = rows_ahead(a);
    const acc* w = static_cast<const acc*>(a.weight);
    acc* lse_out = static_cast<acc*>(a.lse);
    acc* loss_out = static_cast<acc*>(a.loss);
    const int64_t stride = padded_to_vectors<V>(a.C);
    const bool keep_exps = stride * W <= kBufferElems;
    // a.stream_grad: the block's gradient rows are staged here and copied out with non-temporal stores,
    // in slices between the next block's exp passes (SlicedStreamCopy). Finished before the next block's
    // gradient rows overwrite the stage, so one stage serves.
    alignas(64) T stage[kBufferElems];
    const bool staged = a.stream_grad && keep_exps;
    SlicedStreamCopy copy_out;
    for (int64_t r0 = row_begin; r0 < row_end; r0 += W) {
      const int64_t rows = row_end - r0 < W ? row_end - r0 : W;
      acc l_t[W], m[W], sum[W], lse[W], shift_to_p[W];
      for (int i = 0; i < W; ++i) l_t[i] = m[i] = 0, sum[i] = 1;
      block_exp_sums(a, r0, rows, row_end, ahead, m, sum, keep_exps ? e_buf : nullptr, stride,
                     [&] { copy_out.step(); });
      copy_out.finish();
      block_lse(m, sum, lse);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = r0 + i;
        if (ignored(a, row)) {
          lse[i] = lse_out[row] = 0;  // as the backward op's lane (its lse_in is 0 there)
          continue;
        }
        lse_out[row] = lse[i];
        l_t[i] = to_acc(logits_row(a, row)[a.target[row]]) - lse[i];
      }
      for (int64_t i = rows; i < W; ++i) lse[i] = 0;
      block_shift_to_p(m, lse, shift_to_p);
      const GatheredTerms<V> t(terms, l_t);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = r0 + i;
        T* g = staged ? stage + i * a.C : grad_row(a, row);
        if (ignored(a, row)) {
          loss_out[row] = 0;
          zero_row(a, g);
          continue;
        }
        const int64_t y = a.target[row];
        const double w_y = w ? static_cast<double>(w[y]) : 1.0;
        loss_out[row] = static_cast<acc>((1.0 - a.label_smoothing) * w_y * static_cast<double>(t.f[i]));
        sparse_grad_row(a, row, logits_row(a, row), g, m[i], shift_to_p[i], t.h[i], t.om[i],
                        keep_exps ? e_buf + i * stride : nullptr, nullptr);
      }
      if (staged) copy_out.start(grad_row(a, r0), stage, rows * a.C * static_cast<int64_t>(sizeof(T)), W);
    }
    copy_out.finish();
    if (staged) stream_fence();
  }

  static void backward_rows(const SoftmaxLossArgs& a, int64_t row_begin, int64_t row_end) {
    const FocalTerms<V> terms(a.gamma);
    const int64_t ahead = rows_ahead(a);
    const acc* w = static_cast<const acc*>(a.weight);
    const acc* lse_in = static_cast<const acc*>(a.lse_in);
    for (int64_t r0 = row_begin; r0 < row_end; r0 += W) {
      const int64_t rows = row_end - r0 < W ? row_end - r0 : W;
      acc l_t[W], m[W], lse[W], shift_to_p[W];
      for (int i = 0; i < W; ++i) l_t[i] = m[i] = lse[i] = 0;
      if (!a.prob_target)
        for (int64_t i = 0; i < rows; ++i)
          if (!ignored(a, r0 + i)) l_t[i] = to_acc(logits_row(a, r0 + i)[a.target[r0 + i]]) - lse_in[r0 + i];
      if (!dense_path(a)) {
        for (int64_t i = 0; i < rows; ++i) {
          if (ignored(a, r0 + i)) continue;
          // The maxes of the block's rows back to back, each prefetching a row ahead (the gradient
          // loop below then reads the block from cache).
          m[i] = row_shift(logits_row(a, r0 + i), a.C, prefetch_row(a, r0 + i, ahead, row_end));
          lse[i] = lse_in[r0 + i];
        }
        block_shift_to_p(m, lse, shift_to_p);
      }
      const GatheredTerms<V> t(terms, l_t);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = r0 + i;
        T* g = grad_row(a, row);
        if (ignored(a, row)) {
          zero_row(a, g);
          continue;
        }
        const T* x = logits_row(a, row);
        if (!dense_path(a)) {
          const T* next = prefetch_row(a, row, ahead, row_end);
          sparse_grad_row(a, row, x, g, m[i], shift_to_p[i], t.h[i], t.om[i], nullptr, next);
          continue;
        }
        // Dense: H = sum_c a_c h_c, then dx_j = s (a_j h_j - p_j H).
        const double s = grad_scale<acc>(a, row);
        const V lse_v = V::set1(lse_in[row]);
        const T* tq = a.prob_target ? target_row(a, row) : nullptr;
        V hsum = V::set1(0);
        for_each_vector(a, x, tq, lse_in[row], [&](int64_t, int64_t, V xv, V tv, V wv, V valid) {
          V p, om, f, h;
          terms(xv - lse_v, p, om, f, h);
          hsum = V::fma(coef_vector(a, tv, wv, valid), h, hsum);
        });
        double H = static_cast<double>(hsum.reduce_add());
        double a_y_extra = 0;  // class-index targets: the (1 - eps) w_y of a_y
        if (!a.prob_target) {
          a_y_extra = (1.0 - a.label_smoothing) * (w ? static_cast<double>(w[a.target[row]]) : 1.0);
          H += a_y_extra * static_cast<double>(t.h[i]);
        }
        const V s_v = V::set1(static_cast<acc>(s)), H_v = V::set1(static_cast<acc>(H));
        for_each_vector(a, x, tq, lse_in[row], [&](int64_t c, int64_t n, V xv, V tv, V wv, V valid) {
          V p, om, f, h;
          terms(xv - lse_v, p, om, f, h);
          const V out = s_v * (coef_vector(a, tv, wv, valid) * h - p * H_v);
          if (n == W) V::store(g + c, out);
          else store_partial(g + c, n, out);
        });
        if (!a.prob_target) {
          const int64_t y = a.target[row];
          const double a_y = a_y_extra + a.label_smoothing / static_cast<double>(a.C) * (w ? static_cast<double>(w[y]) : 1.0);
          from_acc(g + y, static_cast<acc>(s * (a_y * static_cast<double>(t.h[i]) - static_cast<double>(t.p[i]) * H)));
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// Lanes layout: the spatial stride is 1; the W lanes of a vector are W consecutive positions of one batch
// row, and the kernel walks the classes with stride stride_c (no transposed copy).

template <class T>
struct SoftmaxFocalLanes : SoftmaxLanes<T> {
  using Base = SoftmaxLanes<T>;
  using typename Base::V;
  using typename Base::acc;
  using Base::W;
  using Base::load_lanes;

  // Per-lane lse of the tile at x (lanes of padding get lse 0 from 0 logits... their results are unused).
  static V tile_lse(const SoftmaxLossArgs& a, const T* x, int64_t lanes) {
    V m = V::set1(-static_cast<acc>(kInf));
    for (int64_t c = 0; c < a.C; ++c) m = V::max(m, load_lanes(x + c * a.stride_c, lanes));
    const LaneSums<V> sum = Base::exp_sums(a, x, lanes, m);
    acc mb[W], out[W];
    V::store(mb, m);
    for (int i = 0; i < W; ++i) out[i] = static_cast<acc>(static_cast<double>(mb[i]) + __builtin_log(sum.v[i]));
    return V::load(out);
  }

  // a_c of every lane (see SoftmaxFocalRows::coef_vector).
  static V coef_lanes(const SoftmaxLossArgs& a, const T* tq, int64_t c, int64_t lanes) {
    const acc* w = static_cast<const acc*>(a.weight);
    const V wc = V::set1(w ? w[c] : acc(1));
    const acc eoc = static_cast<acc>(a.label_smoothing / static_cast<double>(a.C));
    if (tq) {
      return V::fma(load_lanes(tq + c * a.target_stride_c, lanes), V::set1(static_cast<acc>(1.0 - a.label_smoothing)),
                    V::set1(eoc)) * wc;
    }
    return V::set1(eoc) * wc;
  }

  // Per lane, sum_c a_c pick(f_c, h_c) over the tile's classes (a_c: coef_lanes; f, h: the focal terms
  // of x_c - lse), in LaneSums.
  template <class Pick>
  static LaneSums<V> coef_sum(const SoftmaxLossArgs& a, const FocalTerms<V>& terms, const T* x, const T* tq, V lse_v,
                              int64_t lanes, Pick pick) {
    return sum_over_class_blocks<V>(a.C, [&](int64_t c0, int64_t c1) {
      V part = V::set1(0);
      for (int64_t c = c0; c < c1; ++c) {
        V p, om, f, h;
        terms(load_lanes(x + c * a.stride_c, lanes) - lse_v, p, om, f, h);
        part = V::fma(coef_lanes(a, tq, c, lanes), pick(f, h), part);
      }
      return part;
    });
  }

  static void forward(const SoftmaxLossArgs& a, int64_t p_begin, int64_t p_end) {
    const FocalTerms<V> terms(a.gamma);
    const acc* w = static_cast<const acc*>(a.weight);
    acc* lse_out = static_cast<acc*>(a.lse);
    acc* loss_out = static_cast<acc*>(a.loss);
    const bool prob = a.prob_target != nullptr;
    const bool dense = prob || a.label_smoothing > 0;
    Base::for_each_tile(a, p_begin, p_end, [&](const typename Base::Tile& tile) {
      const auto& [n, s, lanes, x, tq, g] = tile;
      const V lse_v = tile_lse(a, x, lanes);
      LaneSums<V> dense_sum;  // sum_c a_c f_c per lane
      if (dense) dense_sum = coef_sum(a, terms, x, tq, lse_v, lanes, [](V f, V) { return f; });
      acc lse[W], l_t[W];
      V::store(lse, lse_v);
      for (int i = 0; i < W; ++i) l_t[i] = 0;
      const int64_t p0 = n * a.S + s;
      if (!prob)
        for (int64_t i = 0; i < lanes; ++i) {
          const int64_t y = a.target[p0 + i];
          if (y != a.ignore_index) l_t[i] = to_acc(x[y * a.stride_c + i]) - lse[i];
        }
      const GatheredTerms<V> t(terms, l_t);
      for (int64_t i = 0; i < lanes; ++i) {
        const int64_t p = p0 + i;
        if (prob) {
          lse_out[p] = lse[i];
          loss_out[p] = static_cast<acc>(dense_sum.v[i]);
          continue;
        }
        const int64_t y = a.target[p];
        if (y == a.ignore_index) {
          lse_out[p] = 0;
          loss_out[p] = 0;
          continue;
        }
        lse_out[p] = lse[i];
        const double w_y = w ? static_cast<double>(w[y]) : 1.0;
        double loss = (1.0 - a.label_smoothing) * w_y * static_cast<double>(t.f[i]);
        if (dense) loss = dense_sum.v[i] + loss;
        loss_out[p] = static_cast<acc>(loss);
      }
    });
  }

  static void backward(const SoftmaxLossArgs& a, int64_t p_begin, int64_t p_end) {
    const FocalTerms<V> terms(a.gamma);
    const acc* w = static_cast<const acc*>(a.weight);
    const acc* lse_in = static_cast<const acc*>(a.lse_in);
    const bool prob = a.prob_target != nullptr;
    const bool dense = prob || a.label_smoothing > 0;
    Base::for_each_tile(a, p_begin, p_end, [&](const typename Base::Tile& tile) {
      const auto& [n, s, lanes, x, tq, g] = tile;
      const int64_t p0 = n * a.S + s;
      acc lse[W], scale[W], l_t[W], a_y[W];
      for (int i = 0; i < W; ++i) lse[i] = scale[i] = l_t[i] = a_y[i] = 0;
      for (int64_t i = 0; i < lanes; ++i) {
        lse[i] = lse_in[p0 + i];
        scale[i] = static_cast<acc>(grad_scale<acc>(a, p0 + i));
        if (prob) continue;
        const int64_t y = a.target[p0 + i];
        if (y == a.ignore_index) continue;
        l_t[i] = to_acc(x[y * a.stride_c + i]) - lse[i];
        a_y[i] = static_cast<acc>((1.0 - a.label_smoothing) * (w ? static_cast<double>(w[y]) : 1.0));
      }
      const GatheredTerms<V> t(terms, l_t);
      const V lse_v = V::load(lse), s_v = V::load(scale);
      auto store_class = [&](int64_t c, V out) {
        if (lanes == W) V::store(g + c * a.grad_stride_c, out);
        else store_partial(g + c * a.grad_stride_c, lanes, out);
      };
      acc H[W];
      for (int i = 0; i < W; ++i) H[i] = 0;
      if (!dense) {
        // dx_j = -s w_y h_y p_j; target element and ignored positions fixed up per lane below.
        acc k[W];
        for (int i = 0; i < W; ++i) k[i] = -scale[i] * a_y[i] * t.h[i];
        const V k_v = V::load(k);
        for (int64_t c = 0; c < a.C; ++c) store_class(c, k_v * V::exp(load_lanes(x + c * a.stride_c, lanes) - lse_v));
      } else {
        const LaneSums<V> hsum = coef_sum(a, terms, x, tq, lse_v, lanes, [](V, V h) { return h; });
        for (int i = 0; i < W; ++i) H[i] = static_cast<acc>(hsum.v[i] + static_cast<double>(a_y[i]) * t.h[i]);
        const V H_v = V::load(H);
        for (int64_t c = 0; c < a.C; ++c) {
          V p, om, f, h;
          terms(load_lanes(x + c * a.stride_c, lanes) - lse_v, p, om, f, h);
          store_class(c, s_v * (coef_lanes(a, tq, c, lanes) * h - p * H_v));
        }
      }
      if (prob) return;
      for (int64_t i = 0; i < lanes; ++i) {
        const int64_t y = a.target[p0 + i];
        if (y == a.ignore_index) {
          for (int64_t c = 0; c < a.C; ++c) from_acc(g + c * a.grad_stride_c + i, acc(0));
          continue;
        }
        const double sc = scale[i];
        double g_y;
        if (!dense) {
          g_y = sc * static_cast<double>(a_y[i]) * t.h[i] * t.om[i];
        } else {
          const double a_full =
              static_cast<double>(a_y[i]) + a.label_smoothing / static_cast<double>(a.C) * (w ? static_cast<double>(w[y]) : 1.0);
          g_y = sc * (a_full * t.h[i] - static_cast<double>(t.p[i]) * H[i]);
        }
        from_acc(g + y * a.grad_stride_c + i, static_cast<acc>(g_y));
      }
    });
  }
};

// Every row is computed whole: no split-row entries.
constexpr SoftmaxLossKernels kSoftmaxFocalKernels = softmax_loss_kernels<SoftmaxFocalRows, SoftmaxFocalLanes>();

} // namespace
} // namespace xent::cpu
