// The CPU cross-entropy kernels, written once and compiled per instruction set (kernels_instantiate.h;
// interface and layout notes: softmax_loss_kernels.h). Per-ISA header (Note [Per-ISA headers] in simd/vec.h).
//
// Notation: x = logits, t = class-index target, q_c = (1 - eps) t_c + eps / C the smoothed probability
// target, w = class weight (1 when absent), W_all = sum_c w_c, lse = log sum_c exp(x_c).
//   index targets: loss = w_t (lse - x_t)                                           (eps == 0)
//                  loss = (1 - eps) w_t (lse - x_t) + eps / C (W_all lse - sum_c w_c x_c)   (eps > 0)
//                  grad_j = s (softmax_j ((1 - eps) w_t + eps W_all / C) - eps w_j / C - [j == t] (1 - eps) w_t)
//   prob targets:  loss = lse sum_c w_c q_c - sum_c w_c q_c x_c
//                  grad_j = s (softmax_j sum_c w_c q_c - w_j q_j)
// where s is the upstream gradient of the position (already divided by the mean's denominator).
#pragma once

#include "cpu/softmax_layouts_impl.h"

namespace xent::cpu {
namespace {

// ---------------------------------------------------------------------------------------------------
// Per-position coefficients shared by both layouts.

template <class acc>
struct Coefficients {
  const acc* weight;  // (C) or null
  double eps, eps_over_c, weight_sum;
  int64_t C;

  explicit Coefficients(const SoftmaxLossArgs& a)
      : weight(static_cast<const acc*>(a.weight)),
        eps(a.label_smoothing),
        eps_over_c(a.label_smoothing / static_cast<double>(a.C)),
        weight_sum(a.weight_sum),
        C(a.C) {}

  double w(int64_t c) const { return weight ? static_cast<double>(weight[c]) : 1.0; }

  // Loss of a non-ignored position with class-index target t. The eps > 0 branch keeps both terms even
  // when one is 0 * inf = NaN, exactly like PyTorch's label-smoothing formula.
  double index_loss(double lse, double x_t, int64_t t, double dot) const {
    if (eps == 0.0) return w(t) * (lse - x_t);
    return (1.0 - eps) * w(t) * (lse - x_t) + eps_over_c * (weight_sum * lse - dot);
  }
  // The softmax coefficient of an index-target gradient row: grad_j = s * (a * softmax_j - b_j) - ...
  double index_softmax_coef(int64_t t) const { return (1.0 - eps) * w(t) + eps_over_c * weight_sum; }
  // What the target element subtracts from a * softmax_t: eps w_t / C + (1 - eps) w_t, summed in the same
  // order as index_softmax_coef so that a single class (C = 1, softmax = 1) gives exactly 0.
  double target_term(int64_t t) const { return (1.0 - eps) * w(t) + eps_over_c * w(t); }
};

// Merges partial b into a (Note [Deterministic chunks]).
inline void merge_partial(RowPartial& a, const RowPartial& b) {
  // A chunk whose max is -inf holds only -inf (or NaN) logits. Its sum is 0 (or NaN) and is added as is;
  // its max must not take part, since exp(-inf - -inf) is NaN.
  if (b.max == -kInf) {
    a.sum_exp += b.sum_exp;
  } else if (a.max == -kInf) {
    a.sum_exp += b.sum_exp;
    a.max = b.max;
  } else {
    const double m = (a.max > b.max || a.max != a.max) ? a.max : b.max;  // a NaN max propagates
    a.sum_exp = a.sum_exp * scalar_exp(a.max - m) + b.sum_exp * scalar_exp(b.max - m);
    a.max = m;
  }
  a.dot += b.dot;
  a.weight_dot += b.weight_dot;
}

// ---------------------------------------------------------------------------------------------------
// Rows layout: the class stride is 1.

template <class T>
struct CrossEntropyRows : SoftmaxRows<T> {
  using Base = SoftmaxRows<T>;
  using typename Base::V;
  using typename Base::acc;
  using Base::grad_row;
  using Base::ignored;
  using Base::logits_row;
  using Base::target_row;

  // The hot path: index targets without smoothing, whose rows need only max and sum exp (no dots).
  static bool hot_path(const SoftmaxLossArgs& a) { return !a.prob_target && !(a.label_smoothing > 0); }

  // (max, sum exp(x - max), dots) of x[0, n): the classes [c0, c0 + n) of one row (tq: its probability
  // targets, set exactly when a.prob_target). Pass 1 reads the chunk from memory for its max; pass 2
  // re-reads it from L1 for the exponentials.
  static RowPartial chunk_partial(const SoftmaxLossArgs& a, const T* x, const T* tq, int64_t c0, int64_t n) {
    if (hot_path(a)) {
      const acc m = chunk_max(x, n);
      return max_only_partial(m, chunk_exp_sum(x, n, m, prefetch_ahead_of(x, n)));
    }
    constexpr int W = V::kWidth;
    const acc* w = a.weight ? static_cast<const acc*>(a.weight) + c0 : nullptr;
    const V neg_inf = V::set1(-static_cast<acc>(kInf)), zero = V::set1(0);
    V m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
    V dot = zero, weight_dot = zero;
    acc tail_max = -static_cast<acc>(kInf), tail_dot = 0, tail_weight_dot = 0;
    int64_t i = 0;
    // Probability targets: each lane's dot products over up to kChunk / W classes, added to doubles every
    // kLaneSumBlock vectors (LaneSums, simd/accumulate.h): as plain float running sums of equal-sized terms they put
    // the loss at C = 5000 and 32000 about 1.2e-5 off (ten ulps; eager 4e-7).
    LaneSums<V> dot_sums, weight_dot_sums;
    if (tq) {  // probability targets: dot = sum w q x, weight_dot = sum w q
      const acc one_minus_eps = static_cast<acc>(1.0 - a.label_smoothing);
      const acc eps_over_c = static_cast<acc>(a.label_smoothing / static_cast<double>(a.C));
      const V ome = V::set1(one_minus_eps), eoc = V::set1(eps_over_c);
      int64_t in_block = 0;
      for (; i + W <= n; i += W) {
        const V xv = V::load(x + i);
        V wq = V::fma(V::load(tq + i), ome, eoc);
        if (w) wq = wq * V::load(w + i);
        m0 = V::max(m0, xv);
        dot = V::fma(wq, xv, dot);
        weight_dot = weight_dot + wq;
        if (++in_block == kLaneSumBlock) {
          dot_sums.add(dot);
          weight_dot_sums.add(weight_dot);
          dot = weight_dot = zero;
          in_block = 0;
        }
      }
      dot_sums.add(dot);
      weight_dot_sums.add(weight_dot);
      // Scalar tail: padding lanes would add eps / C to weight_dot.
      for (; i < n; ++i) {
        const acc xi = to_acc(x[i]);
        acc wq = to_acc(tq[i]) * one_minus_eps + eps_over_c;
        if (w) wq *= w[i];
        tail_max = xi > tail_max ? xi : (xi != xi ? xi : tail_max);
        tail_dot += wq * xi;
        tail_weight_dot += wq;
      }
    } else {  // index targets with smoothing: dot = sum w x
      for (; i + W <= n; i += W) {
        const V xv = V::load(x + i);
        m0 = V::max(m0, xv);
        dot = w ? V::fma(V::load(w + i), xv, dot) : dot + xv;
      }
      if (i < n) {
        const V xv = load_partial<V>(x + i, n - i, 0);
        m0 = V::max(m0, load_partial<V>(x + i, n - i, -static_cast<acc>(kInf)));
        dot = w ? V::fma(load_partial<V>(w + i, n - i, 0), xv, dot) : dot + xv;
      }
    }
    acc m = V::max(V::max(m0, m1), V::max(m2, m3)).reduce_max();
    if (tail_max > m || tail_max != tail_max) m = tail_max;

    RowPartial p;
    p.max = m;
    p.sum_exp = chunk_exp_sum(x, n, m, prefetch_ahead_of(x, n));
    if (tq) {
      p.dot = dot_sums.total() + tail_dot;
      p.weight_dot = weight_dot_sums.total() + tail_weight_dot;
    } else {
      p.dot = static_cast<double>(dot.reduce_add()) + tail_dot;
      p.weight_dot = static_cast<double>(weight_dot.reduce_add()) + tail_weight_dot;
    }
    return p;
  }

