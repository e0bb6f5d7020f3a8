// The AVX-512 kernels once more, with AVX512_BF16 (vcvtne2ps2bf16) for rounding bf16 outputs (the bits are
// those of kernels_avx512.cpp; simd/memory.h: bf16_pack_pair_fast); selected instead of the plain AVX-512
// table when the CPU has AVX512_BF16 (isa.h).
#define XENT_CPU_ISA_AVX512
#define XENT_CPU_AVX512_BF16
#define XENT_CPU_ISA_NAME "avx512"
#define XENT_CPU_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"
#define XENT_CPU_TABLES kernel_tables_avx512_bf16
#include "cpu/kernels_instantiate.h"
