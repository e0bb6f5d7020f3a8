// Every CPU kernel in portable C++, one lane wide: for CPUs without AVX2 and non-x86 targets.
#define XENT_CPU_ISA_GENERIC
#define XENT_CPU_ISA_NAME "generic"
#define XENT_CPU_TABLES kernel_tables_generic
#include "cpu/kernels_instantiate.h"
