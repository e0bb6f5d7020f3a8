// Every CPU kernel of one instruction set, in one table: the per-ISA translation units kernels_<isa>.cpp
// each compile all the losses' kernels (kernels_instantiate.h) and define one KernelTables; the host ops
// take the table of the active instruction set from kernel_tables() (isa.h).
#pragma once

#include "cpu/binary_loss_kernels.h"
#include "cpu/softmax_loss_kernels.h"

#include <cstdint>

namespace xent::cpu {

struct KernelTables {
  const char* isa;  // "avx512", "avx2" or "generic"
  SoftmaxLossKernels cross_entropy;
  SoftmaxLossKernels softmax_focal;
  BinaryLossKernels binary;
  // y = exp(x) with the kernels' vectorized exp (its accuracy is tested through the _cpu_exp op).
  void (*exp_f32)(const float* x, float* y, int64_t n);
};

// The tables, one per instruction set; null when this build has no such table (non-x86 targets).
const KernelTables* kernel_tables_avx512();
// The AVX-512 kernels built with AVX512_BF16 as well (faster bf16 stores, the same bits).
const KernelTables* kernel_tables_avx512_bf16();
const KernelTables* kernel_tables_avx2();
const KernelTables* kernel_tables_generic();

} // namespace xent::cpu
