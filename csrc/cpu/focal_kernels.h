// The CPU softmax focal loss kernels' interface: plain structs and function pointers, no torch headers.
//
// Compiled once per instruction set (focal_kernels_{avx512,avx2,generic}.cpp include focal_kernels_impl.h)
// with the same ODR rules as kernels.h. softmax_focal.cpp picks the table of the active instruction set.
// Layouts: the rows and lanes layouts of Note [Position layouts] (kernels.h).
//
// Note [Focal loss formula]
// -------------------------
// Per position, with p = softmax(x), q the target distribution (class index y: q_c = (1 - eps) [c == y]
// + eps / C; probabilities t: q_c = (1 - eps) t_c + eps / C), a_c = w_c q_c and
// f(p) = -(1 - p)^gamma log p:
//     loss = sum_c a_c f(p_c)
//     dloss/dx_j = a_j h_j - p_j sum_c a_c h_c,   h_c = p_c f'(p_c) = (1 - p_c)^(gamma - 1) (gamma p_c log p_c - (1 - p_c))
// log p_c = x_c - lse as in cross-entropy; 1 - p_c = -expm1(log p_c), accurate when p_c is near 1 (the
// confident predictions the focal term is about) for the log p it is given: 1 - exp(log p) would add an
// error of an ulp of 1. What remains is cross-entropy's own limit, the absolute error of log p = x - lse
// (a few ulp of |lse|, lse being rounded to the accumulation dtype), which bounds the relative accuracy
// of 1 - p once 1 - p is below it. Both terms of h are <= 0, so h has no cancellation; at p_c == 1, h is
// its limit: 0 for gamma > 0, -1 for gamma == 0.
// For class-index targets without smoothing only p_y enters, and the gradient is cross-entropy's shape
// times a per-position factor: dx_j = -w_y h_y p_j (j != y), dx_y = w_y h_y (1 - p_y).
#pragma once

#include "kernels.h"

#include <cstdint>

namespace xent::cpu {

struct FocalArgs {
  DType dtype;
  const void* logits;  // (N, C, S) strided, `dtype`
  int64_t N, C, S;
  int64_t stride_n, stride_c, stride_s;
  const int64_t* target;  // class indices, (N * S) contiguous, validated (in range or ignore_index); or null
  int64_t ignore_index;
  const void* prob_target;  // (N, C, S) strided, `dtype`, or null
  int64_t target_stride_n, target_stride_c, target_stride_s;
  const void* weight;  // (C) acc_t, or null
  double label_smoothing;
  double gamma;  // >= 0
  // Forward outputs, (N * S) acc_t: lse and unreduced loss of every position (0 and 0 when ignored).
  void* lse;
  void* loss;
  // Backward: upstream gradient per position (N * S) acc_t, already divided by the mean's denominator, or
  // the single value grad_scale_value when grad_scale_per_position is null.
  const void* grad_scale_per_position;
  double grad_scale_value;
  const void* lse_in;  // (N * S) acc_t
  void* grad;          // (N, C, S) strided, `dtype`
  int64_t grad_stride_n, grad_stride_c, grad_stride_s;
  // forward_grad_rows: the gradient rows are contiguous (S == 1, grad_stride_c == 1, grad_stride_n == C)
  // and too large to stay in cache: write them with non-temporal stores.
  bool stream_grad;
};

struct FocalKernelTable {
  const char* name;
  // Rows layout, rows [row_begin, row_end).
  void (*forward_rows)(const FocalArgs&, int64_t row_begin, int64_t row_end);
  void (*backward_rows)(const FocalArgs&, int64_t row_begin, int64_t row_end);
  // The fused forward + gradient (grad_scale_value; forward outputs and grad as above) of class-index
  // targets without label smoothing: both kernels' results, bit for bit, in one pass over each row.
  void (*forward_grad_rows)(const FocalArgs&, int64_t row_begin, int64_t row_end);
  // Lanes layout, positions [p_begin, p_end).
  void (*forward_lanes)(const FocalArgs&, int64_t p_begin, int64_t p_end);
  void (*backward_lanes)(const FocalArgs&, int64_t p_begin, int64_t p_end);
};

const FocalKernelTable* focal_kernels_avx512();
const FocalKernelTable* focal_kernels_avx512_bf16();  // the AVX-512 kernels with AVX512_BF16 (isa.h)
const FocalKernelTable* focal_kernels_avx2();
const FocalKernelTable* focal_kernels_generic();

} // namespace xent::cpu
