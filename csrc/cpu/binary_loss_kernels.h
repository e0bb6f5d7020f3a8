// The CPU binary-loss kernels' interface (binary_cross_entropy, binary_cross_entropy_with_logits,
// sigmoid_focal_loss): plain structs and function pointers, no torch headers.
//
// Compiled once per instruction set with every loss's kernels (kernel_tables.h); binary_losses.cpp takes the
// table of the active one.
//
// Note [Binary loss blocks]
// -------------------------
// The losses are elementwise. The host hands the kernels contiguous input and target, viewed as flat
// arrays of `numel` elements, and splits them into fixed blocks of kBinaryBlock elements. A kernel call
// processes a range of whole blocks; every block's reduction partial (a sum in fixed order: float vector
// lanes flushed into a double every few vectors) is written to its own slot and the host adds the slots
// in block order. Block boundaries never depend on the thread count, so the reduced loss is bitwise
// identical for any number of threads.
//
// Note [Binary loss operands]
// ---------------------------
// weight, pos_weight and the upstream gradient broadcast against the input. Rather than materializing
// an input-sized tensor, the host describes each as one of a few kinds, indexed by the flat element
// index i (C = the input's last dimension):
//   one       absent: the value 1 (weight, pos_weight); the kernels treat it exactly as PyTorch treats
//             a missing tensor (pos_weight: no (pw - 1) * y term at all).
//   scalar    one value for every element (a one-element tensor, or an expanded upstream gradient).
//   periodic  value data[i % period]: a per-class vector (C) / (1, C) / (1, ..., 1, C), period = C. The
//             host stores it in the accumulation dtype, tiled to period + kBinaryBlock values, so that a
//             block starting anywhere reads data[(i0 % period) + j] without wrapping.
//   rows      value data[i / period]: one value per row of C elements, e.g. a per-sample (N, 1) weight;
//             period = C, data in the accumulation dtype.
//   full      value data[i]: an input-shaped contiguous tensor, in the input's dtype or the
//             accumulation dtype (`dtype` says which).
// Any other broadcast (e.g. a (N, 1, W) weight of a (N, H, W) input) is expanded and materialized by
// the host as a `full` operand.
#pragma once

#include "binary_loss_kind.h"
#include "cpu/dtype.h"

#include <cstdint>

namespace xent::cpu {

// Elements per block (Note [Binary loss blocks]). 2048 keeps a block's operand scratch buffers (three
// of them, up to 16 KiB each in float64) in L1/L2.
constexpr int64_t kBinaryBlock = 2048;

struct BinaryOperand {
  enum Kind : int { one = 0, scalar = 1, periodic = 2, rows = 3, full = 4 };
  Kind kind = one;
  double value = 1.0;          // scalar
  const void* data = nullptr;  // periodic / rows: acc_t; full: `dtype`
  int64_t period = 1;          // periodic / rows: C
  DType dtype = DType::f32;    // full: the input's dtype or the accumulation dtype
};

// Everything a kernel needs, by raw pointer. acc_t is double for f64 inputs, float otherwise.
struct BinaryArgs {
  BinaryLossKind kind;
  DType dtype;            // of input, target, the unreduced loss and the gradient
  int64_t numel;
  const void* input;      // (numel) contiguous, `dtype`
  const void* target;     // (numel) contiguous, `dtype`
  BinaryOperand weight;   // multiplies the whole loss (and, for focal, its cross-entropy term)
  BinaryOperand pos_weight;  // with-logits and focal: weight of the positive term, pw * y * log sigmoid(x)
  double alpha, gamma;    // focal: alpha < 0 disables the alpha weighting
  // Forward outputs: the unreduced loss (numel, `dtype`), or, when null, one sum per block (acc_t
  // summed into double) in block_sums. bce also writes block_flags[b]: bit 0 when an input of block b is
  // outside [0, 1] (or NaN), bit 1 when a target is.
  void* loss;
  double* block_sums;
  uint8_t* block_flags;
  // Backward (and forward_grad): the upstream gradient per element (already divided by numel for
  // reduction='mean') and the gradient w.r.t. the input (numel, `dtype`).
  BinaryOperand grad_scale;
  void* grad;
};

struct BinaryLossKernels {
  // Blocks [block_begin, block_end) of the forward / backward (Note [Binary loss blocks]).
  void (*forward)(const BinaryArgs&, int64_t block_begin, int64_t block_end);
  void (*backward)(const BinaryArgs&, int64_t block_begin, int64_t block_end);
  // The fused forward + gradient (Note [Fused gradient], xent/_fused.py): per block, the reduced forward's
  // block_sums (and block_flags), and the gradient for the scalar grad_scale, in one pass over the block.
  void (*forward_grad)(const BinaryArgs&, int64_t block_begin, int64_t block_end);
};

} // namespace xent::cpu