  // The partial of a chunk on the hot path (no dots).
  static RowPartial max_only_partial(acc m, acc sum_exp) {
    RowPartial p;
    p.max = m;
    p.sum_exp = sum_exp;
    p.dot = p.weight_dot = 0;
    return p;
  }

  // The running max of pass 1, four independent accumulators fed in pairs (simd/memory.h). Pass 1 and the exp
  // pass that carries the next row's max (chunk_exp_sum<true>) feed it in the same order: same max, bits
  // included (NaN lanes too: maxps keeps its second operand).
  struct MaxAccumulator {
    static constexpr int W = V::kWidth;
    V m0, m1, m2, m3;
    MaxAccumulator() : m0(V::set1(-static_cast<acc>(kInf))), m1(m0), m2(m0), m3(m0) {}
    void add_4w(const T* p) {
      V a0, b0, a1, b1;
      load_pair(p, a0, b0);
      load_pair(p + 2 * W, a1, b1);
      m0 = V::max(m0, a0);
      m1 = V::max(m1, b0);
      m2 = V::max(m2, a1);
      m3 = V::max(m3, b1);
    }
    void add_w(const T* p) { m0 = V::max(m0, V::load(p)); }
    void add_partial(const T* p, int64_t k) { m0 = V::max(m0, load_partial<V>(p, k, -static_cast<acc>(kInf))); }
    acc result() const { return V::max(V::max(m0, m1), V::max(m2, m3)).reduce_max(); }
  };

  // Pass 1 of the hot path (index targets, no smoothing): the max of x[0, n).
  static acc chunk_max(const T* x, int64_t n) {
    constexpr int W = V::kWidth;
    MaxAccumulator mx;
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) mx.add_4w(x + i);
    for (; i + W <= n; i += W) mx.add_w(x + i);
    if (i < n) mx.add_partial(x + i, n - i);
    return mx.result();
  }

  // What pass 2 of the chunk x[0, n) prefetches (see chunk_exp_sum): the next chunk of a long row, or,
  // for rows shorter than kStreamPrefetchBytes, the logits that far ahead (the next row, 320 bytes away
  // at C = 80, would arrive too late).
  static const T* prefetch_ahead_of(const T* x, int64_t n) {
    return n * static_cast<int64_t>(sizeof(T)) >= kStreamPrefetchBytes
               ? x + n
               : x + kStreamPrefetchBytes / static_cast<int64_t>(sizeof(T));
  }

  // Pass 2: sum exp(x - m) over x[0, n), m the chunk's max, re-reading the chunk from L1 (exp_shift: 0
  // in place of m == -inf).
  // While the exponentials run from L1, n elements from `ahead` on are prefetched for the max pass that
  // reads them next (otherwise a pure memory stall). Prefetches past the end of the row or the tensor are
  // harmless: they never fault.
  // With kNextMax, the loop also runs pass 1 of `next`, the next row of the same length, into *next_max:
  // its loads then overlap these exponentials, where a separate pass 1 would wait for them alone (the
  // forward op at 4096 x 1000 float32, logits in L3, about 15% faster).
  // With `e` (not null), the exponentials exp(x - m) are also stored there, padded_to_vectors<V>(n) of
  // them, in the lanes order of the loop (pairs as load_pair puts them, padding lanes 0):
  // grad_row_from_exps reads them back in the same order.
  template <bool kNextMax = false>
  static acc chunk_exp_sum(const T* x, int64_t n, acc m, const T* ahead, const T* next = nullptr,
                           acc* next_max = nullptr, acc* e = nullptr) {
    constexpr int W = V::kWidth;
    const V mv = V::set1(exp_shift(m));
    const V zero = V::set1(0);
    V s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    [[maybe_unused]] MaxAccumulator nx;
    int64_t i = 0;
    constexpr int64_t kLineElems = 64 / sizeof(T);
    for (; i + 4 * W <= n; i += 4 * W) {
      for (int64_t l = 0; l < 4 * W; l += kLineElems) prefetch(ahead + i + l);
      if constexpr (kNextMax) nx.add_4w(next + i);
      V a0, b0, a1, b1;
      load_pair(x + i, a0, b0);
      load_pair(x + i + 2 * W, a1, b1);
      const V e0 = V::exp(a0 - mv), e1 = V::exp(b0 - mv), e2 = V::exp(a1 - mv), e3 = V::exp(b1 - mv);
      if (e) {
        V::store(e + i, e0);
        V::store(e + i + W, e1);
        V::store(e + i + 2 * W, e2);
        V::store(e + i + 3 * W, e3);
      }
      s0 = s0 + e0;
      s1 = s1 + e1;
      s2 = s2 + e2;
      s3 = s3 + e3;
    }
    for (; i + W <= n; i += W) {
      if (i % kLineElems == 0) prefetch(ahead + i);
      if constexpr (kNextMax) nx.add_w(next + i);
      const V ev = V::exp(V::load(x + i) - mv);
      if (e) V::store(e + i, ev);
      s0 = s0 + ev;
    }
    if (i < n) {
      prefetch(ahead + i);
      if constexpr (kNextMax) nx.add_partial(next + i, n - i);
      const V ev = V::exp(load_partial<V>(x + i, n - i, -static_cast<acc>(kInf)) - mv);
      if (e) V::store(e + i, ev);
      s0 = s0 + ev;
    }
    if constexpr (kNextMax) *next_max = nx.result();
    return ((s0 + s1) + (s2 + s3)).reduce_add();
  }

  // What the exponentials of a chunk with max m are taken relative to: m itself, or 0 when m == -inf
  // (every term is then exp(-inf) = 0, or NaN from NaN logits, which must survive).
  static acc exp_shift(acc m) { return m == -static_cast<acc>(kInf) ? acc(0) : m; }

  static RowPartial row_chunk(const SoftmaxLossArgs& a, int64_t row, int64_t chunk) {
    const int64_t c0 = chunk * kChunk;
    const int64_t n = a.C - c0 < kChunk ? a.C - c0 : kChunk;
    return chunk_partial(a, logits_row(a, row) + c0, a.prob_target ? target_row(a, row) + c0 : nullptr, c0, n);
  }

