// Which binary loss: a plain code shared by the host ops and the CPU kernels (no torch headers).
#pragma once

namespace xent {

enum class BinaryLossKind : int { bce = 0, bce_with_logits = 1, sigmoid_focal = 2 };

// The PyTorch function a binary loss mirrors, for messages. (Internal linkage: the per-ISA translation
// units include this header, Note [Per-ISA headers] in cpu/simd/vec.h.)
namespace {
constexpr const char* binary_loss_name(BinaryLossKind kind) {
  return kind == BinaryLossKind::bce               ? "binary_cross_entropy"
         : kind == BinaryLossKind::bce_with_logits ? "binary_cross_entropy_with_logits"
                                                   : "sigmoid_focal_loss";
}
} // namespace

} // namespace xent
