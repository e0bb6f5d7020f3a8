// The interface of the CPU kernels of the softmax losses (cross-entropy, softmax focal loss): their
// arguments and their table of entry points, plain structs and function pointers, no torch headers. The
// host layer (softmax_loss.h) fills the arguments and picks the table of the active instruction set
// (kernel_tables.h).
//
// Note [Position layouts]
// -----------------------
// Logits are a strided (N, C, S) view (csrc/class_losses_host.h). The kernels handle two layouts:
//  * rows:  the class stride is 1. Each position's C logits are contiguous; positions are vectorized
//           along the row, in fixed chunks of kChunk classes (Note [Deterministic chunks]).
//  * lanes: the spatial stride is 1 (NCHW segmentation logits, or a transposed (N, C) matrix viewed as
//           (1, C, N)). Vector lanes hold consecutive positions and the kernel walks the classes; each
//           lane's arithmetic is independent of its neighbours', so a position's result does not depend on
//           how positions are grouped into vectors.
// The gradient and a probability target have strides of their own, with the same unit stride as the
// logits (the host copies a tensor that does not fit).
//
// Note [Deterministic chunks]
// ---------------------------
// A row's log-sum-exp is built from partials over fixed chunks of kChunk classes, each (max, sum of
// exp(x - max), ...), merged left to right. The chunk boundaries never depend on the thread count, and a
// row is computed the same way whether one thread walks all its chunks or several threads compute the
// partials of a few long rows in parallel, so the results are bitwise identical for any thread count.
#pragma once

#include "cpu/dtype.h"

#include <cstdint>

namespace xent::cpu {

// Classes per chunk of a row. 4096 fp32 logits are 16 KiB: a chunk is read from memory once for its max
// and re-read from L1 for its sum of exponentials.
constexpr int64_t kChunk = 4096;

// Everything a kernel needs, by raw pointer. acc_t below is double for f64 logits, float otherwise; the
// acc pointers are typed void* and cast by the kernel. Strides are in elements of the (N, C, S) views.
struct SoftmaxLossArgs {
  DType dtype;
  const void* logits;  // (N, C, S) strided, `dtype`
  int64_t N, C, S;
  int64_t stride_n, stride_c, stride_s;
  // Class-index targets: int64, (N * S) contiguous, validated by the host (in range or ignore_index).
  const int64_t* target;
  int64_t ignore_index;
  // Probability targets: (N, C, S) strided, `dtype`. Null for class-index targets.
  const void* prob_target;
  int64_t target_stride_n, target_stride_c, target_stride_s;
  const void* weight;  // (C) acc_t, or null
  double weight_sum;   // sum of weight (C when weight is null); cross-entropy's label smoothing needs it
  double label_smoothing;
  double gamma;        // softmax focal loss: the focusing exponent, >= 0
  // Forward outputs, (N * S) acc_t each: log-sum-exp and unreduced loss of every position (0 and 0 when
  // ignored).
  void* lse;
  void* loss;
  // Backward: upstream gradient per position, (N * S) acc_t, already divided by the mean's denominator;
  // or, when grad_scale_per_position is null, the single value grad_scale_value.
  const void* grad_scale_per_position;
  double grad_scale_value;
  const void* lse_in;  // (N * S) acc_t, from the forward
  void* grad;          // (N, C, S) strided, `dtype`
  int64_t grad_stride_n, grad_stride_c, grad_stride_s;
  // Write the gradient with non-temporal stores (too large to stay in cache); the host sets it only where
  // the loss's kernels support it (softmax_loss.h: SoftmaxLoss::streams_gradient).
  bool stream_grad;
};

// Partial log-sum-exp state of one chunk of a row (Note [Deterministic chunks]), in acc precision.
struct RowPartial {
  double max;         // max logit of the chunk
  double sum_exp;     // sum of exp(x - max)
  double dot;         // index targets: sum of w_c * x_c (or x_c); prob targets: sum of w_c q_c x_c
  double weight_dot;  // prob targets: sum of w_c q_c; unused for index targets
};

// The fused rows kernel of cross-entropy keeps a block of rows' logits and its gradient rows in L1, each
// within this many bytes; longer rows take forward_rows and backward_rows on blocks of logits that stay
// in L2.
constexpr int64_t kFusedStageBytes = int64_t(16) << 10;
namespace {  // internal linkage (Note [Per-ISA headers] in simd/vec.h)
constexpr bool fused_rows_fit(int64_t C, int64_t element_bytes) { return C * element_bytes <= kFusedStageBytes; }
} // namespace

// The entry points of one softmax loss for one instruction set. Positions p = n * S + s.
struct SoftmaxLossKernels {
  // Rows layout, rows [row_begin, row_end): forward (lse and loss), backward (the gradient of whole rows),
  // and the fused forward + gradient (grad scale a.grad_scale_value) in one pass over each row, with the
  // same bits as the two others. Which rows the fused kernel takes is the loss's (SoftmaxLoss::fused_rows).
  void (*forward_rows)(const SoftmaxLossArgs&, int64_t row_begin, int64_t row_end);
  void (*backward_rows)(const SoftmaxLossArgs&, int64_t row_begin, int64_t row_end);
  void (*forward_grad_rows)(const SoftmaxLossArgs&, int64_t row_begin, int64_t row_end);
  // Lanes layout, positions [p_begin, p_end).
  void (*forward_lanes)(const SoftmaxLossArgs&, int64_t p_begin, int64_t p_end);
  void (*backward_lanes)(const SoftmaxLossArgs&, int64_t p_begin, int64_t p_end);
  // Few long rows, split into chunks across threads (Note [Deterministic chunks]); null for a loss whose
  // kernels compute every row whole.
  //   The partials of chunks [chunk_begin, chunk_end) of one row into partials[chunk - chunk_begin];
  void (*forward_row_partials)(const SoftmaxLossArgs&, int64_t row, int64_t chunk_begin, int64_t chunk_end,
                               RowPartial* partials);
  //   merges a row's partials (all chunks, in order) and writes its lse and loss;
  void (*forward_row_finish)(const SoftmaxLossArgs&, int64_t row, const RowPartial* partials, int64_t n_chunks);
  //   the gradient of classes [c_begin, c_end) of one row (class-index targets).
  void (*backward_row_classes)(const SoftmaxLossArgs&, int64_t row, int64_t c_begin, int64_t c_end);
};

} // namespace xent::cpu
