// A minimal SIMD layer for the CPU kernels: one float vector type per instruction set, with the loads and
// stores of every logits dtype and a fast exp. Included only by the per-ISA kernel files, after they
// select the instruction set (XENT_CPU_ISA_AVX512 / XENT_CPU_ISA_AVX2 / XENT_CPU_ISA_GENERIC), and
// everything here has internal linkage (see csrc/cpu/kernels.h on the ODR hazard).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(XENT_CPU_ISA_AVX512) || defined(XENT_CPU_ISA_AVX2)
#include <immintrin.h>
#endif

namespace xent::cpu {
namespace {

// Storage types of 16-bit logits: raw bits, converted to float in registers.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

// ---- Scalar conversions (tails, the generic ISA, and scalar fix-ups) ----

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN -> quiet NaN: the same rounding as c10::BFloat16.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f != f) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  uint32_t u;
  if (exponent == 0x1f) {
    u = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent == 0) {
    if (mantissa == 0) {
      u = sign;
    } else {  // subnormal half: normalize
      int e = -1;
      do { ++e; mantissa <<= 1; } while ((mantissa & 0x400) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mantissa & 0x3ff) << 13;
    }
  } else {
    u = sign | (exponent + 127 - 15) << 23 | mantissa << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, like the F16C instruction and c10::Half.
inline uint16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  u &= 0x7fffffff;
  if (u >= 0x7f800000) return sign | (u > 0x7f800000 ? 0x7e00 : 0x7c00);  // NaN / inf
  if (u >= 0x477ff000) return sign | 0x7c00;  // rounds to >= 65520: overflow to inf
  if (u < 0x38800000) {  // below the smallest normal half: subnormal or zero
    if (u < 0x33000000) return sign;  // < 2^-25 rounds to 0
    const uint32_t e = u >> 23;
    const uint32_t m = (u & 0x7fffff) | 0x800000;
    const uint32_t shift = 126 - e;  // 14 + (113 - e)
    uint32_t half_m = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half_m & 1))) ++half_m;
    return sign | static_cast<uint16_t>(half_m);
  }
  uint32_t r = u - 0x38000000;  // rebias exponent 127 -> 15
  r += 0xfff + ((r >> 13) & 1);
  return sign | static_cast<uint16_t>(r >> 13);
}

// Element <-> accumulation type (float, or double for float64 logits).
inline double to_acc(double x) { return x; }
inline float to_acc(float x) { return x; }
inline float to_acc(bf16_t x) { return bf16_to_float(x.bits); }
inline float to_acc(f16_t x) { return f16_to_float(x.bits); }
inline void from_acc(double* p, double v) { *p = v; }
inline void from_acc(float* p, float v) { *p = v; }
inline void from_acc(bf16_t* p, float v) { p->bits = float_to_bf16(v); }
inline void from_acc(f16_t* p, float v) { p->bits = float_to_f16(v); }

// exp on [-inf, 88]: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6 polynomial
// 1 + r (1 + r (c2 + r (c3 + r (c4 + r (c5 + r c6))))), its first two coefficients fixed to 1 and the
// others fitted for minimax relative error on [-ln2/2, ln2/2] by scripts/fit_exp_polynomial.py (3e-9, far
// below float's rounding; the float result is within 0.65 ulp of exp over every float in [-87.3, 88]).
// exp(0) is exactly 1 (r = 0, n = 0), which the online log-sum-exp relies on: the running sum is rescaled
// by exp(m_old - m_new), and that factor must be exactly 1 when the max did not change.
//
// Results below the smallest normal float (x < -87.33654, exp(x) < 1.18e-38) are 0, on every ISA. Producing
// a subnormal (or underflowing to 0 from one) costs x86 cores a microcode assist, about 150 cycles for
// each vector that holds one: exp(-inf) computed that way made rows with -inf-masked logits, and the masked
// tail of every row whose length is not a multiple of the vector width, 10 to 30 times slower per vector.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpC2 = 4.9999994040e-01f;
constexpr float kExpC3 = 1.6666521132e-01f;
constexpr float kExpC4 = 4.1668392718e-02f;
constexpr float kExpC5 = 8.3687454462e-03f;
constexpr float kExpC6 = 1.3814534759e-03f;
constexpr float kExpMin = -87.33654f;  // exp(kExpMin) and its computed value are normal floats (r > 0)

// exp(r) for the reduced argument |r| <= ln2/2 (the polynomial above), for every ISA's VecF.
template <class V>
inline V exp_reduced(V r) {
  V p = V::fma(V::set1(kExpC6), r, V::set1(kExpC5));
  p = V::fma(p, r, V::set1(kExpC4));
  p = V::fma(p, r, V::set1(kExpC3));
  p = V::fma(p, r, V::set1(kExpC2));
  const V one = V::set1(1.0f);
  return V::fma(V::fma(p, r, one), r, one);
}

