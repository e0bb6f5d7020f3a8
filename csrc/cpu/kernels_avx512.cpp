// Every CPU kernel compiled for AVX-512 (F, BW, VL, DQ) with FMA and F16C; selected at run time when the CPU
// has them (isa.h).
#define XENT_CPU_ISA_AVX512
#define XENT_CPU_ISA_NAME "avx512"
#define XENT_CPU_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#define XENT_CPU_TABLES kernel_tables_avx512
#include "cpu/kernels_instantiate.h"
