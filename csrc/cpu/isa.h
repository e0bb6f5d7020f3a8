// Run-time choice of the CPU kernels' instruction set, shared by every CPU op: the kernels are compiled once
// per instruction set (kernel_tables.h) and the ops take the table of the active one.
#pragma once

#include "cpu/kernel_tables.h"

#include <c10/core/ScalarType.h>

#include <string>

namespace xent::cpu {

// "avx512", "avx2" or "generic": the best the CPU supports, capped by the XENT_CPU_ISA environment
// variable, or as last set by set_cpu_isa().
const std::string& active_cpu_isa();

// Selects an instruction set; raises ValueError if it is unknown or the CPU lacks it.
void set_cpu_isa(const std::string& isa);

// Whether the AVX-512 kernels may use AVX512_BF16 (their *_avx512_bf16 tables, which round bf16 outputs
// with the CPU's conversion instructions and give the same bits): when the CPU has it, unless the
// environment variable XENT_CPU_AVX512_BF16 is "0" (read at every call, so tests can compare both tables
// in one process).
bool use_avx512_bf16();

// The kernels of the active instruction set (and of AVX512_BF16 where use_avx512_bf16()).
const KernelTables& kernel_tables();

// The kernels' code of a floating dtype (float32, float64, bfloat16, float16; others raise).
DType kernel_dtype(at::ScalarType t);

} // namespace xent::cpu
