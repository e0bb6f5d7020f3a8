// The element types the CPU kernels take, as plain codes (the kernel headers include no torch headers).
#pragma once

#include <cstdint>

namespace xent::cpu {

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// Internal linkage, as every inline function these headers give the per-ISA translation units (Note
// [Per-ISA headers] in simd/vec.h).
namespace {
constexpr int64_t dtype_bytes(DType d) { return d == DType::f64 ? 8 : (d == DType::f32 ? 4 : 2); }
} // namespace

} // namespace xent::cpu
