// Run-time choice of the CPU kernels' instruction set, shared by every CPU op: each op family compiles
// its kernels once per ISA and picks the table named by active_cpu_isa().
#pragma once

#include <string>

namespace xent::cpu {

// "avx512", "avx2" or "generic": the best the CPU supports, capped by the XENT_CPU_ISA environment
// variable, or as last set by set_cpu_isa().
const std::string& active_cpu_isa();

// Selects an instruction set; raises ValueError if it is unknown or the CPU lacks it.
void set_cpu_isa(const std::string& isa);

} // namespace xent::cpu
