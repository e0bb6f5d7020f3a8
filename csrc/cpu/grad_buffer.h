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
// back (the lm-head matmul's backward) then finds it in DRAM rather than in L3, so the thresholds are
// per kernel, measured fwd+bwd through the API with 2 threads, alternating builds, eager PyTorch's
// fwd+bwd run between xent's as in a training step (bench_losses.py's round robin):
// - Staged: the fused kernels of short rows (softmax focal, cross-entropy rows up to kFusedStageBytes)
//   write a block of gradient rows into a buffer in L1 and copy it out with whole-line non-temporal
//   stores. Softmax focal at 65536 x 80 and 4096 x 1000 fp32 (16-21 MB gradients): 2.8 / 2.1 ms streamed
//   against 3.2 / 2.4 ms not; bf16 neutral. (Calling the fused op alone in a loop, with its gradient
//   buffer warm in cache every time, favours ordinary stores instead: 1.3 against 1.05 ms at 4096 x 1000
//   fp32.)
//   Softmax focal copies a block out in slices between the next block's exp passes (SlicedStreamCopy),
//   so its writes overlap reads, and streaming pays from 4 MiB on: at 4096 x 1000 bf16 (7.8 MiB)
//   1.32-1.41 ms streamed against 1.38-1.63 ms not. Cross-entropy's short rows copy out after each block
//   and keep 8 MiB: at that shape 1.47-1.49 ms streamed against 1.35-1.44 ms not.
// - From the exp loop (cross-entropy's other kernels): at 16384 x 1000 bf16 (31 MiB gradient) 8.3 ms
//   streamed against 6.9 ms not, in the round robin as in a loop; at 62.5 MiB and above (fp32, the
//   language-model shapes) streaming pays (in a loop, bench_cross_entropy.py): 16384 x 1000 fp32 6.4 ms
//   against 8.0 ms, 4096 x 32000 fp32 40.5 ms against 56 ms. Rows of 80 classes streamed this way took
//   five times as long: their partial lines mix ordinary and non-temporal stores.
constexpr int64_t kStagedStreamGradBytes = int64_t(8) << 20;
constexpr int64_t kFocalStagedStreamGradBytes = int64_t(4) << 20;
constexpr int64_t kCrossEntropyStreamGradBytes = int64_t(32) << 20;

// An uninitialized CPU tensor with the given sizes, strides and dtype.
at::Tensor empty_grad_buffer(c10::IntArrayRef sizes, c10::IntArrayRef strides, at::ScalarType dtype);

// Sets the cache capacity (when capacity >= 0; 0 frees everything held) and returns {capacity, held}.
std::vector<int64_t> grad_cache_control(int64_t capacity);

} // namespace xent::cpu
