// Gradient buffers for the CPU backward.
//
// Why: a backward writes a gradient as large as the logits (0.5 GiB for 4096 x 32000 fp32) into freshly
// allocated memory. Touching fresh 4 KiB pages costs about 90 ms per GiB in page faults, more than the
// kernel itself. Buffers of at least kMinCachedBytes are therefore mapped 2 MiB-aligned with
// MADV_HUGEPAGE (one fault per 2 MiB), and when a gradient is freed (typically once the optimizer step
// is done with it) its pages are kept in a small cache for the next backward of the same size, as
// PyTorch's CUDA caching allocator does for GPU memory. The cache never holds more than its capacity
// (default 2 GiB, env XENT_CPU_GRAD_CACHE_BYTES, torch.ops.xent._cpu_grad_cache(bytes) at run time;
// 0 disables it).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace xent::cpu {

constexpr int64_t kMinCachedBytes = int64_t(4) << 20;

// An uninitialized CPU tensor with the given sizes, strides and dtype.
at::Tensor empty_grad_buffer(c10::IntArrayRef sizes, c10::IntArrayRef strides, at::ScalarType dtype);

// Sets the cache capacity (when capacity >= 0; 0 frees everything held) and returns {capacity, held}.
std::vector<int64_t> grad_cache_control(int64_t capacity);

} // namespace xent::cpu
