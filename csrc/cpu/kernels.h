// The CPU cross-entropy kernels' interface: plain structs and function pointers, no torch headers.
//
// The kernels are compiled once per instruction set (kernels_avx512.cpp, kernels_avx2.cpp,
// kernels_generic.cpp, each including kernels_impl.h) and cross_entropy.cpp picks one table at run time
// from the CPU's features. Those files must not include torch or standard-library templates: an inline
// function instantiated there would be compiled for AVX-512 and could be picked by the linker for every
// caller (the ODR hazard of per-file ISA flags).
//
// Note [Position layouts]
// -----------------------
// Logits are a strided (N, C, S) view (csrc/cross_entropy_host.h). The kernels handle two layouts:
//  * rows:  the class stride is 1. Each position's C logits are contiguous; positions are vectorized
//           along the row, in fixed chunks of kChunk classes (Note [Deterministic chunks]).
//  * lanes: the spatial stride is 1 (NCHW segmentation logits, or a transposed (N, C) matrix viewed as
//           (1, C, N)). Vector lanes hold consecutive positions and the kernel walks the classes.
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

#include <cstdint>

namespace xent::cpu {

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// Classes per chunk of a row. 4096 fp32 logits are 16 KiB: a chunk is read from memory once for its max
// and re-read from L1 for its sum of exponentials.
constexpr int64_t kChunk = 4096;

// Everything a kernel needs, by raw pointer. `acc_t` below is double for f64 logits, float otherwise;
// the acc pointers are typed void* and cast by the kernel.
struct CrossEntropyArgs {
  DType dtype;
  // Strides are in elements of the (N, C, S) views (Note [Position layouts]). In the rows layout the
  // class stride of logits, grad and prob_target is 1; in the lanes layout their spatial stride is 1.
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
  double weight_sum;   // sum of weight (C when weight is null); label smoothing needs it
  double label_smoothing;
  // Forward outputs, (N * S) acc_t each: log-sum-exp and unreduced loss of every position.
  void* lse;
  void* loss;
  // Backward: upstream gradient per position, (N * S) acc_t, already divided by the mean's denominator;
  // or, when grad_scale_per_position is null, the single acc_t value in grad_scale_value.
  const void* grad_scale_per_position;
  double grad_scale_value;
  const void* lse_in;  // (N * S) acc_t, from the forward
  void* grad;          // (N, C, S) strided, `dtype`
  int64_t grad_stride_n, grad_stride_c, grad_stride_s;
  bool stream_grad;    // write the gradient with non-temporal stores (too large to stay in cache)
};

// Partial log-sum-exp state of one chunk of a row (Note [Deterministic chunks]), in acc precision.
struct RowPartial {
  double max;         // max logit of the chunk
  double sum_exp;     // sum of exp(x - max)
  double dot;         // index targets: sum of w_c * x_c (or x_c); prob targets: sum of w_c q_c x_c
  double weight_dot;  // prob targets: sum of w_c q_c; unused for index targets
};

// The fused rows kernel (KernelTable::forward_grad_rows) keeps a block of rows' logits and its gradient
// rows in L1, each within this many bytes; longer rows take forward_rows and backward_rows on blocks of
// logits that stay in L2.
constexpr int64_t kFusedStageBytes = int64_t(16) << 10;
inline bool fused_rows_fit(int64_t C, int64_t element_bytes) { return C * element_bytes <= kFusedStageBytes; }
inline int64_t dtype_bytes(DType d) { return d == DType::f64 ? 8 : (d == DType::f32 ? 4 : 2); }

struct KernelTable {
  const char* name;
  // Forward over rows [row_begin, row_end) of the rows layout: writes lse and loss.
  void (*forward_rows)(const CrossEntropyArgs&, int64_t row_begin, int64_t row_end);
  // Forward partials of chunks [chunk_begin, chunk_end) of one row into partials[chunk - chunk_begin].
  void (*forward_row_partials)(const CrossEntropyArgs&, int64_t row, int64_t chunk_begin, int64_t chunk_end,
                               RowPartial* partials);
  // Merges a row's partials (all chunks, in order) and writes its lse and loss.
  void (*forward_row_finish)(const CrossEntropyArgs&, int64_t row, const RowPartial* partials, int64_t n_chunks);
  // Backward over classes [c_begin, c_end) of rows [row_begin, row_end) of the rows layout. Probability
  // targets need whole rows (c_begin = 0, c_end = C): each row first sums w_c q_c over its target row.
  void (*backward_rows)(const CrossEntropyArgs&, int64_t row_begin, int64_t row_end, int64_t c_begin,
                        int64_t c_end);
  // The fused forward + gradient (grad scale a.grad_scale_value) of rows [row_begin, row_end) of the rows
  // layout, rows of at most kFusedStageBytes (fused_rows_fit); the same bits as forward_rows followed by
  // backward_rows. With a.stream_grad the gradient rows must be contiguous (grad_stride_n == C, S == 1).
  void (*forward_grad_rows)(const CrossEntropyArgs&, int64_t row_begin, int64_t row_end);
  // Forward / backward for the lanes layout over positions [p_begin, p_end) (p = n * S + s).
  void (*forward_lanes)(const CrossEntropyArgs&, int64_t p_begin, int64_t p_end);
  void (*backward_lanes)(const CrossEntropyArgs&, int64_t p_begin, int64_t p_end);
  // y = exp(x) with the kernels' vectorized exp (tests its accuracy).
  void (*exp_f32)(const float* x, float* y, int64_t n);
  int vector_width;  // float lanes
};

// The tables, one per instruction set; null when this build has no such table (non-x86 targets).
const KernelTable* kernels_avx512();
// The AVX-512 table built with AVX512_BF16 as well (faster bf16 gradient stores, same results).
const KernelTable* kernels_avx512_bf16();
const KernelTable* kernels_avx2();
const KernelTable* kernels_generic();

} // namespace xent::cpu
