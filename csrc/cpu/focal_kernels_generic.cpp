// The CPU softmax focal loss kernels in portable C++, one lane wide: for CPUs without AVX2 and non-x86 targets.
#define XENT_CPU_ISA_GENERIC
#define XENT_CPU_ISA_NAME "generic"
#include "focal_kernels_impl.h"
const xent::cpu::FocalKernelTable* xent::cpu::focal_kernels_generic() { return &kFocalTable; }