  // The loss of a non-ignored row from its merged partial and its lse.
  static void finish(const SoftmaxLossArgs& a, const Coefficients<acc>& coef, int64_t row, const RowPartial& p,
                     double lse) {
    acc* lse_out = static_cast<acc*>(a.lse);
    acc* loss_out = static_cast<acc*>(a.loss);
    lse_out[row] = static_cast<acc>(lse);
    if (a.prob_target) {
      loss_out[row] = static_cast<acc>(lse * p.weight_dot - p.dot);
    } else {
      const int64_t t = a.target[row];
      const double x_t = to_acc(logits_row(a, row)[t]);
      loss_out[row] = static_cast<acc>(coef.index_loss(lse, x_t, t, p.dot));
    }
  }

  // Ignored positions are not read at all: loss 0, lse 0 (their gradient is 0 whatever lse is).
  static void finish_ignored(const SoftmaxLossArgs& a, int64_t row) {
    static_cast<acc*>(a.lse)[row] = 0;
    static_cast<acc*>(a.loss)[row] = 0;
  }

  // Rows are finished in blocks of kLseRows so that the logs of their sums vectorize.
  static constexpr int kLseRows = 16;

  // The exponentials exp(x - shift) of up to kLseRows rows of one chunk (chunk_exp_sum's `e`, in its lanes
  // order), with each row's shift and sum: what the fused kernel's forward_rows keeps for grad_block.
  struct KeptExps {
    acc* e;          // row i at e + i * stride
    int64_t stride;  // padded_to_vectors<V>(C)
    acc shift[kLseRows], sum[kLseRows];
    acc* row(int64_t i) const { return e + i * stride; }
    void keep(int64_t i, acc row_shift, acc row_sum) {
      shift[i] = row_shift;
      sum[i] = row_sum;
    }
  };

  // Finishes rows [r0, r0 + rows), rows <= kLseRows, from their merged partials (those of ignored rows are
  // not read). lse = max + log(sum_exp): every path computes a row's lse here, with the row in some lane
  // of the same loop, so it does not depend on how rows are grouped or split over threads.
  static void finish_block(const SoftmaxLossArgs& a, const Coefficients<acc>& coef, int64_t r0, int64_t rows,
                           const RowPartial* part) {
    bool skip[kLseRows];
    double max[kLseRows], sum[kLseRows], lse[kLseRows];
    for (int i = 0; i < kLseRows; ++i) {
      skip[i] = i >= rows || ignored(a, r0 + i);
      max[i] = skip[i] ? 0.0 : part[i].max;
      sum[i] = skip[i] ? 1.0 : part[i].sum_exp;
    }
    if constexpr (sizeof(acc) == sizeof(double)) {
      for (int i = 0; i < kLseRows; ++i) lse[i] = max[i] + __builtin_log(sum[i]);
    } else {
      double log_sum[kLseRows];
      for (int i = 0; i < kLseRows; ++i) log_sum[i] = log_of_exp_sum(sum[i]);
      // sum_exp is in [1, C] unless the row is all -inf (0: lse -inf) or holds a NaN (NaN).
      for (int i = 0; i < kLseRows; ++i)
        lse[i] = max[i] + (sum[i] > 0 ? log_sum[i] : (sum[i] == 0 ? -kInf : sum[i]));
    }
    for (int64_t i = 0; i < rows; ++i) {
      if (skip[i]) finish_ignored(a, r0 + i);
      else finish(a, coef, r0 + i, part[i], lse[i]);
    }
  }

  static int64_t num_chunks(const SoftmaxLossArgs& a) { return (a.C + kChunk - 1) / kChunk; }

  // Whether forward_rows takes the maxes of a block's rows first: the hot path (index targets, no
  // smoothing) with the block's logits small enough to be read again from L1 (C up to 512 fp32). The
  // horizontal reductions of the rows' maxes then overlap one another, where each row's exp pass would
  // otherwise wait for its own: at C = 80 they are a large part of a row's work. Same arithmetic per row.
  static bool maxes_first(const SoftmaxLossArgs& a) {
    constexpr int64_t kMaxesFirstBytes = int64_t(32) << 10;
    return hot_path(a) && a.C * static_cast<int64_t>(sizeof(T)) * kLseRows <= kMaxesFirstBytes;
  }