#if defined(XENT_CPU_ISA_AVX512)

#if defined(XENT_CPU_AVX512_BF16)
// Whether v holds a NaN or a subnormal. vcvtneps2bf16 / vcvtne2ps2bf16 round to nearest even in one
// instruction, but treat subnormal inputs as zero and keep a NaN's sign and payload, where float_to_bf16
// (and PyTorch) keep bf16 subnormals and give 0x7fc0: such vectors (rare: an output below 1.2e-38, or
// NaN) take the integer rounding, so the bits are the same on every path.
inline bool bf16_convert_unsafe(__m512 v) {
  constexpr int kNanOrSubnormal = 0x01 | 0x20 | 0x80;  // vfpclassps: QNaN, denormal, SNaN
  return _mm512_fpclass_ps_mask(v, kNanOrSubnormal) != 0;
}
#endif

struct VecF {
  using scalar = float;
  static constexpr int kWidth = 16;
  __m512 v;
  static VecF set1(float x) { return {_mm512_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VecF load(const bf16_t* p) {
    __m512i i = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(i, 16))};
  }
  static VecF load(const f16_t* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  // The first n <= 16 elements at p, `fill` in the other lanes (row tails; see load_partial below). A
  // masked load reads nothing past p + n, so it cannot fault at the end of a buffer.
  static __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  static VecF load_first(const float* p, int64_t n, float fill) {
    return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_lanes(n), p)};
  }
  static VecF load_first(const bf16_t* p, int64_t n, float fill) {
    const __mmask16 k = first_lanes(n);
    __m512i i = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return {_mm512_mask_blend_ps(k, _mm512_set1_ps(fill), _mm512_castsi512_ps(_mm512_slli_epi32(i, 16)))};
  }
  static VecF load_first(const f16_t* p, int64_t n, float fill) {
    const __mmask16 k = first_lanes(n);
    return {_mm512_mask_blend_ps(k, _mm512_set1_ps(fill), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)))};
  }
  static void store_first(float* p, int64_t n, VecF x) { _mm512_mask_storeu_ps(p, first_lanes(n), x.v); }
  static void store(float* p, VecF x) { _mm512_storeu_ps(p, x.v); }
  static void store(bf16_t* p, VecF x) {
#if defined(XENT_CPU_AVX512_BF16)
    if (!bf16_convert_unsafe(x.v)) {  // else the integer rounding below
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x.v));
      return;
    }
#endif
    __m512i u = _mm512_castps_si512(x.v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static void store(f16_t* p, VecF x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
  }
  // Non-temporal stores (p aligned to the vector's bytes) for outputs too large to stay in cache: no read
  // for ownership, one third less memory traffic. Callers end with stream_fence().
  static void stream(float* p, VecF x) { _mm512_stream_ps(p, x.v); }
  template <class T>
  static void stream(T* p, VecF x) {
    alignas(32) T buf[kWidth];
    store(buf, x);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_load_si256(reinterpret_cast<const __m256i*>(buf)));
  }
  static VecF fma(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  // NaN in `b` propagates (maxps returns its second operand when either is NaN).
  static VecF max(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  static VecF exp(VecF x) {
    // Lanes below kExpMin are computed at kExpMin (a normal result, no assist) and zeroed by the masked
    // scalef; a NaN input stays NaN (second operand of max, kept by the unordered compare).
    const __m512 lo = _mm512_set1_ps(kExpMin);
    const __mmask16 normal = _mm512_cmp_ps_mask(x.v, lo, _CMP_NLT_UQ);
    __m512 xc = _mm512_max_ps(lo, x.v);
    xc = _mm512_min_ps(_mm512_set1_ps(88.7f), xc);
    // n = round(x log2e) by adding and removing 1.5 * 2^23 (the fma rounds to an integer): two uops where
    // roundscale after a mul takes three.
    const __m512 shifter = _mm512_set1_ps(12582912.0f);
    __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(kLog2e), shifter), shifter);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    return {_mm512_maskz_scalef_ps(normal, exp_reduced(VecF{r}).v, n)};
  }
};
inline VecF operator+(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }

#elif defined(XENT_CPU_ISA_AVX2)

