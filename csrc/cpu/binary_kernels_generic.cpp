// The CPU binary-loss kernels in portable C++, one lane wide: for CPUs without AVX2 and non-x86 targets.
#define XENT_CPU_ISA_GENERIC
#define XENT_CPU_ISA_NAME "generic"
#include "binary_kernels_impl.h"
const xent::cpu::BinaryKernelTable* xent::cpu::binary_kernels_generic() { return &kBinaryTable; }