  // With `kept` (keeps_exps(a) must hold; at most kLseRows rows), each non-ignored row's exponentials, their
  // shift and their sum are also kept there (KeptExps): the fused kernel computes the gradient from them.
  static void forward_rows(const SoftmaxLossArgs& a, int64_t row_begin, int64_t row_end, KeptExps* kept = nullptr) {
    const int64_t chunks = num_chunks(a);
    const Coefficients<acc> coef(a);
    RowPartial part[kLseRows];
    if (maxes_first(a)) {
      // Row i's exp pass also takes the max of row i of the next block (chunk_exp_sum<true>), so only the
      // range's first block runs a pass 1 of its own, and prefetches for the block after that: two blocks,
      // at least kStreamPrefetchBytes, ahead.
      const int64_t block_elems = kLseRows * a.C;
      const int64_t far = kStreamPrefetchBytes / static_cast<int64_t>(sizeof(T));
      const int64_t ahead = 2 * block_elems > far ? 2 * block_elems : far;
      acc m[kLseRows];
      bool carried[kLseRows] = {};
      for (int64_t r0 = row_begin; r0 < row_end; r0 += kLseRows) {
        const int64_t rows = row_end - r0 < kLseRows ? row_end - r0 : kLseRows;
        for (int64_t i = 0; i < rows; ++i)
          if (!carried[i] && !ignored(a, r0 + i)) m[i] = chunk_max(logits_row(a, r0 + i), a.C);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t next = r0 + kLseRows + i;
          const bool carry = next < row_end && !ignored(a, next);
          if (!ignored(a, r0 + i)) {
            const T* x = logits_row(a, r0 + i);
            acc next_max = 0;
            acc* e = kept ? kept->row(r0 + i - row_begin) : nullptr;
            const acc sum_exp = carry ? chunk_exp_sum<true>(x, a.C, m[i], x + ahead, logits_row(a, next), &next_max, e)
                                      : chunk_exp_sum(x, a.C, m[i], x + ahead, nullptr, nullptr, e);
            if (kept) kept->keep(r0 + i - row_begin, exp_shift(m[i]), sum_exp);
            part[i] = max_only_partial(m[i], sum_exp);
            if (carry) m[i] = next_max;
            carried[i] = carry;
          } else {
            carried[i] = false;
          }
        }
        finish_block(a, coef, r0, rows, part);
      }
      return;
    }
    if (chunks == 1 && hot_path(a)) {
      // The hot path's rows of one chunk, software-pipelined: each row's exp pass also takes the max of the
      // next row (chunk_exp_sum<true>), so only the first row of the range waits for a pass 1 of its own.
      int64_t carried_row = -1;
      acc carried_max = 0;
      for (int64_t r0 = row_begin; r0 < row_end; r0 += kLseRows) {
        const int64_t rows = row_end - r0 < kLseRows ? row_end - r0 : kLseRows;
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = r0 + i;
          if (ignored(a, row)) continue;
          const T* x = logits_row(a, row);
          const acc m = carried_row == row ? carried_max : chunk_max(x, a.C);
          const T* ahead = prefetch_ahead_of(x, a.C);
          acc* e = kept ? kept->row(row - row_begin) : nullptr;
          acc sum_exp;
          if (row + 1 < row_end && !ignored(a, row + 1)) {
            sum_exp = chunk_exp_sum<true>(x, a.C, m, ahead, logits_row(a, row + 1), &carried_max, e);
            carried_row = row + 1;
          } else {
            sum_exp = chunk_exp_sum(x, a.C, m, ahead, nullptr, nullptr, e);
          }
          if (kept) kept->keep(row - row_begin, exp_shift(m), sum_exp);
          part[i] = max_only_partial(m, sum_exp);
        }
        finish_block(a, coef, r0, rows, part);
      }
      return;
    }
    for (int64_t r0 = row_begin; r0 < row_end; r0 += kLseRows) {
      const int64_t rows = row_end - r0 < kLseRows ? row_end - r0 : kLseRows;
      for (int64_t i = 0; i < rows; ++i) {
        if (ignored(a, r0 + i)) continue;
        part[i] = row_chunk(a, r0 + i, 0);
        for (int64_t k = 1; k < chunks; ++k) merge_partial(part[i], row_chunk(a, r0 + i, k));
      }
      finish_block(a, coef, r0, rows, part);
    }
  }

  static void forward_row_partials(const SoftmaxLossArgs& a, int64_t row, int64_t k0, int64_t k1, RowPartial* out) {
    for (int64_t k = k0; k < k1; ++k) out[k - k0] = row_chunk(a, row, k);
  }

  static void forward_row_finish(const SoftmaxLossArgs& a, int64_t row, const RowPartial* partials, int64_t n) {
    RowPartial merged = partials[0];
    if (!ignored(a, row))
      for (int64_t k = 1; k < n; ++k) merge_partial(merged, partials[k]);
    finish_block(a, Coefficients<acc>(a), row, 1, &merged);
  }

  // sum_c w_c q_c of a probability-target row, in chunks merged in order like the forward's.
  static double prob_weight_dot(const SoftmaxLossArgs& a, int64_t row) {
    constexpr int W = V::kWidth;
    const T* tq = target_row(a, row);
    const acc* w = static_cast<const acc*>(a.weight);
    const acc ome = static_cast<acc>(1.0 - a.label_smoothing);
    const acc eoc = static_cast<acc>(a.label_smoothing / static_cast<double>(a.C));
    double total = 0;
    for (int64_t c0 = 0; c0 < a.C; c0 += kChunk) {
      const int64_t c1 = a.C - c0 < kChunk ? a.C : c0 + kChunk;
      V sum = V::set1(0);
      acc tail = 0;
      int64_t c = c0;
      for (; c + W <= c1; c += W) {
        V wq = V::fma(V::load(tq + c), V::set1(ome), V::set1(eoc));
        sum = sum + (w ? wq * V::load(w + c) : wq);
      }
      for (; c < c1; ++c) tail += (to_acc(tq[c]) * ome + eoc) * (w ? w[c] : acc(1));
      total += static_cast<double>(sum.reduce_add()) + tail;
    }
    return total;
  }

  // Writes g[c] = grad_of(x[c], w[c]) for c in [c0, c1) (w[c] = 1 without weight). With `stream` the
  // aligned body uses non-temporal stores (the caller fences).
  template <class F>
  static void write_row(T* g, const T* x, const acc* w, int64_t c0, int64_t c1, bool stream, F&& grad_of) {
    constexpr int W = V::kWidth;
    const V one = V::set1(1);
    int64_t c = c0;
    // Writes the gradient of [c, c + n), n < W.
    auto partial = [&](int64_t n) {
      store_partial(g + c, n, grad_of(load_partial<V>(x + c, n, 0), w ? load_partial<V>(w + c, n, 0) : one));
      c += n;
    };
    // Pairs of vectors (simd/memory.h): the weights are loaded in the same lane order as the logits.
    auto pair_grad = [&](V& ga, V& gb) {
      V xa, xb, wa = one, wb = one;
      load_pair(x + c, xa, xb);
      if (w) load_pair_as<T>(w + c, wa, wb);
      ga = grad_of(xa, wa);
      gb = grad_of(xb, wb);
    };
    if (stream) {
      // Head up to the pair alignment with ordinary stores, then non-temporal pairs.
      constexpr int64_t kAlignElems = kPairAlign / sizeof(T) > 0 ? kPairAlign / sizeof(T) : 1;
      const int64_t misaligned = static_cast<int64_t>((reinterpret_cast<uintptr_t>(g + c) / sizeof(T)) % kAlignElems);
      int64_t head = misaligned == 0 ? 0 : kAlignElems - misaligned;
      if (head > c1 - c) head = c1 - c;
      for (; head >= W; head -= W, c += W) V::store(g + c, grad_of(V::load(x + c), w ? V::load(w + c) : one));
      if (head > 0) partial(head);
      for (; c + 2 * W <= c1; c += 2 * W) {
        V ga, gb;
        pair_grad(ga, gb);
        stream_pair(g + c, ga, gb);
      }
    } else {
      for (; c + 2 * W <= c1; c += 2 * W) {
        V ga, gb;
        pair_grad(ga, gb);
        store_pair(g + c, ga, gb);
      }
    }
    if (c + W <= c1) {
      V::store(g + c, grad_of(V::load(x + c), w ? V::load(w + c) : one));
      c += W;
    }
    if (c < c1) partial(c1 - c);
  }

  // Note [Short rows' gradient]: rows of at most kFusedStageBytes (fused_rows_fit) are written in blocks
  // of fused_block_rows rows (grad_block), by the backward op as by the fused kernel. With a.stream_grad
  // (set by the host only when the gradient rows are contiguous) a block goes through a staging buffer in
  // L1 and is copied out with whole-line non-temporal stores; streaming from the exp loop instead leaves
  // a short row's partial lines to ordinary stores, and the mix took five times as long at C = 80. Both
  // ops thus write every gradient element through the same out-of-line function with ordinary stores
  // (backward_row, or grad_row_from_exps for the hot path's rows of one chunk), so the compiler's fma
  // contraction cannot differ between them. Longer rows stream from the exp loop when a.stream_grad.
  // Classes [c0, c1) of rows [row_begin, row_end).
  static void backward_rows(const SoftmaxLossArgs& a, int64_t row_begin, int64_t row_end, int64_t c0, int64_t c1) {
    const Coefficients<acc> coef(a);
    if (fused_rows_fit(a.C, sizeof(T)) && c0 == 0 && c1 == a.C) {
      alignas(64) T stage[kFusedStageBytes / sizeof(T)];
      const int64_t block = fused_block_rows(a.C);
      for (int64_t r0 = row_begin; r0 < row_end; r0 += block)
        grad_block(a, coef, r0, row_end - r0 < block ? row_end - r0 : block, stage);
    } else {
      for (int64_t row = row_begin; row < row_end; ++row)
        backward_row(a, coef, row, grad_row(a, row), c0, c1, a.stream_grad);
    }
    if (a.stream_grad) stream_fence();
  }
  static void backward_rows(const SoftmaxLossArgs& a, int64_t row_begin, int64_t row_end) {
    backward_rows(a, row_begin, row_end, 0, a.C);
  }
  static void backward_row_classes(const SoftmaxLossArgs& a, int64_t row, int64_t c0, int64_t c1) {
    backward_rows(a, row, row + 1, c0, c1);
  }

  // The gradient rows [r0, r0 + rows) of short rows (Note [Short rows' gradient]); `stage` holds
  // kFusedStageBytes. The caller fences. When keeps_exps(a), non-ignored rows take grad_row_from_exps, from
  // the exponentials the fused kernel's forward kept (`kept`) or, for the backward op (kept null), from
  // exponentials it recomputes.
  static void grad_block(const SoftmaxLossArgs& a, const Coefficients<acc>& coef, int64_t r0, int64_t rows, T* stage,
                         const KeptExps* kept = nullptr) {
    const bool from_exps = keeps_exps(a);
    for (int64_t i = 0; i < rows; ++i) {
      T* g = a.stream_grad ? stage + i * a.C : grad_row(a, r0 + i);
      if (!from_exps || ignored(a, r0 + i)) {
        backward_row(a, coef, r0 + i, g, 0, a.C, false);
      } else if (kept) {
        grad_row_from_exps(a, coef, r0 + i, g, kept->row(i), kept->shift[i], kept->sum[i]);
      } else {
        // The forward's exp pass again, the same function on the same row: the same exponentials and sum.
        alignas(64) acc e[kFusedStageBytes / sizeof(T) + V::kWidth];
        const T* x = logits_row(a, r0 + i);
        const acc m = chunk_max(x, a.C);
        const acc sum = chunk_exp_sum(x, a.C, m, prefetch_ahead_of(x, a.C), nullptr, nullptr, e);
        grad_row_from_exps(a, coef, r0 + i, g, e, exp_shift(m), sum);
      }
    }
    if (a.stream_grad) stream_copy(grad_row(a, r0), stage, rows * a.C * static_cast<int64_t>(sizeof(T)));
  }

  // Whether short rows' gradients are computed from their exponentials and their sum (grad_row_from_exps):
  // the hot path with rows of one chunk, whose exponentials forward_rows can keep.
  static bool keeps_exps(const SoftmaxLossArgs& a) { return hot_path(a) && num_chunks(a) == 1; }

  // The gradient row of a non-ignored hot-path short row (keeps_exps), from the row's exponentials
  // e_j = exp(x_j - m) (chunk_exp_sum's lanes order) and their sum:
  //   g_j = k e_j,  k = s w_t / sum           (s w_t: backward_row's s * index_softmax_coef(t), no smoothing)
  //   g_t = s (w_t p_t - w_t),  p_t = exp(x_t - m) / sum.
  // The softmax is taken from the sum itself rather than from lse: lse is rounded to float, and at logits
  // of magnitude L that rounding (up to half an ulp of L, 5e-4 at 1e4) would be a relative error of every p.
  // The fused kernel passes the exponentials its forward kept and takes one exp per logit instead of two;
  // the backward op recomputes them with the forward's own exp pass, so both ops write the same bits.
  // Out of line, as backward_row (Note [Short rows' gradient]).
  __attribute__((noinline)) static void grad_row_from_exps(const SoftmaxLossArgs& a, const Coefficients<acc>& coef,
                                                           int64_t row, T* g, const acc* e, acc m, acc sum) {
    constexpr int W = V::kWidth;
    const int64_t C = a.C;
    const int64_t t = a.target[row];
    const double s = grad_scale<acc>(a, row);
    const double swt = s * coef.index_softmax_coef(t);
    const V k = V::set1(static_cast<acc>(swt / static_cast<double>(sum)));
    int64_t i = 0;
    for (; i + 4 * W <= C; i += 4 * W) {
      store_pair(g + i, k * V::load(e + i), k * V::load(e + i + W));
      store_pair(g + i + 2 * W, k * V::load(e + i + 2 * W), k * V::load(e + i + 3 * W));
    }
    for (; i + W <= C; i += W) V::store(g + i, k * V::load(e + i));
    if (i < C) store_partial(g + i, C - i, k * V::load(e + i));
    const double p_t =
        static_cast<double>(scalar_exp(static_cast<acc>(to_acc(logits_row(a, row)[t]) - m))) / static_cast<double>(sum);
    from_acc(g + t, static_cast<acc>(s * (coef.index_softmax_coef(t) * p_t - coef.target_term(t))));
  }

  // The gradient of classes [c0, c1) of one row into g (that row's gradient, or a staging buffer), with
  // non-temporal stores in the body when `stream`. Out of line: one compiled copy serves the backward op
  // and the fused kernel (Note [Short rows' gradient]).
  __attribute__((noinline)) static void backward_row(const SoftmaxLossArgs& a, const Coefficients<acc>& coef,
                                                     int64_t row, T* g, int64_t c0, int64_t c1, bool stream) {
    constexpr int W = V::kWidth;
    const acc* lse_in = static_cast<const acc*>(a.lse_in);
    const acc* w = coef.weight;
    const T* x = logits_row(a, row);
    const double s = grad_scale<acc>(a, row);
    const V lse = V::set1(lse_in[row]);
    int64_t c = c0;
    if (a.prob_target) {
      // grad_j = s * (softmax_j * sum(w q) - w_j q_j)
      const T* tq = target_row(a, row);
      const V soft_coef = V::set1(static_cast<acc>(s * prob_weight_dot(a, row)));
      const V s_ome = V::set1(static_cast<acc>(s * (1.0 - coef.eps)));
      const V s_eoc = V::set1(static_cast<acc>(s * coef.eps_over_c));
      auto grad_of = [&](V xv, V tv, V wv) { return soft_coef * V::exp(xv - lse) - V::fma(tv, s_ome, s_eoc) * wv; };
      for (; c + W <= c1; c += W)
        V::store(g + c, grad_of(V::load(x + c), V::load(tq + c), w ? V::load(w + c) : V::set1(1)));
      if (c < c1)
        store_partial(g + c, c1 - c,
                      grad_of(load_partial<V>(x + c, c1 - c, 0), load_partial<V>(tq + c, c1 - c, 0),
                              w ? load_partial<V>(w + c, c1 - c, 0) : V::set1(1)));
      return;
    }
    const int64_t t = a.target[row];
    if (t == a.ignore_index) {
      const V zero = V::set1(0);
      for (; c + W <= c1; c += W) V::store(g + c, zero);
      if (c < c1) store_partial(g + c, c1 - c, zero);
      return;
    }
    // grad_j = soft_coef * softmax_j - smooth_j, then the target element is recomputed exactly.
    const V soft_coef = V::set1(static_cast<acc>(s * coef.index_softmax_coef(t)));
    const acc smooth = static_cast<acc>(s * coef.eps_over_c);
    if (smooth == 0) {
      write_row(g, x, nullptr, c0, c1, stream, [&](V xv, V) { return soft_coef * V::exp(xv - lse); });
    } else {
      const V sv = V::set1(smooth);
      write_row(g, x, w, c0, c1, stream, [&](V xv, V wv) { return soft_coef * V::exp(xv - lse) - sv * wv; });
    }
    if (t >= c0 && t < c1) {
      const acc p_t = scalar_exp(static_cast<acc>(to_acc(x[t]) - lse_in[row]));
      const double g_t = s * (coef.index_softmax_coef(t) * p_t - coef.target_term(t));
      from_acc(g + t, static_cast<acc>(g_t));
    }
  }

  // Rows of the fused kernel's blocks: as many as keep their logits and their gradient in L1 together
  // (each within kFusedStageBytes), at most kLseRows (forward_rows' block), at least one.
  static int64_t fused_block_rows(int64_t C) {
    const int64_t row_bytes = C * static_cast<int64_t>(sizeof(T));
    const int64_t rows = kFusedStageBytes / (row_bytes > 0 ? row_bytes : 1);
    return rows < 1 ? 1 : (rows > kLseRows ? kLseRows : rows);
  }

  // The fused forward + gradient (Note [Fused gradient], xent/_fused.py) of short rows (fused_rows_fit):
  // per block of fused_block_rows rows, forward_rows and then grad_block on the same rows while their
  // logits are in L1. The same kernels as the separate ops, so the same bits.
  static void forward_grad_rows(const SoftmaxLossArgs& a, int64_t row_begin, int64_t row_end) {
    alignas(64) T stage[kFusedStageBytes / sizeof(T)];
    // The block's exponentials when keeps_exps(a): its logits fit kFusedStageBytes, each row padded to
    // whole vectors.
    alignas(64) acc exps[kFusedStageBytes / sizeof(T) + kLseRows * V::kWidth];
    KeptExps kept{exps, padded_to_vectors<V>(a.C), {}, {}};
    KeptExps* keep = keeps_exps(a) ? &kept : nullptr;
    const Coefficients<acc> coef(a);
    const int64_t block = fused_block_rows(a.C);
    for (int64_t r0 = row_begin; r0 < row_end; r0 += block) {
      const int64_t rows = row_end - r0 < block ? row_end - r0 : block;
      forward_rows(a, r0, r0 + rows, keep);
      grad_block(a, coef, r0, rows, stage, keep);
    }
    if (a.stream_grad) stream_fence();
  }
};