struct VecF {
  using scalar = float;
  static constexpr int kWidth = 8;
  __m256 v;
  static VecF set1(float x) { return {_mm256_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecF load(const bf16_t* p) {
    __m256i i = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(i, 16))};
  }
  static VecF load(const f16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static void store(float* p, VecF x) { _mm256_storeu_ps(p, x.v); }
  static void store(bf16_t* p, VecF x) {
    __m256i u = _mm256_castps_si256(x.v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    // Values are <= 0xffff, so the unsigned-saturating pack is exact; packing the two 128-bit halves
    // keeps the element order.
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static void store(f16_t* p, VecF x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void stream(float* p, VecF x) { _mm256_stream_ps(p, x.v); }
  template <class T>
  static void stream(T* p, VecF x) {
    alignas(16) T buf[kWidth];
    store(buf, x);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  static VecF fma(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static VecF max(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static VecF exp(VecF x) {
    // No scalef on AVX2: build 2^n in the exponent bits, so clamp to the normal range and flush results
    // below exp(-87.33) (the smallest normal float) to 0. NaN stays NaN (second operand of max/min).
    const __m256 lo = _mm256_set1_ps(kExpMin);
    __m256 xc = _mm256_max_ps(lo, x.v);
    xc = _mm256_min_ps(_mm256_set1_ps(88.72283f), xc);  // exp(88.72283) is FLT_MAX
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 y = exp_reduced(VecF{r}).v;
    // 2^n as 2^(n - k) * 2^k with k = 1 for n > 0 and k = -1 otherwise, so both factors stay normal for
    // n in [-126, 128] (n = -126 must not become the exponent field 0, n = 128 not inf).
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i positive = _mm256_cmpgt_epi32(ni, _mm256_setzero_si256());
    const __m256i k = _mm256_blendv_epi8(_mm256_set1_epi32(-1), _mm256_set1_epi32(1), positive);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, k), _mm256_set1_epi32(127)), 23);
    const __m256 two_k = _mm256_blendv_ps(_mm256_set1_ps(0.5f), _mm256_set1_ps(2.0f), _mm256_castsi256_ps(positive));
    y = _mm256_mul_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), two_k);
    __m256 underflow = _mm256_cmp_ps(x.v, lo, _CMP_LT_OQ);
    return {_mm256_andnot_ps(underflow, y)};
  }
};
inline VecF operator+(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }

#else  // XENT_CPU_ISA_GENERIC: one lane, portable C++ (non-x86 targets or x86-64 without AVX2).

struct VecF {
  using scalar = float;
  static constexpr int kWidth = 1;
  float v;
  static VecF set1(float x) { return {x}; }
  template <class T>
  static VecF load(const T* p) { return {to_acc(*p)}; }
  template <class T>
  static void store(T* p, VecF x) { from_acc(p, x.v); }
  template <class T>
  static void stream(T* p, VecF x) { from_acc(p, x.v); }
  static VecF fma(VecF a, VecF b, VecF c) { return {a.v * b.v + c.v}; }
  static VecF max(VecF a, VecF b) { return {a.v > b.v ? a.v : b.v}; }  // maxps semantics
  float reduce_add() const { return v; }
  float reduce_max() const { return v; }
  static VecF exp(VecF x) {
    float xc = x.v;
    if (xc != xc) return x;
    if (xc < kExpMin) return {0.0f};
    if (xc > 88.72283f) return {__builtin_inff()};
    const float n = __builtin_nearbyintf(xc * kLog2e);
    float r = xc - n * kLn2Hi;
    r = r - n * kLn2Lo;
    const float y = exp_reduced(VecF{r}).v;
    // 2^n in two halves so that n = 128 (results just below FLT_MAX) does not overflow the exponent.
    const int ni = static_cast<int>(n);
    const int half = ni / 2;
    uint32_t b1 = static_cast<uint32_t>(half + 127) << 23, b2 = static_cast<uint32_t>(ni - half + 127) << 23;
    float s1, s2;
    std::memcpy(&s1, &b1, 4);
    std::memcpy(&s2, &b2, 4);
    return {y * s1 * s2};
  }
};
inline VecF operator+(VecF a, VecF b) { return {a.v + b.v}; }
inline VecF operator-(VecF a, VecF b) { return {a.v - b.v}; }
inline VecF operator*(VecF a, VecF b) { return {a.v * b.v}; }

#endif

// float64 logits: one lane, libm's exp, so float64 results (and gradcheck) keep full precision.
struct VecD1 {
  using scalar = double;
  static constexpr int kWidth = 1;
  double v;
  static VecD1 set1(double x) { return {x}; }
  static VecD1 load(const double* p) { return {*p}; }
  static void store(double* p, VecD1 x) { *p = x.v; }
  static void stream(double* p, VecD1 x) { *p = x.v; }
  static VecD1 fma(VecD1 a, VecD1 b, VecD1 c) { return {a.v * b.v + c.v}; }
  static VecD1 max(VecD1 a, VecD1 b) { return {a.v > b.v ? a.v : b.v}; }  // maxps semantics
  double reduce_add() const { return v; }
  double reduce_max() const { return v; }
  static VecD1 exp(VecD1 x) { return {__builtin_exp(x.v)}; }
};
inline VecD1 operator+(VecD1 a, VecD1 b) { return {a.v + b.v}; }
inline VecD1 operator-(VecD1 a, VecD1 b) { return {a.v - b.v}; }
inline VecD1 operator*(VecD1 a, VecD1 b) { return {a.v * b.v}; }

inline void stream_fence() {
#if defined(XENT_CPU_ISA_AVX512) || defined(XENT_CPU_ISA_AVX2)
  _mm_sfence();
#endif
}

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

inline void prefetch(const void* p) { __builtin_prefetch(p); }

// How far ahead of its reads a kernel that streams an operand from memory prefetches it. The hardware
// prefetcher alone leaves these kernels waiting on DRAM when their input is not in cache (a training step
// runs the model's own work between loss calls): it restarts at every 4 KiB page and is slow to ramp up
// for a stream it sees interleaved with two others. Prefetching 8 KiB ahead measured (2026-12-04, 2
// threads, eager PyTorch's fwd+bwd run between calls, bench_losses.py's round robin) BCE fwd+bwd at 65536 x
// 80 fp32 3.0 ms against 5.9 ms, bf16 2.7-2.9 against 4.2 ms, 4096 x 1000 fp32 2.4 against 3.4 ms;
// 4 and 16 KiB measured the same as 8 within noise.
constexpr int64_t kStreamPrefetchBytes = 8192;

// Prefetches the line kStreamPrefetchBytes past p (never faults, also past the end of an array).
template <class T>
inline void prefetch_ahead(const T* p) {
  prefetch(reinterpret_cast<const char*>(p) + kStreamPrefetchBytes);
}

// The element offset of position `row` = (n, s), n = row / S, s = row % S, in an (N, C, S) view with
// strides stride_n, stride_s. The kernels of short rows take it several times per row; for an (N, C)
// input (S == 1) it needs no 64-bit division, which made softmax focal's fused kernel at 65536 x 80 7-9%
// faster (fp32 and bf16, one thread, same process).
inline int64_t position_offset(int64_t row, int64_t S, int64_t stride_n, int64_t stride_s) {
  if (S == 1) return row * stride_n;
  return (row / S) * stride_n + (row % S) * stride_s;
}

// Sums over the classes of the lanes layout (one position per lane, C terms each; also the lanes of a
// row's probability-target dot products in the rows layout, C / kWidth terms each). A running float sum
// of equal-sized terms drifts by about C eps / 2 relative (w q for uniform probability targets:
// cross-entropy's loss at C = 5000 was off by 6e-4, eager's by 1e-7). So the kernels sum kLaneSumBlock
// classes per lane in a vector, then add each block's partial to a double per lane. The blocks are fixed,
// so results do not depend on the tiling or the thread count.
constexpr int64_t kLaneSumBlock = 32;

template <class V>
struct LaneSums {
  double v[V::kWidth] = {};
  void add(V partial) {
    typename V::scalar b[V::kWidth];
    V::store(b, partial);
    for (int i = 0; i < V::kWidth; ++i) v[i] += static_cast<double>(b[i]);
  }
  double total() const {  // the lanes' sum, in lane order
    double t = 0;
    for (int i = 0; i < V::kWidth; ++i) t += v[i];
    return t;
  }
};

// Calls f(c0, c1) for the fixed blocks [c0, c1) of kLaneSumBlock classes of [0, C), in order.
template <class F>
inline void for_each_class_block(int64_t C, F&& f) {
  for (int64_t c0 = 0; c0 < C; c0 += kLaneSumBlock) f(c0, C - c0 < kLaneSumBlock ? C : c0 + kLaneSumBlock);
}

// The per-lane double sums of block_partial(c0, c1) -> V over the class blocks (for_each_class_block).
template <class V, class F>
inline LaneSums<V> sum_over_class_blocks(int64_t C, F&& block_partial) {
  LaneSums<V> sums;
  for_each_class_block(C, [&](int64_t c0, int64_t c1) { sums.add(block_partial(c0, c1)); });
  return sums;
}

// Copies n bytes from src to dst, the whole cache lines of dst with non-temporal stores (no read for
// ownership of lines that are overwritten whole); the partial lines at either end with ordinary stores,
// so no line is streamed that another thread's copy also writes. Callers end with stream_fence().
inline void stream_copy(void* dst, const void* src, int64_t n) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
#if defined(XENT_CPU_ISA_AVX512) || defined(XENT_CPU_ISA_AVX2)
  const int64_t head = static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
  if (n >= head + 64) {
    std::memcpy(d, s, static_cast<size_t>(head));
    int64_t i = head;
    for (; i + 64 <= n; i += 64) {
#if defined(XENT_CPU_ISA_AVX512)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
#else
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32)));
#endif
    }
    std::memcpy(d + i, s + i, static_cast<size_t>(n - i));
    return;
  }
