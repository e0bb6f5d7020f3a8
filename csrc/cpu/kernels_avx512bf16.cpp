// The AVX-512 kernels once more, with AVX512_BF16 (vcvtne2ps2bf16) for rounding bf16 gradients (see
// bf16_pack_pair_fast in simd.h; the bits are the same as kernels_avx512.cpp's). cross_entropy.cpp picks
// this table instead of the plain AVX-512 one when the CPU has AVX512_BF16.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#endif
#define XENT_CPU_ISA_AVX512
#define XENT_CPU_AVX512_BF16
#define XENT_CPU_ISA_NAME "avx512"
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
const xent::cpu::KernelTable* xent::cpu::kernels_avx512_bf16() { return &kTable; }
#else
const xent::cpu::KernelTable* xent::cpu::kernels_avx512_bf16() { return nullptr; }
#endif