// ---------------------------------------------------------------------------------------------------
// Lanes layout: the spatial stride is 1; vector lanes hold W consecutive positions of one batch row n and
// the kernel walks the classes with stride stride_c. Each lane's arithmetic is independent of its
// neighbours, so a position's result does not depend on how positions are grouped into vectors.

template <class T>
struct CrossEntropyLanes : SoftmaxLanes<T> {
  using Base = SoftmaxLanes<T>;
  using typename Base::V;
  using typename Base::acc;
  using Base::W;
  using Base::load_lanes;

  // ---- Tiles of up to W positions: probability targets (and C > 2^24) ----

  static void forward_tiles(const SoftmaxLossArgs& a, int64_t p_begin, int64_t p_end) {
    const Coefficients<acc> coef(a);
    const acc* w = coef.weight;
    acc* lse_out = static_cast<acc*>(a.lse);
    acc* loss_out = static_cast<acc*>(a.loss);
    const bool prob = a.prob_target != nullptr;
    const bool want_dot = prob || a.label_smoothing > 0;
    Base::for_each_tile(a, p_begin, p_end, [&](const typename Base::Tile& tile) {
      const auto& [n, s, lanes, x, tq, g] = tile;
      V m = V::set1(-static_cast<acc>(kInf));
      // Per-lane sums in double over blocks of classes (LaneSums): sum w q x (index targets: sum w x),
      // sum w q, sum exp(x - m).
      LaneSums<V> dot, weight_dot;
      const V ome = V::set1(static_cast<acc>(1.0 - coef.eps)), eoc = V::set1(static_cast<acc>(coef.eps_over_c));
      for_each_class_block(a.C, [&](int64_t c0, int64_t c1) {
        V dot_part = V::set1(0), weight_dot_part = V::set1(0);
        for (int64_t c = c0; c < c1; ++c) {
          const V xv = load_lanes(x + c * a.stride_c, lanes);
          m = V::max(m, xv);
          if (!want_dot) continue;
          const V wc = V::set1(w ? w[c] : acc(1));
          if (prob) {
            const V wq = V::fma(load_lanes(tq + c * a.target_stride_c, lanes), ome, eoc) * wc;
            dot_part = V::fma(wq, xv, dot_part);
            weight_dot_part = weight_dot_part + wq;
          } else {
            dot_part = V::fma(wc, xv, dot_part);
          }
        }
        if (!want_dot) return;
        dot.add(dot_part);
        weight_dot.add(weight_dot_part);
      });
      const LaneSums<V> sum = Base::exp_sums(a, x, lanes, m);
      acc mb[W];
      V::store(mb, m);
      for (int64_t i = 0; i < lanes; ++i) {
        const int64_t p = n * a.S + s + i;
        if (!prob && a.target[p] == a.ignore_index) {
          lse_out[p] = 0;
          loss_out[p] = 0;
          continue;
        }
        const double lse = static_cast<double>(mb[i]) + __builtin_log(sum.v[i]);
        lse_out[p] = static_cast<acc>(lse);
        if (prob) {
          loss_out[p] = static_cast<acc>(lse * weight_dot.v[i] - dot.v[i]);
        } else {
          const int64_t t = a.target[p];
          loss_out[p] = static_cast<acc>(coef.index_loss(lse, to_acc(x[t * a.stride_c + i]), t, dot.v[i]));
        }
      }
    });
  }