#endif
  std::memcpy(d, s, static_cast<size_t>(n));
}

// A stream_copy done in slices between other work: a fused kernel starts copying a block's staged
// gradient out and steps the copy between the next block's rows, whose reads of the logits wait on DRAM
// anyway, so the non-temporal writes overlap those reads instead of following them. Slices end on 64-byte
// boundaries of dst, so each cache line is written by one stream_copy call (no line is mixed of ordinary
// and non-temporal stores). Callers finish() before overwriting the source, and fence as stream_copy's.
class SlicedStreamCopy {
 public:
  // Copies n bytes from src to dst in steps of about n / steps bytes (at least kMinSliceBytes).
  void start(void* dst, const void* src, int64_t n, int64_t steps) {
    dst_ = static_cast<char*>(dst);
    src_ = static_cast<const char*>(src);
    bytes_ = n;
    done_ = 0;
    const int64_t slice = n / (steps > 0 ? steps : 1);
    slice_ = (slice > kMinSliceBytes ? slice : kMinSliceBytes) / 64 * 64;
    // The first slice ends where dst is 64-byte aligned, so that the later ones start on a line.
    first_end_ = static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(dst_) % 64) % 64) + slice_;
  }
  void step() {
    if (done_ >= bytes_) return;
    const int64_t end = done_ == 0 ? first_end_ : done_ + slice_;
    copy_to(end < bytes_ ? end : bytes_);
  }
  void finish() { copy_to(bytes_); }

 private:
  static constexpr int64_t kMinSliceBytes = 1024;
  void copy_to(int64_t end) {
    if (end <= done_) return;
    stream_copy(dst_ + done_, src_ + done_, end - done_);
    done_ = end;
  }
  char* dst_ = nullptr;
  const char* src_ = nullptr;
  int64_t bytes_ = 0, done_ = 0, slice_ = 0, first_end_ = 0;
};

