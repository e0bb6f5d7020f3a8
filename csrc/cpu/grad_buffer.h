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

// Gradients at least this large are written with non-temporal stores (no read for ownership of the
// destination lines, no eviction of the logits being read). Measured with bench_losses.py on a 2-core
// Xeon: softmax focal fwd+bwd at 65536 x 80 and 4096 x 1000 fp32 (16-21 MB gradients) is 15-25% faster
// streamed. A consumer that reads the gradient straight back (the lm-head matmul's backward) then finds
// it in DRAM rather than in L3; below this size that cost is not worth the saved traffic.
constexpr int64_t kStreamGradBytes = int64_t(8) << 20;

// An uninitialized CPU tensor with the given sizes, strides and dtype.
at::Tensor empty_grad_buffer(c10::IntArrayRef sizes, c10::IntArrayRef strides, at::ScalarType dtype);

// Sets the cache capacity (when capacity >= 0; 0 frees everything held) and returns {capacity, held}.
std::vector<int64_t> grad_cache_control(int64_t capacity);

} // namespace xent::cpu