  static void backward_tiles(const SoftmaxLossArgs& a, int64_t p_begin, int64_t p_end) {
    const Coefficients<acc> coef(a);
    const acc* w = coef.weight;
    const acc* lse_in = static_cast<const acc*>(a.lse_in);
    const bool prob = a.prob_target != nullptr;
    Base::for_each_tile(a, p_begin, p_end, [&](const typename Base::Tile& tile) {
      const auto& [n, s, lanes, x, tq, g] = tile;
      // Per-lane coefficients: grad = soft_coef * exp(x - lse) - scale * w_c * (eps / C  or  q_c).
      acc soft[W], scale[W], lse[W];
      for (int i = 0; i < W; ++i) soft[i] = scale[i] = lse[i] = 0;
      const V ome = V::set1(static_cast<acc>(1.0 - coef.eps)), eoc = V::set1(static_cast<acc>(coef.eps_over_c));
      LaneSums<V> weight_dot;  // sum w q, as forward_tiles sums it
      if (prob) {
        weight_dot = sum_over_class_blocks<V>(a.C, [&](int64_t c0, int64_t c1) {
          V part = V::set1(0);
          for (int64_t c = c0; c < c1; ++c)
            part = part + V::fma(load_lanes(tq + c * a.target_stride_c, lanes), ome, eoc) * V::set1(w ? w[c] : acc(1));
          return part;
        });
      }
      for (int64_t i = 0; i < lanes; ++i) {
        const int64_t p = n * a.S + s + i;
        const double sc = grad_scale<acc>(a, p);
        scale[i] = static_cast<acc>(sc);
        lse[i] = lse_in[p];
        if (prob) soft[i] = static_cast<acc>(sc * weight_dot.v[i]);
        else if (a.target[p] != a.ignore_index) soft[i] = static_cast<acc>(sc * coef.index_softmax_coef(a.target[p]));
      }
      const V soft_v = V::load(soft), scale_v = V::load(scale), lse_v = V::load(lse);
      const V smooth_v = scale_v * eoc;
      for (int64_t c = 0; c < a.C; ++c) {
        const V wc = V::set1(w ? w[c] : acc(1));
        V out = soft_v * V::exp(load_lanes(x + c * a.stride_c, lanes) - lse_v);
        if (prob) out = out - scale_v * V::fma(load_lanes(tq + c * a.target_stride_c, lanes), ome, eoc) * wc;
        else if (coef.eps > 0) out = out - smooth_v * wc;
        if (lanes == W) V::store(g + c * a.grad_stride_c, out);
        else store_partial(g + c * a.grad_stride_c, lanes, out);
      }
      if (prob) return;
      // Class-index fix-ups per lane: zero the ignored positions, recompute the target element.
      for (int64_t i = 0; i < lanes; ++i) {
        const int64_t t = a.target[n * a.S + s + i];
        if (t == a.ignore_index) {
          for (int64_t c = 0; c < a.C; ++c) from_acc(g + c * a.grad_stride_c + i, acc(0));
          continue;
        }
        const acc p_t = scalar_exp(static_cast<acc>(to_acc(x[t * a.stride_c + i]) - lse[i]));
        const double sc = scale[i];
        const double g_t = sc * (coef.index_softmax_coef(t) * static_cast<double>(p_t) - coef.target_term(t));
        from_acc(g + t * a.grad_stride_c + i, static_cast<acc>(g_t));
      }
    });
  }