// Loads/stores of n < kWidth elements (row tails), padded with `fill`: masked loads and stores where the
// vector type has them (AVX-512), else through a small buffer. (Filled element by element and read back
// as one vector, the buffer costs a failed store-to-load forward, some 20 cycles per row tail: rows of
// 1000 float32 took 7-10% longer than rows of 1008.) 16-bit stores keep the buffer: from_acc rounds
// exactly like V::store.
template <class V, class T>
inline V load_partial(const T* p, int64_t n, typename V::scalar fill) {
  if constexpr (requires { V::load_first(p, n, fill); }) {
    return V::load_first(p, n, fill);
  } else {
    typename V::scalar buf[V::kWidth];
    for (int i = 0; i < V::kWidth; ++i) buf[i] = i < n ? to_acc(p[i]) : fill;
    return V::load(buf);
  }
}

// n rounded up to whole vectors of V: the row stride of the exponentials a fused kernel keeps per row
// (their last vector is stored whole, padding lanes 0).
template <class V>
inline int64_t padded_to_vectors(int64_t n) {
  return (n + V::kWidth - 1) / V::kWidth * V::kWidth;
}

template <class V, class T>
inline void store_partial(T* p, int64_t n, V x) {
  if constexpr (requires { V::store_first(p, n, x); }) {
    V::store_first(p, n, x);
  } else {
    typename V::scalar buf[V::kWidth];
    V::store(buf, x);
    for (int64_t i = 0; i < n; ++i) from_acc(p + i, buf[i]);
  }
}

// ===================================================================================================
// Elementwise math for the binary losses (binary_kernels_impl.h): comparisons and masks, selects,
// min / abs / division, and log, log1p and pow with their accuracy.
//
// MaskF is a lane mask of VecF (MaskD1 of VecD1). Comparisons are ordered: a NaN lane compares false,
// so !(x >= 0 && x <= 1) catches NaN too. vselect(m, a, b) is m ? a : b per lane.

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

