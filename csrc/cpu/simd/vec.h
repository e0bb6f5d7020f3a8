// Vector types and conversions of the CPU kernels: the 16-bit storage types and their scalar conversions,
// one float vector type per instruction set (VecF: its loads and stores of every dtype, arithmetic and exp),
// VecD1 for float64, lane masks and selects, and the dtype dispatch of the kernels.
//
// Note [Per-ISA headers]
// ----------------------
// The csrc/cpu/simd/ headers and the kernels' *_impl.h headers are included only by the per-instruction-set
// translation units (kernels_<isa>.cpp, through kernels_instantiate.h), after they select the instruction set
// (XENT_CPU_ISA_AVX512 / XENT_CPU_ISA_AVX2 / XENT_CPU_ISA_GENERIC). Everything in them has internal linkage
// (an anonymous namespace) and they include no torch or standard-library templates: an inline function
// with external linkage instantiated there would be compiled for AVX-512 and could be picked by the
// linker for every caller (the ODR hazard of per-file ISA flags).
#pragma once

#include "cpu/dtype.h"

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

// The vector type of a storage type: VecF for float and the 16-bit types, VecD1 for double.
template <class T> struct VecFor { using type = VecF; };
template <> struct VecFor<double> { using type = VecD1; };

constexpr double kInf = __builtin_inf();

// Calls f(T{}) with the storage type of dtype d.
template <class F>
inline void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::f32: f(float{}); break;
    case DType::f64: f(double{}); break;
    case DType::bf16: f(bf16_t{}); break;
    case DType::f16: f(f16_t{}); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// Lane masks, selects, min / abs / division.
//
// MaskF is a lane mask of VecF (MaskD1 of VecD1). Comparisons are ordered: a NaN lane compares false,
// so !(x >= 0 && x <= 1) catches NaN too. vselect(m, a, b) is m ? a : b per lane.

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

#endif

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

} // namespace
} // namespace xent::cpu