  // ---- Class-index targets: blocks of positions (the common case, e.g. segmentation logits) ----
  //
  // A block is NV vectors of W consecutive positions of one batch row, walked together along the classes:
  // NV independent dependency chains, and NV * W contiguous logits per class (several whole cache lines per
  // class stream, which the hardware prefetcher follows far better than C streams of one vector each; 8
  // vectors measured faster than 4 or 16, and software prefetching of the next block slower than none).
  // The exponentials re-read the block from L1. The target element, the ignored positions and the
  // log-sum-exp are handled with vector selects and a vector log rather than a scalar fix-up per position.
  // Each lane's arithmetic is the same whatever block it falls in.
  static constexpr int kBlockVecs = 8;

  // Class indices are compared as floats: exact for C <= 2^24 (larger C takes the tile path).
  static bool index_blocks(const SoftmaxLossArgs& a) { return !a.prob_target && a.C <= (int64_t(1) << 24); }

  // Calls f.template operator()<NV>(n, s, lanes) over the blocks covering [p_begin, p_end): blocks of
  // kBlockVecs full vectors, then single vectors (the last one with `lanes` < W lanes).
  template <class F>
  static void for_each_block(const SoftmaxLossArgs& a, int64_t p_begin, int64_t p_end, F&& f) {
    int64_t p = p_begin;
    while (p < p_end) {
      const int64_t n = p / a.S;
      int64_t s = p % a.S;
      const int64_t s_end = a.S - s < p_end - p ? a.S : s + (p_end - p);
      for (; s + kBlockVecs * W <= s_end; s += kBlockVecs * W) f.template operator()<kBlockVecs>(n, s, int64_t(W));
      for (; s < s_end; s += W) f.template operator()<1>(n, s, s_end - s < W ? s_end - s : int64_t(W));
      p = n * a.S + s_end;
    }
  }

  // Loads vector j of a block (the last of NV has `lanes` lanes).
  template <int NV>
  static V load_block(const T* p, int j, int64_t lanes) {
    return (j == NV - 1 && lanes < W) ? load_partial<V>(p + j * W, lanes, 0) : V::load(p + j * W);
  }

  // Loads the NV vectors of one class row of a block: in pairs (simd/memory.h) when NV is even (full vectors),
  // else one by one (the last with `lanes` lanes).
  template <int NV>
  static void load_block_row(const T* xc, int64_t lanes, V* out) {
    if constexpr (NV % 2 == 0) {
      for (int j = 0; j < NV; j += 2) load_pair(xc + j * W, out[j], out[j + 1]);
    } else {
      for (int j = 0; j < NV; ++j) out[j] = load_block<NV>(xc, j, lanes);
    }
  }
  // Per-lane values of a block (kLanes = NV * W, in position order) to and from the lane order of
  // load_block_row.
  template <int NV>
  static void load_lanes(const acc* buf, V* out) {
    if constexpr (NV % 2 == 0) {
      for (int j = 0; j < NV; j += 2) load_pair_as<T>(buf + j * W, out[j], out[j + 1]);
    } else {
      for (int j = 0; j < NV; ++j) out[j] = V::load(buf + j * W);
    }
  }
  template <int NV>
  static void store_lanes(acc* dst, int64_t lanes, const V* v) {
    if constexpr (NV % 2 == 0) {
      for (int j = 0; j < NV; j += 2) store_pair_as<T>(dst + j * W, v[j], v[j + 1]);
    } else {
      for (int j = 0; j < NV; ++j) {
        if (j == NV - 1 && lanes < W) store_partial(dst + j * W, lanes, v[j]);
        else V::store(dst + j * W, v[j]);
      }
    }
  }

