// Memory movement of the CPU kernels: partial loads and stores of row tails, pairs of vectors, prefetching,
// non-temporal stores and copies, and the addressing of positions (Note [Per-ISA headers] in vec.h).
#pragma once

#include "cpu/simd/vec.h"

namespace xent::cpu {
namespace {

inline void stream_fence() {
#if defined(XENT_CPU_ISA_AVX512) || defined(XENT_CPU_ISA_AVX2)
  _mm_sfence();
#endif
}

inline void prefetch(const void* p) { __builtin_prefetch(p); }

// How far ahead of its reads a kernel that streams an operand from memory prefetches it. The hardware
// prefetcher alone leaves these kernels waiting on DRAM when their input is not in cache (a training step
// runs the model's own work between loss calls): it restarts at every 4 KiB page and is slow to ramp up
// for a stream it sees interleaved with two others. Prefetching 8 KiB ahead halves BCE's forward +
// backward at 65536 x 80 fp32 with cold inputs; 4 and 16 KiB are no better.
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
// Pairs of vectors (cross-entropy's and BCE-with-logits' kernels): 2 * kWidth consecutive elements
// loaded into, or stored from, two VecF in an order of lanes that depends on the ISA and the dtype.
//
// Why: a 16-bit dtype converts to and from float most cheaply a whole 512-bit (or 256-bit) register at a
// time, keeping the even elements in one vector (bits << 16) and the odd ones in the other (the high
// halves, masked), instead of widening half a register with vpmovzxwd and narrowing with vpmovdw (one and
// two shuffle-port uops per 16 elements; bf16 gradients 20% faster in cache). Elementwise math does not
// care which element sits in which lane, and store_pair puts every element back where load_pair took it
// from; only sums depend on the order, and
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
