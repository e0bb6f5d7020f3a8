// The body of every per-instruction-set translation unit (kernels_<isa>.cpp): compiles all the losses'
// kernels for the instruction set that file names and defines its KernelTables (kernel_tables.h).
//
// The including file defines
//   XENT_CPU_ISA_AVX512 / XENT_CPU_ISA_AVX2 / XENT_CPU_ISA_GENERIC, and XENT_CPU_AVX512_BF16 with AVX-512;
//   XENT_CPU_ISA_NAME     the name active_cpu_isa() gives it;
//   XENT_CPU_TARGET       the compiler target string (none for the generic kernels);
//   XENT_CPU_TABLES       the function that returns the table.
// The target is set by pragma rather than a per-file -m flag, so setup.py and CMake compile every file
// alike; Note [Per-ISA headers] (simd/vec.h) says what these headers must not include.
#include "cpu/kernel_tables.h"

#if defined(XENT_CPU_TARGET) && !(defined(__x86_64__) || defined(_M_X64))
// An x86 instruction set on another architecture: no table.
const xent::cpu::KernelTables* xent::cpu::XENT_CPU_TABLES() { return nullptr; }
#else

#define XENT_CPU_PRAGMA(x) _Pragma(#x)
#if defined(XENT_CPU_TARGET) && defined(__clang__)
#define XENT_CPU_CLANG_TARGET(t) XENT_CPU_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
XENT_CPU_CLANG_TARGET(XENT_CPU_TARGET)
#elif defined(XENT_CPU_TARGET)
#define XENT_CPU_GCC_TARGET(t) XENT_CPU_PRAGMA(GCC target(t))
#pragma GCC push_options
XENT_CPU_GCC_TARGET(XENT_CPU_TARGET)
#endif

#include "cpu/binary_loss_kernels_impl.h"
#include "cpu/cross_entropy_kernels_impl.h"
#include "cpu/softmax_focal_kernels_impl.h"

namespace xent::cpu {
namespace {

void exp_f32(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + VecF::kWidth <= n; i += VecF::kWidth) VecF::store(y + i, VecF::exp(VecF::load(x + i)));
  if (i < n) store_partial(y + i, n - i, VecF::exp(load_partial<VecF>(x + i, n - i, 0.0f)));
}

constexpr KernelTables kTables = {
    XENT_CPU_ISA_NAME, kCrossEntropyKernels, kSoftmaxFocalKernels, kBinaryLossKernels, exp_f32,
};

} // namespace
} // namespace xent::cpu

#if defined(XENT_CPU_TARGET) && defined(__clang__)
#pragma clang attribute pop
#elif defined(XENT_CPU_TARGET)
#pragma GCC pop_options
#endif

const xent::cpu::KernelTables* xent::cpu::XENT_CPU_TABLES() { return &kTables; }
#endif
