// The CPU softmax focal loss kernels compiled for AVX-512 (F, BW, VL, DQ) with FMA and F16C; selected at run
// time when the CPU has them (isa.h). Same pragma scheme as kernels_avx512.cpp: no torch or
// standard-library templates in this file.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define XENT_CPU_ISA_AVX512
#define XENT_CPU_ISA_NAME "avx512"
#include "focal_kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
const xent::cpu::FocalKernelTable* xent::cpu::focal_kernels_avx512() { return &kFocalTable; }
#else
const xent::cpu::FocalKernelTable* xent::cpu::focal_kernels_avx512() { return nullptr; }
#endif