  template <int NV>
  static void forward_index_block(const SoftmaxLossArgs& a, const Coefficients<acc>& coef, int64_t n, int64_t s,
                                  int64_t lanes) {
    constexpr int kLanes = NV * W;
    const T* x = Base::tile_logits(a, n, s);
    const acc* w = coef.weight;
    const bool smoothing = coef.eps > 0;
    const V neg_inf = V::set1(-static_cast<acc>(kInf)), zero = V::set1(0);
    V m[NV], sum[NV], dot[NV], xv[NV];
    for (int j = 0; j < NV; ++j) m[j] = neg_inf, sum[j] = zero, dot[j] = zero;
    for (int64_t c = 0; c < a.C; ++c) {
      load_block_row<NV>(x + c * a.stride_c, lanes, xv);
      for (int j = 0; j < NV; ++j) {
        m[j] = V::max(m[j], xv[j]);
        if (smoothing) dot[j] = V::fma(V::set1(w ? w[c] : acc(1)), xv[j], dot[j]);
      }
    }
    // See CrossEntropyRows::chunk_partial, pass 2: a max of -inf is replaced by 0.
    V mv[NV];
    for (int j = 0; j < NV; ++j) mv[j] = vselect(veq(m[j], neg_inf), zero, m[j]);
    for (int64_t c = 0; c < a.C; ++c) {
      load_block_row<NV>(x + c * a.stride_c, lanes, xv);
      for (int j = 0; j < NV; ++j) sum[j] = sum[j] + V::exp(xv[j] - mv[j]);
    }
    // Per lane: the target logit, its weight, and whether the position counts (1) or is ignored (0).
    const int64_t p0 = n * a.S + s;
    const int64_t count = (NV - 1) * W + lanes;
    acc x_t_b[kLanes], w_t_b[kLanes], keep_b[kLanes];
    for (int i = 0; i < kLanes; ++i) x_t_b[i] = 0, w_t_b[i] = 0, keep_b[i] = 0;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t t = a.target[p0 + i];
      if (t == a.ignore_index) continue;
      keep_b[i] = 1;
      x_t_b[i] = to_acc(x[t * a.stride_c + i]);
      w_t_b[i] = w ? w[t] : acc(1);
    }
    V x_t[NV], w_t[NV], keep[NV], log_sum[NV], lse[NV], loss[NV];
    load_lanes<NV>(x_t_b, x_t);
    load_lanes<NV>(w_t_b, w_t);
    load_lanes<NV>(keep_b, keep);
    // lse = max + log(sum); the loss as w_t ((max - x_t) + log(sum)): two non-negative terms, so a small
    // loss (x_t close to lse) keeps its relative accuracy.
    for (int j = 0; j < NV; ++j) {
      log_sum[j] = vlog(sum[j]);
      loss[j] = w_t[j] * ((m[j] - x_t[j]) + log_sum[j]);
    }
    if (smoothing) {  // the general formula per lane, in double
      acc mb[kLanes], lb[kLanes], db[kLanes];
      store_lanes<NV>(mb, W, m);
      store_lanes<NV>(lb, W, log_sum);
      store_lanes<NV>(db, W, dot);
      for (int64_t i = 0; i < count; ++i) {
        if (keep_b[i] == 0) continue;
        const double lse_i = static_cast<double>(mb[i]) + static_cast<double>(lb[i]);
        lb[i] = static_cast<acc>(coef.index_loss(lse_i, x_t_b[i], a.target[p0 + i], db[i]));
      }
      load_lanes<NV>(lb, loss);
    }
    for (int j = 0; j < NV; ++j) {  // ignored positions: lse 0, loss 0
      const auto kept = veq(keep[j], V::set1(1));
      lse[j] = vselect(kept, m[j] + log_sum[j], zero);
      loss[j] = vselect(kept, loss[j], zero);
    }
    store_lanes<NV>(static_cast<acc*>(a.lse) + p0, lanes, lse);
    store_lanes<NV>(static_cast<acc*>(a.loss) + p0, lanes, loss);
  }

  // grad_c = soft * exp(x_c - lse) - (c == t ? target_term : smooth w_c), zero at ignored positions, with
  // soft, target_term and smooth per lane as in CrossEntropyRows::backward_rows.
  template <int NV>
  static void backward_index_block(const SoftmaxLossArgs& a, const Coefficients<acc>& coef, int64_t n, int64_t s,
                                   int64_t lanes) {
    const T* x = Base::tile_logits(a, n, s);
    T* g = Base::tile_grad(a, n, s);
    const acc* w = coef.weight;
    const acc* lse_in = static_cast<const acc*>(a.lse_in);
    const bool smoothing = coef.eps > 0;
    const V zero = V::set1(0), eoc = V::set1(static_cast<acc>(coef.eps_over_c));
    // Per lane of the block: lse, soft, target term, target class (-1 when ignored), scale, kept (1 or 0).
    constexpr int kLanes = NV * W;
    acc lse_b[kLanes], soft_b[kLanes], term_b[kLanes], class_b[kLanes], scale_b[kLanes], keep_b[kLanes];
    for (int i = 0; i < kLanes; ++i) lse_b[i] = soft_b[i] = term_b[i] = scale_b[i] = keep_b[i] = 0, class_b[i] = -1;
    const int64_t p0 = n * a.S + s;
    for (int64_t i = 0; i < (NV - 1) * W + lanes; ++i) {
      const int64_t p = p0 + i;
      const double sc = grad_scale<acc>(a, p);
      scale_b[i] = static_cast<acc>(sc);
      lse_b[i] = lse_in[p];
      const int64_t t = a.target[p];
      if (t == a.ignore_index) continue;
      keep_b[i] = 1;
      class_b[i] = static_cast<acc>(t);
      soft_b[i] = static_cast<acc>(sc * coef.index_softmax_coef(t));
      term_b[i] = static_cast<acc>(sc * coef.target_term(t));
    }
    // A block of an even number of (full) vectors is processed in pairs (simd/memory.h), whose lane order the
    // per-lane values follow (load_pair_as); a single vector as is.
    constexpr bool kPairs = NV % 2 == 0;
    V lse[NV], soft[NV], target_term[NV], target_class[NV], smooth[NV], keep[NV];
    load_lanes<NV>(lse_b, lse);
    load_lanes<NV>(soft_b, soft);
    load_lanes<NV>(term_b, target_term);
    load_lanes<NV>(class_b, target_class);
    load_lanes<NV>(scale_b, smooth);
    load_lanes<NV>(keep_b, keep);
    decltype(veq(zero, zero)) kept[NV];
    for (int j = 0; j < NV; ++j) smooth[j] = smooth[j] * eoc, kept[j] = veq(keep[j], V::set1(1));
    // Non-temporal stores when every vector of the block starts a cache line (or half of one, for 16-bit types,
    // the other half following at once).
    const bool stream = a.stream_grad && reinterpret_cast<uintptr_t>(g) % 64 == 0 &&
                        (a.grad_stride_c * static_cast<int64_t>(sizeof(T))) % 64 == 0 && (W * sizeof(T)) % 32 == 0;
    for (int64_t c = 0; c < a.C; ++c) {
      const T* xc = x + c * a.stride_c;
      T* gc = g + c * a.grad_stride_c;
      const V cv = V::set1(static_cast<acc>(c));
      const V wc = V::set1(w ? w[c] : acc(1));
      auto grad_of = [&](V xv, int j) {
        const V other = smoothing ? smooth[j] * wc : zero;
        const V out = soft[j] * V::exp(xv - lse[j]);
        return vselect(kept[j], out - vselect(veq(target_class[j], cv), target_term[j], other), zero);
      };
      if constexpr (kPairs) {
        V xv[NV];
        load_block_row<NV>(xc, lanes, xv);
        for (int j = 0; j < NV; j += 2) {
          const V ga = grad_of(xv[j], j), gb = grad_of(xv[j + 1], j + 1);
          if (stream) stream_pair(gc + j * W, ga, gb);
          else store_pair(gc + j * W, ga, gb);
        }
      } else {
        for (int j = 0; j < NV; ++j) {
          const V out = grad_of(load_block<NV>(xc, j, lanes), j);
          if (j == NV - 1 && lanes < W) store_partial(gc + j * W, lanes, out);
          else if (stream) V::stream(gc + j * W, out);
          else V::store(gc + j * W, out);
        }
      }
    }
  }

  static void forward(const SoftmaxLossArgs& a, int64_t p_begin, int64_t p_end) {
    if (!index_blocks(a)) return forward_tiles(a, p_begin, p_end);
    const Coefficients<acc> coef(a);
    for_each_block(a, p_begin, p_end, [&]<int NV>(int64_t n, int64_t s, int64_t lanes) {
      forward_index_block<NV>(a, coef, n, s, lanes);
    });
  }

  static void backward(const SoftmaxLossArgs& a, int64_t p_begin, int64_t p_end) {
    if (!index_blocks(a)) return backward_tiles(a, p_begin, p_end);
    const Coefficients<acc> coef(a);
    for_each_block(a, p_begin, p_end, [&]<int NV>(int64_t n, int64_t s, int64_t lanes) {
      backward_index_block<NV>(a, coef, n, s, lanes);
    });
    if (a.stream_grad) stream_fence();
  }
};

constexpr SoftmaxLossKernels kCrossEntropyKernels = softmax_loss_kernels<CrossEntropyRows, CrossEntropyLanes>();

} // namespace
} // namespace xent::cpu
