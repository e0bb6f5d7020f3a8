// The CPU binary-loss kernels compiled for AVX2 with FMA and F16C (see binary_kernels_avx512.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define XENT_CPU_ISA_AVX2
#define XENT_CPU_ISA_NAME "avx2"
#include "binary_kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
const xent::cpu::BinaryKernelTable* xent::cpu::binary_kernels_avx2() { return &kBinaryTable; }
#else
const xent::cpu::BinaryKernelTable* xent::cpu::binary_kernels_avx2() { return nullptr; }
#endif
