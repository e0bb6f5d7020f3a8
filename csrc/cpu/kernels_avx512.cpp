// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ) with FMA and F16C. Only selected at run time when
// the CPU has them (cross_entropy.cpp). The target is set by pragma rather than a per-file -m flag, so
// setup.py and CMake compile every file alike; this file includes no torch or standard-library templates.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define XENT_CPU_ISA_AVX512
#define XENT_CPU_ISA_NAME "avx512"
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
const xent::cpu::KernelTable* xent::cpu::kernels_avx512() { return &kTable; }
#else
const xent::cpu::KernelTable* xent::cpu::kernels_avx512() { return nullptr; }
#endif
