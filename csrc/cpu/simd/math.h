// Vectorized math of the CPU kernels beyond VecF's exp: log of an exp sum, log, log1p, pow, with their
// accuracy (Note [Per-ISA headers] in vec.h).
#pragma once

#include "cpu/simd/vec.h"

namespace xent::cpu {
namespace {

inline float scalar_exp(float x) { return __builtin_expf(x); }
inline double scalar_exp(double x) { return __builtin_exp(x); }

// log v in double for the lse of float rows, v = sum_c exp(x_c - max) in [1, C] (the callers handle the
// other values v takes: 0 for an all -inf row, NaN). v = 2^e m with m in [sqrt(1/2), sqrt(2)],
// log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, by its series up to s^13 (relative error
// about 1e-12, far below the float rounding of lse that follows). Branch-free code on one lane, so that
// a loop over a block of rows vectorizes: a libm call per row was a third of the softmax focal forward's
// time at C = 80, and a fifth of cross-entropy's.
inline double log_of_exp_sum(double v) {
  uint64_t bits;
  __builtin_memcpy(&bits, &v, sizeof bits);
  // m = v / 2^e: v's mantissa bits under exponent 0, or under exponent -1 (e one more) when they are
  // those of sqrt(2) (0x6a09e667f3bcd) or more; integer arithmetic and selects only.
  const uint64_t high = ((bits & 0x000fffffffffffffULL) > 0x6a09e667f3bccULL) ? 1 : 0;
  const int64_t e = static_cast<int64_t>(bits >> 52) - 1023 + static_cast<int64_t>(high);
  bits = (bits & 0x000fffffffffffffULL) | ((0x3ffULL - high) << 52);
  double m;
  __builtin_memcpy(&m, &bits, sizeof m);
  const double s = (m - 1) / (m + 1), s2 = s * s;
  double series = 1.0 / 13;
  series = series * s2 + 1.0 / 11;
  series = series * s2 + 1.0 / 9;
  series = series * s2 + 1.0 / 7;
  series = series * s2 + 1.0 / 5;
  series = series * s2 + 1.0 / 3;
  series = series * s2 + 1.0;
  const double r = static_cast<double>(e) * 0.6931471805599453 + 2 * s * series;
  return r;  // garbage for v 0 or NaN: the callers replace those
}

// Cephes' logf (S. L. Moshier): x = 2^e (1 + f) with f in [sqrt(1/2) - 1, sqrt(2) - 1],
// log(1 + f) = f - f^2 / 2 + f^3 P(f), e ln2 added in two parts (ln2 = kLn2Hi + kLn2Lo, see exp). Peak
// relative error 7.6e-8 (about 1.3 ulp) over the positive floats; no cancellation near x = 1, where the
// result is f - f^2/2 + ... with f = x - 1 exact.
constexpr float kLogP0 = 7.0376836292e-2f;
constexpr float kLogP1 = -1.1514610310e-1f;
constexpr float kLogP2 = 1.1676998740e-1f;
constexpr float kLogP3 = -1.2420140846e-1f;
constexpr float kLogP4 = 1.4249322787e-1f;
constexpr float kLogP5 = -1.6668057665e-1f;
constexpr float kLogP6 = 2.0000714765e-1f;
constexpr float kLogP7 = -2.4999993993e-1f;
constexpr float kLogP8 = 3.3333331174e-1f;
constexpr float kSqrt2 = 1.41421356237f;

#if defined(XENT_CPU_ISA_AVX512)

// x = 2^e m with m in [1, 2): getexp/getmant, which also normalize subnormals. Meaningful for positive
// finite x only; vlog fixes up the rest.
inline void vfrexp(VecF x, VecF& m, VecF& e) {
  m = {_mm512_getmant_ps(x.v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero)};
  e = {_mm512_getexp_ps(x.v)};
}

#elif defined(XENT_CPU_ISA_AVX2)

inline void vfrexp(VecF x, VecF& m, VecF& e) {
  const __m256 subnormal = _mm256_cmp_ps(x.v, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  const __m256 xs = _mm256_blendv_ps(x.v, _mm256_mul_ps(x.v, _mm256_set1_ps(8388608.0f)), subnormal);
  const __m256i bits = _mm256_castps_si256(xs);
  const __m256i biased = _mm256_srli_epi32(bits, 23);
  e = {_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(biased, _mm256_set1_epi32(127))),
                     _mm256_and_ps(subnormal, _mm256_set1_ps(23.0f)))};
  m = {_mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)))};
}