struct MaskF { __mmask16 m; };
inline MaskF vlt(VecF a, VecF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
inline MaskF vle(VecF a, VecF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ)}; }
inline MaskF vge(VecF a, VecF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ)}; }
inline MaskF veq(VecF a, VecF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
inline MaskF visnan(VecF a) { return {_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q)}; }
inline MaskF mask_and(MaskF a, MaskF b) { return {static_cast<__mmask16>(a.m & b.m)}; }
inline MaskF mask_or(MaskF a, MaskF b) { return {static_cast<__mmask16>(a.m | b.m)}; }
inline MaskF mask_not(MaskF a) { return {static_cast<__mmask16>(~a.m)}; }
inline bool mask_any(MaskF a) { return a.m != 0; }
inline VecF vselect(MaskF m, VecF a, VecF b) { return {_mm512_mask_blend_ps(m.m, b.v, a.v)}; }
// minps semantics: the second operand when either is NaN.
inline VecF vmin(VecF a, VecF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VecF vabs(VecF a) { return {_mm512_abs_ps(a.v)}; }
inline VecF vdiv(VecF a, VecF b) { return {_mm512_div_ps(a.v, b.v)}; }
// 1 / x from the 14-bit rcp14 and one Newton step: within about 1 ulp, several times the throughput of a
// division. For finite nonzero x only (0 and inf give NaN; NaN stays NaN).
inline VecF vrecip(VecF x) {
  const __m512 r = _mm512_rcp14_ps(x.v);
  return {_mm512_fmadd_ps(r, _mm512_fnmadd_ps(x.v, r, _mm512_set1_ps(1.0f)), r)};
}

// x = 2^e m with m in [1, 2): getexp/getmant, which also normalize subnormals. Meaningful for positive
// finite x only; vlog fixes up the rest.
inline void vfrexp(VecF x, VecF& m, VecF& e) {
  m = {_mm512_getmant_ps(x.v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero)};
  e = {_mm512_getexp_ps(x.v)};
}

#elif defined(XENT_CPU_ISA_AVX2)

struct MaskF { __m256 m; };
inline MaskF vlt(VecF a, VecF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline MaskF vle(VecF a, VecF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
inline MaskF vge(VecF a, VecF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
inline MaskF veq(VecF a, VecF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
inline MaskF visnan(VecF a) { return {_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)}; }
inline MaskF mask_and(MaskF a, MaskF b) { return {_mm256_and_ps(a.m, b.m)}; }
inline MaskF mask_or(MaskF a, MaskF b) { return {_mm256_or_ps(a.m, b.m)}; }
inline MaskF mask_not(MaskF a) {
  return {_mm256_xor_ps(a.m, _mm256_castsi256_ps(_mm256_set1_epi32(-1)))};
}
inline bool mask_any(MaskF a) { return _mm256_movemask_ps(a.m) != 0; }
inline VecF vselect(MaskF m, VecF a, VecF b) { return {_mm256_blendv_ps(b.v, a.v, m.m)}; }
inline VecF vmin(VecF a, VecF b) { return {_mm256_min_ps(a.v, b.v)}; }
inline VecF vabs(VecF a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
inline VecF vdiv(VecF a, VecF b) { return {_mm256_div_ps(a.v, b.v)}; }
// 1 / x from the 12-bit rcp and one Newton step: within about 2 ulp. For finite nonzero x only (0 and
// inf give NaN; NaN stays NaN).
inline VecF vrecip(VecF x) {
  const __m256 r = _mm256_rcp_ps(x.v);
  return {_mm256_fmadd_ps(r, _mm256_fnmadd_ps(x.v, r, _mm256_set1_ps(1.0f)), r)};
}

// x = 2^e m with m in [1, 2), from the exponent and mantissa bits; subnormals are first scaled by 2^23.
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

struct MaskF { bool m; };
inline MaskF vlt(VecF a, VecF b) { return {a.v < b.v}; }
inline MaskF vle(VecF a, VecF b) { return {a.v <= b.v}; }
inline MaskF vge(VecF a, VecF b) { return {a.v >= b.v}; }
inline MaskF veq(VecF a, VecF b) { return {a.v == b.v}; }
inline MaskF visnan(VecF a) { return {a.v != a.v}; }
inline MaskF mask_and(MaskF a, MaskF b) { return {a.m && b.m}; }
inline MaskF mask_or(MaskF a, MaskF b) { return {a.m || b.m}; }
inline MaskF mask_not(MaskF a) { return {!a.m}; }
inline bool mask_any(MaskF a) { return a.m; }
inline VecF vselect(MaskF m, VecF a, VecF b) { return m.m ? a : b; }
inline VecF vmin(VecF a, VecF b) { return {a.v < b.v ? a.v : b.v}; }
inline VecF vabs(VecF a) { return {__builtin_fabsf(a.v)}; }
inline VecF vdiv(VecF a, VecF b) { return {a.v / b.v}; }
inline VecF vrecip(VecF x) { return {1.0f / x.v}; }

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

// m^g = exp(g log m) for a non-integer g (integer powers are products, see binary_kernels_impl.h). The
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
struct MaskD1 { bool m; };
inline MaskD1 vlt(VecD1 a, VecD1 b) { return {a.v < b.v}; }
inline MaskD1 vle(VecD1 a, VecD1 b) { return {a.v <= b.v}; }
inline MaskD1 vge(VecD1 a, VecD1 b) { return {a.v >= b.v}; }
inline MaskD1 veq(VecD1 a, VecD1 b) { return {a.v == b.v}; }
inline MaskD1 visnan(VecD1 a) { return {a.v != a.v}; }
inline MaskD1 mask_and(MaskD1 a, MaskD1 b) { return {a.m && b.m}; }
inline MaskD1 mask_or(MaskD1 a, MaskD1 b) { return {a.m || b.m}; }
inline MaskD1 mask_not(MaskD1 a) { return {!a.m}; }
inline bool mask_any(MaskD1 a) { return a.m; }
inline VecD1 vselect(MaskD1 m, VecD1 a, VecD1 b) { return m.m ? a : b; }
inline VecD1 vmin(VecD1 a, VecD1 b) { return {a.v < b.v ? a.v : b.v}; }
inline VecD1 vabs(VecD1 a) { return {__builtin_fabs(a.v)}; }
inline VecD1 vdiv(VecD1 a, VecD1 b) { return {a.v / b.v}; }
inline VecD1 vrecip(VecD1 x) { return {1.0 / x.v}; }
inline VecD1 vlog(VecD1 x) { return {__builtin_log(x.v)}; }
inline VecD1 vlog1p(VecD1 a) { return {__builtin_log1p(a.v)}; }
inline VecD1 vlog1p_unit(VecD1 e) { return {__builtin_log1p(e.v)}; }
inline VecD1 vpow(VecD1 m, double g) { return {__builtin_pow(m.v, g)}; }
inline VecD1 vlog1p_unit_poly(VecD1 e) { return {__builtin_log1p(e.v)}; }


// ===================================================================================================
// Pairs of vectors for the cross-entropy kernels (kernels_impl.h): 2 * kWidth consecutive elements
// loaded into, or stored from, two VecF in an order of lanes that depends on the ISA and the dtype.
//
// Why: a 16-bit dtype converts to and from float most cheaply a whole 512-bit (or 256-bit) register at a
// time, keeping the even elements in one vector (bits << 16) and the odd ones in the other (the high
// halves, masked), instead of widening half a register with vpmovzxwd and narrowing with vpmovdw (one and
// two shuffle-port uops per 16 elements; bf16 gradients measured 20% faster in cache). Elementwise math does not care which element sits in which lane, and
// store_pair puts every element back where load_pair took it from; only sums depend on the order, and
// that order is fixed per ISA, so results stay deterministic. For float and the generic ISA a pair is
// simply elements [0, W) and [W, 2W).
//
// stream_pair writes with non-temporal stores and needs p aligned to kPairAlign bytes.

template <class T>
inline void load_pair(const T* p, VecF& a, VecF& b) {
  a = VecF::load(p);
  b = VecF::load(p + VecF::kWidth);
}
template <class T>
inline void store_pair(T* p, VecF a, VecF b) {
  VecF::store(p, a);
  VecF::store(p + VecF::kWidth, b);
}
template <class T>
inline void stream_pair(T* p, VecF a, VecF b) {
  VecF::stream(p, a);
  VecF::stream(p + VecF::kWidth, b);
}
// Floats (weights of the classes) loaded into the lanes where load_pair puts elements of dtype T.
template <class T>
inline void load_pair_as(const float* p, VecF& a, VecF& b) {
  load_pair(p, a, b);
}
template <class T>
inline void load_pair_as(const double* p, VecD1& a, VecD1& b) {
  a = VecD1::load(p);
  b = VecD1::load(p + 1);
}
// The inverse of load_pair_as: stores a and b to 2W consecutive floats in element order.
template <class T>
inline void store_pair_as(float* p, VecF a, VecF b) {
  VecF::store(p, a);
  VecF::store(p + VecF::kWidth, b);
}
template <class T>
inline void store_pair_as(double* p, VecD1 a, VecD1 b) {
  VecD1::store(p, a);
  VecD1::store(p + 1, b);
}
inline void load_pair(const double* p, VecD1& a, VecD1& b) {
  a = VecD1::load(p);
  b = VecD1::load(p + 1);
}
inline void store_pair(double* p, VecD1 a, VecD1 b) {
  VecD1::store(p, a);
  VecD1::store(p + 1, b);
}
inline void stream_pair(double* p, VecD1 a, VecD1 b) { store_pair(p, a, b); }

#if defined(XENT_CPU_ISA_AVX512)

constexpr int kPairAlign = 64;

inline void load_pair(const bf16_t* p, VecF& even, VecF& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16))};
  odd = {_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))))};
}
template <>
inline void load_pair_as<bf16_t>(const float* p, VecF& even, VecF& odd) {
  const __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16);
  const __m512i even_idx = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  even = {_mm512_permutex2var_ps(lo, even_idx, hi)};
  odd = {_mm512_permutex2var_ps(lo, _mm512_add_epi32(even_idx, _mm512_set1_epi32(1)), hi)};
}
template <>
inline void store_pair_as<bf16_t>(float* p, VecF even, VecF odd) {
  // Element k of [0, 16) is even[k / 2] for even k and odd[k / 2] for odd k (index 16 + k / 2 of the pair).
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  _mm512_storeu_ps(p, _mm512_permutex2var_ps(even.v, lo_idx, odd.v));
  _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(even.v, _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8)), odd.v));
}
// float -> bf16 bits in the high half of each 32-bit lane (low half garbage): round to nearest even,
// NaN -> 0x7fc0, as float_to_bf16.
inline __m512i bf16_round_high(VecF x) {
  const __m512i u = _mm512_castps_si512(x.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
}
inline __m512i bf16_pack_pair(VecF even, VecF odd) {
  // (odd & 0xffff0000) | (even >> 16): bit-select with vpternlog (imm 0xE4: c ? a : b per bit).
  return _mm512_ternarylogic_epi32(bf16_round_high(odd), _mm512_srli_epi32(bf16_round_high(even), 16),
                                   _mm512_set1_epi32(static_cast<int>(0xffff0000u)), 0xE4);
}
#if defined(XENT_CPU_AVX512_BF16)
// With AVX512_BF16, vcvtne2ps2bf16 rounds 32 floats to nearest even in two uops, and vpermw interleaves
// them back into element order; pairs holding a NaN or a subnormal take the integer path
// (bf16_convert_unsafe).
inline __m512i bf16_pack_pair_fast(VecF even, VecF odd) {
  if (bf16_convert_unsafe(even.v) | bf16_convert_unsafe(odd.v)) return bf16_pack_pair(even, odd);
  // words 0..15 are the even elements, 16..31 the odd ones: element 2i comes from word i, 2i + 1 from 16 + i.
  const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(odd.v, even.v);  // a vector cast: same 512 bits
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, packed);
}
inline void store_pair(bf16_t* p, VecF even, VecF odd) { _mm512_storeu_si512(p, bf16_pack_pair_fast(even, odd)); }
inline void stream_pair(bf16_t* p, VecF even, VecF odd) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bf16_pack_pair_fast(even, odd));
}
#else
inline void store_pair(bf16_t* p, VecF even, VecF odd) { _mm512_storeu_si512(p, bf16_pack_pair(even, odd)); }
inline void stream_pair(bf16_t* p, VecF even, VecF odd) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bf16_pack_pair(even, odd));
}
#endif

