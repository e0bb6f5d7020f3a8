// The CPU softmax focal loss kernels for AVX-512 once more, with AVX512_BF16 (vcvtneps2bf16 rounds bf16 outputs; see
// VecF::store in simd.h: the bits are the same as focal_kernels_avx512.cpp's). The host picks this table
// instead of the plain AVX-512 one when the CPU has AVX512_BF16 (use_avx512_bf16 in isa.h).
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#endif
#define XENT_CPU_ISA_AVX512
#define XENT_CPU_AVX512_BF16
#define XENT_CPU_ISA_NAME "avx512"
#include "focal_kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
const xent::cpu::FocalKernelTable* xent::cpu::focal_kernels_avx512_bf16() { return &kFocalTable; }
#else
const xent::cpu::FocalKernelTable* xent::cpu::focal_kernels_avx512_bf16() { return nullptr; }
#endif