#else  // XENT_CPU_ISA_GENERIC

inline void vfrexp(VecF x, VecF& m, VecF& e) {
  float xs = x.v;
  float adjust = 0.0f;
  if (xs < 1.17549435e-38f) {
    xs *= 8388608.0f;
    adjust = 23.0f;
  }
  uint32_t bits;
  std::memcpy(&bits, &xs, 4);
  e = {static_cast<float>(static_cast<int32_t>(bits >> 23) - 127) - adjust};
  const uint32_t mb = (bits & 0x007fffffu) | 0x3f800000u;
  std::memcpy(&m.v, &mb, 4);
}


#endif

// log(x) for positive normal or subnormal, finite x (no special cases): see kLogP0.
inline VecF vlog_positive(VecF x) {
  VecF m, e;
  vfrexp(x, m, e);
  const MaskF big = vlt(VecF::set1(kSqrt2), m);  // fold m in (sqrt2, 2) to m / 2 in (sqrt(1/2), 1)
  m = vselect(big, m * VecF::set1(0.5f), m);
  e = vselect(big, e + VecF::set1(1.0f), e);
  const VecF f = m - VecF::set1(1.0f);  // exact (Sterbenz)
  const VecF z = f * f;
  VecF p = VecF::set1(kLogP0);
  p = VecF::fma(p, f, VecF::set1(kLogP1));
  p = VecF::fma(p, f, VecF::set1(kLogP2));
  p = VecF::fma(p, f, VecF::set1(kLogP3));
  p = VecF::fma(p, f, VecF::set1(kLogP4));
  p = VecF::fma(p, f, VecF::set1(kLogP5));
  p = VecF::fma(p, f, VecF::set1(kLogP6));
  p = VecF::fma(p, f, VecF::set1(kLogP7));
  p = VecF::fma(p, f, VecF::set1(kLogP8));
  VecF y = p * z * f;
  y = VecF::fma(e, VecF::set1(kLn2Lo), y);
  y = VecF::fma(z, VecF::set1(-0.5f), y);
  return VecF::fma(e, VecF::set1(kLn2Hi), f + y);
}

// log(x) for every float, with C's special values: log(+-0) = -inf, log(x < 0) = NaN, log(inf) = inf,
// NaN stays NaN. Accuracy as kLogP0 (subnormals included).
inline VecF vlog(VecF x) {
  const VecF zero = VecF::set1(0.0f), inf = VecF::set1(__builtin_inff());
  VecF r = vlog_positive(x);
  r = vselect(veq(x, zero), VecF::set1(-__builtin_inff()), r);
  r = vselect(vlt(x, zero), VecF::set1(__builtin_nanf("")), r);
  r = vselect(veq(x, inf), inf, r);
  return vselect(visnan(x), x, r);
}

// log(1 + a) for every float. u = 1 + a is rounded; log(u) + (a - (u - 1)) / u adds back the rounding
// error a - (u - 1), which u - 1 (exact by Sterbenz for u in [1/2, 2], and the error is 0 outside) makes
// computable: about 2 ulp, also for tiny |a| where log(u) alone would lose every digit (the correction is
// then most of the result, so its reciprocal must be accurate: vrecip, not a bare rcp). log1p(-1) = -inf,
// log1p(inf) = inf, log1p(a < -1) = NaN.
inline VecF vlog1p(VecF a) {
  const VecF one = VecF::set1(1.0f);
  const VecF u = one + a;
  VecF r = vlog(u) + (a - (u - one)) * vrecip(u);
  r = vselect(veq(u, VecF::set1(0.0f)), VecF::set1(-__builtin_inff()), r);
  return vselect(veq(a, VecF::set1(__builtin_inff())), a, r);
}

