// Every CPU kernel compiled for AVX2 with FMA and F16C; selected at run time when the CPU has them and lacks
// AVX-512, or by XENT_CPU_ISA=avx2 (isa.h).
#define XENT_CPU_ISA_AVX2
#define XENT_CPU_ISA_NAME "avx2"
#define XENT_CPU_TARGET "avx2,fma,f16c"
#define XENT_CPU_TABLES kernel_tables_avx2
#include "cpu/kernels_instantiate.h"
