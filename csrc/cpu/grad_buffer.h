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
// destination lines, no eviction of the logits being read). A consumer that reads the gradient straight
// back (the lm-head matmul's backward) then finds it in DRAM rather than in L3, so the thresholds are per
// kernel, each where streaming starts to pay in a training step (forward + backward through the API with
// other work between calls; the history is in benchmarks/HISTORY.md):
// - Staged: the fused kernels of short rows (softmax focal, cross-entropy rows up to kFusedStageBytes)
//   write a block of gradient rows into a buffer in L1 and copy it out with whole-line non-temporal
//   stores. Softmax focal copies a block out in slices between the next block's exp passes
//   (SlicedStreamCopy), so its writes overlap reads, and streaming pays from 4 MiB on; cross-entropy's
//   short rows copy out after each block and pay from 8 MiB on.
// - From the exp loop (cross-entropy's other kernels): streaming pays from the language-model shapes on
//   (4096 x 32000 fp32: about 30% faster), not at 31 MiB. Rows of 80 classes streamed this way took five
//   times as long: their partial lines mix ordinary and non-temporal stores.
constexpr int64_t kStagedStreamGradBytes = int64_t(8) << 20;
constexpr int64_t kFocalStagedStreamGradBytes = int64_t(4) << 20;
constexpr int64_t kCrossEntropyStreamGradBytes = int64_t(32) << 20;

// An uninitialized CPU tensor with the given sizes, strides and dtype.
at::Tensor empty_grad_buffer(c10::IntArrayRef sizes, c10::IntArrayRef strides, at::ScalarType dtype);


} // namespace xent::cpu