// log(1 + e) for e in [0, 1] (softplus(-|x|) with e = exp(-|x|)), without a log: log1p(e) = 2 atanh(s),
// s = e / (2 + e) in [0, 1/3], atanh(s) = s (1 + t/3 + t^2/5 + ... + t^6/13) with t = s^2 <= 1/9 (the
// truncation error t^7 / 15 < 1.5e-8 relative). About 3 ulp, the error of s itself; no cancellation, also
// for tiny e (the result is then s ~ e / 2 doubled). NaN stays NaN. Half the work of vlog1p.
inline VecF vlog1p_unit(VecF e) {
  const VecF s = e * vrecip(VecF::set1(2.0f) + e);
  const VecF t = s * s;
  VecF p = VecF::set1(1.0f / 13.0f);
  p = VecF::fma(p, t, VecF::set1(1.0f / 11.0f));
  p = VecF::fma(p, t, VecF::set1(1.0f / 9.0f));
  p = VecF::fma(p, t, VecF::set1(1.0f / 7.0f));
  p = VecF::fma(p, t, VecF::set1(1.0f / 5.0f));
  p = VecF::fma(p, t, VecF::set1(1.0f / 3.0f));
  const VecF s2 = s + s;
  return VecF::fma(s2 * t, p, s2);  // 2s + 2s t P(t): the leading term added last, exactly
}

// m^g = exp(g log m) for a non-integer g (integer powers are products, see binary_loss_kernels_impl.h). The
// relative error is about (|g log m| + 2) ulp: log's error is scaled by g log m. pow(0, g) = 0 for g > 0
// and inf for g < 0; a negative m gives NaN, as C's pow for a non-integer exponent.
inline VecF vpow(VecF m, float g) {
  const VecF t = VecF::set1(g) * vlog(m);
  const VecF inf = VecF::set1(__builtin_inff());
  return vselect(veq(t, inf), inf, VecF::exp(t));  // VecF::exp saturates below inf at x > 88.7
}

// log(1 + e) for e in [0, 1], as vlog1p_unit, by one polynomial: e P(e), P of degree 9 fitted (weighted
// least squares, P(0) = 1 exactly) to log1p(e) / e on [0, 1], whose nearest singularity (e = -1) is far
// enough for 9 terms to reach float precision. About 1.5 ulp measured (4M points, e log-uniform down to
// 1e-30 and uniform on [0, 1]; vlog1p_unit: about 3), relative also for tiny e (P(e) -> 1). Ten fmas and
// no reciprocal, where vlog1p_unit needs a reciprocal, a Newton step and eleven more operations: the
// with-logits and focal kernels spend a fifth of their work here. NaN stays NaN.
inline VecF vlog1p_unit_poly(VecF e) {
  VecF p = VecF::set1(-3.413882805e-03f);
  p = VecF::fma(p, e, VecF::set1(2.063083649e-02f));
  p = VecF::fma(p, e, VecF::set1(-5.845631287e-02f));
  p = VecF::fma(p, e, VecF::set1(1.075965166e-01f));
  p = VecF::fma(p, e, VecF::set1(-1.540122777e-01f));
  p = VecF::fma(p, e, VecF::set1(1.971087754e-01f));
  p = VecF::fma(p, e, VecF::set1(-2.496147901e-01f));
  p = VecF::fma(p, e, VecF::set1(3.333077133e-01f));
  p = VecF::fma(p, e, VecF::set1(-4.999994040e-01f));
  p = VecF::fma(p, e, VecF::set1(1.0f));
  return p * e;
}


// float64: libm, so float64 results (and gradcheck) keep full precision.
inline VecD1 vlog(VecD1 x) { return {__builtin_log(x.v)}; }
inline VecD1 vlog1p(VecD1 a) { return {__builtin_log1p(a.v)}; }
inline VecD1 vlog1p_unit(VecD1 e) { return {__builtin_log1p(e.v)}; }
inline VecD1 vpow(VecD1 m, double g) { return {__builtin_pow(m.v, g)}; }
inline VecD1 vlog1p_unit_poly(VecD1 e) { return {__builtin_log1p(e.v)}; }

} // namespace
} // namespace xent::cpu