#elif defined(XENT_CPU_ISA_AVX2)

constexpr int kPairAlign = 32;

inline void load_pair(const bf16_t* p, VecF& even, VecF& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16))};
  odd = {_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))))};
}
template <>
inline void load_pair_as<bf16_t>(const float* p, VecF& even, VecF& odd) {
  const __m256 lo = _mm256_loadu_ps(p), hi = _mm256_loadu_ps(p + 8);
  // Within each 128-bit half: lo[0] lo[2] hi[0] hi[2]; then the 64-bit quarters in the order 0, 2, 1, 3.
  even = {_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xD8))};
  odd = {_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD)), 0xD8))};
}
template <>
inline void store_pair_as<bf16_t>(float* p, VecF even, VecF odd) {
  const __m256 lo = _mm256_unpacklo_ps(even.v, odd.v);  // e0 o0 e1 o1 | e4 o4 e5 o5
  const __m256 hi = _mm256_unpackhi_ps(even.v, odd.v);  // e2 o2 e3 o3 | e6 o6 e7 o7
  _mm256_storeu_ps(p, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}
inline __m256i bf16_round_high(VecF x) {
  const __m256i u = _mm256_castps_si256(x.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc00000), nan);
}
inline __m256i bf16_pack_pair(VecF even, VecF odd) {
  return _mm256_blend_epi16(_mm256_srli_epi32(bf16_round_high(even), 16), bf16_round_high(odd), 0xAA);
}
inline void store_pair(bf16_t* p, VecF even, VecF odd) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_pack_pair(even, odd));
}
inline void stream_pair(bf16_t* p, VecF even, VecF odd) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_pack_pair(even, odd));
}

#else

constexpr int kPairAlign = 1;

#endif

} // namespace
} // namespace xent::cpu
