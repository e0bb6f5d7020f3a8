// The CPU kernels in portable C++, one lane wide: for CPUs without AVX2 and non-x86 targets.
#define XENT_CPU_ISA_GENERIC
#define XENT_CPU_ISA_NAME "generic"
#include "kernels_impl.h"
const xent::cpu::KernelTable* xent::cpu::kernels_generic() { return &kTable; }
