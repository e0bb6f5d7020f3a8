// The CPU softmax focal loss kernels compiled for AVX2 with FMA and F16C (see focal_kernels_avx512.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define XENT_CPU_ISA_AVX2
#define XENT_CPU_ISA_NAME "avx2"
#include "focal_kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
const xent::cpu::FocalKernelTable* xent::cpu::focal_kernels_avx2() { return &kFocalTable; }
#else
const xent::cpu::FocalKernelTable* xent::cpu::focal_kernels_avx2() { return nullptr; }
#endif
