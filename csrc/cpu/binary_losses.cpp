// CPU binary losses: binary_cross_entropy, binary_cross_entropy_with_logits and sigmoid_focal_loss.
// Argument checks, operand description (Note [Binary loss operands] in binary_loss_kernels.h), threading and
// reductions around the per-ISA kernels of binary_loss_kernels_impl.h.
//
// Layout: the kernels read input and target as flat contiguous arrays (an elementwise loss has no
// better order to exploit), so a non-contiguous input or target is copied to contiguous memory first;
// a merely misaligned one (storage offset 1) is used as is. The unreduced loss and the gradient are
// contiguous, as the fake kernels in xent/_binary_ops.py promise. The `*_fwd_grad` ops (Note [Fused
// gradient], xent/_fused.py) run the reduced forward and the gradient for grad_loss = 1 in one pass.
#include "binary_loss_ops.h"
#include "binary_losses_host.h"
#include "cpu/grad_buffer.h"
#include "cpu/isa.h"

#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace xent::cpu {
namespace {

// Blocks per parallel task: 16 x 2048 elements, so small inputs stay on one thread.
constexpr int64_t kGrainBlocks = 16;

const BinaryLossKernels& binary_kernels() { return kernel_tables().binary; }

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t last_dim(const at::Tensor& input) { return input.dim() > 0 ? input.size(-1) : 1; }

std::vector<int64_t> contiguous_strides(c10::IntArrayRef sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t s = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = s;
    s *= std::max<int64_t>(sizes[d], 1);
  }
  return strides;
}

// ---------------------------------------------------------------------------------------------------
// Checks: shared with the CUDA ops (csrc/binary_losses_host.h).

void check_inputs(const BinaryLossOptions& o, const at::Tensor& input, const at::Tensor& target,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight) {
  check_binary_loss_inputs(binary_loss_name(o.kind), o.kind == BinaryLossKind::bce, input, target, weight, pos_weight,
                           o.reduction);
  TORCH_CHECK(input.device().is_cpu(), "xent: the CPU kernel got input on ", input.device());
}

// ---------------------------------------------------------------------------------------------------
// Operands (Note [Binary loss operands]).

// `t`, broadcastable to the input (checked), as a kernel operand; `keep` holds the buffers it points to.
BinaryOperand describe_operand(const at::Tensor& t, const at::Tensor& input, std::vector<at::Tensor>& keep) {
  BinaryOperand op;
  if (!t.defined() || input.numel() == 0) return op;
  const at::ScalarType acc = acc_of(input.scalar_type());
  if (t.numel() == 1) {
    op.kind = BinaryOperand::scalar;
    op.value = t.item<double>();  // a CPU tensor: no device synchronization
    return op;
  }
  // t's sizes right-aligned against the input's (missing leading dims are 1).
  const int64_t d = input.dim(), offset = d - t.dim();
  auto size_at = [&](int64_t k) { return k < offset ? int64_t(1) : t.size(k - offset); };
  const int64_t C = last_dim(input);
  bool leading_ones = true, leading_match = true;
  for (int64_t k = 0; k + 1 < d; ++k) {
    leading_ones = leading_ones && size_at(k) == 1;
    leading_match = leading_match && size_at(k) == input.size(k);
  }
  if (leading_ones && size_at(d - 1) == C) {
    // Per class: tiled so that a block never wraps (C + kBinaryBlock values, value c at c, c + C, ...).
    const at::Tensor v = t.reshape({C}).to(acc);
    const int64_t reps = (C + kBinaryBlock + C - 1) / C;
    at::Tensor tiled = v.repeat({reps}).narrow(0, 0, C + kBinaryBlock).contiguous();
    keep.push_back(tiled);
    op.kind = BinaryOperand::periodic;
    op.data = tiled.const_data_ptr();
    op.period = C;
    return op;
  }
  if (leading_match && size_at(d - 1) == 1) {
    // Per row of C elements, e.g. a per-sample (N, 1) weight.
    at::Tensor v = t.reshape({-1}).to(acc).contiguous();
    keep.push_back(v);
    op.kind = BinaryOperand::rows;
    op.data = v.const_data_ptr();
    op.period = C;
    return op;
  }
  at::Tensor full;
  if (t.sizes().equals(input.sizes()) && (t.scalar_type() == input.scalar_type() || t.scalar_type() == acc)) {
    full = t.contiguous();  // read in its own dtype: no conversion pass
  } else {
    // Any other broadcast (or dtype): materialized, input-sized, in the accumulation dtype.
    full = t.to(acc).expand(input.sizes()).contiguous();
  }
  keep.push_back(full);
  op.kind = BinaryOperand::full;
  op.data = full.const_data_ptr();
  op.dtype = kernel_dtype(full.scalar_type());
  return op;
}

// The upstream gradient of reduction='none' (the input's shape, any strides) as an operand. The backward
// of loss.sum() or loss.mean() is an expanded scalar (all strides 0), read as one value rather than
// materialized; an expanded per-class row likewise.
BinaryOperand describe_grad(const at::Tensor& grad_loss, const at::Tensor& input, std::vector<at::Tensor>& keep) {
  if (input.numel() == 0) return BinaryOperand{};
  bool all_broadcast = true, row_broadcast = input.dim() >= 1;
  for (int64_t k = 0; k < grad_loss.dim(); ++k) {
    const bool broadcast = grad_loss.size(k) == 1 || grad_loss.stride(k) == 0;
    all_broadcast = all_broadcast && broadcast;
    if (k + 1 < grad_loss.dim()) row_broadcast = row_broadcast && broadcast;
  }
  if (all_broadcast) return describe_operand(grad_loss.as_strided({}, {}), input, keep);
  if (row_broadcast) {
    return describe_operand(grad_loss.as_strided({grad_loss.size(-1)}, {grad_loss.stride(-1)}), input, keep);
  }
  return describe_operand(grad_loss, input, keep);
}

// ---------------------------------------------------------------------------------------------------
// Forward and backward.

// bce's range checks, from the kernels' per-block flags. PyTorch's CPU kernel checks every element (input
// first); report the first block that fails.
void check_range_flags(const std::vector<uint8_t>& block_flags) {
  for (uint8_t flags : block_flags) {
    TORCH_CHECK(!(flags & 1), "all elements of input should be between 0 and 1");
    TORCH_CHECK(!(flags & 2), "all elements of target should be between 0 and 1");
  }
}

// The mean or sum of the loss from its per-block sums (Note [Binary loss blocks]), as a 0-dim tensor of
// the input's dtype.
at::Tensor reduced_loss(const std::vector<double>& block_sums, int64_t reduction, int64_t numel,
                        const at::Tensor& input) {
  double total = 0;
  for (double s : block_sums) total += s;  // block order: independent of the thread count
  if (reduction == at::Reduction::Mean) total /= static_cast<double>(numel);  // 0 / 0 = NaN, as PyTorch
  return at::scalar_tensor(total, input.options());
}

struct Prepared {
  at::Tensor input, target;
  std::vector<at::Tensor> keep;  // operand buffers
  BinaryArgs args{};
  int64_t blocks = 0;
};

Prepared prepare(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& pos_weight, const BinaryLossOptions& o) {
  check_inputs(o, input, target, weight, pos_weight);
  Prepared pr;
  pr.input = input.contiguous();
  pr.target = target.contiguous();
  BinaryArgs& a = pr.args;
  a.kind = o.kind;
  a.dtype = kernel_dtype(input.scalar_type());
  a.numel = input.numel();
  a.input = pr.input.const_data_ptr();
  a.target = pr.target.const_data_ptr();
  a.weight = describe_operand(weight.value_or(at::Tensor()), pr.input, pr.keep);
  a.pos_weight = describe_operand(pos_weight.value_or(at::Tensor()), pr.input, pr.keep);
  a.alpha = o.alpha;
  a.gamma = o.gamma;
  pr.blocks = (a.numel + kBinaryBlock - 1) / kBinaryBlock;
  return pr;
}

// The ops (binary_loss_ops.h registers them): forward, the fused forward + gradient, backward.
struct BinaryLossesOnCpu {
  static at::Tensor forward(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& pos_weight, const BinaryLossOptions& o);
  static std::tuple<at::Tensor, at::Tensor> forward_grad(const at::Tensor& input, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& pos_weight,
                                                         const BinaryLossOptions& o);
  static at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                             const BinaryLossOptions& o);
};

at::Tensor BinaryLossesOnCpu::forward(const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& pos_weight, const BinaryLossOptions& o) {
  Prepared pr = prepare(input, target, weight, pos_weight, o);
  const int64_t reduction = o.reduction;
  BinaryArgs& a = pr.args;
  at::Tensor loss;
  std::vector<double> block_sums;
  std::vector<uint8_t> block_flags;
  if (reduction == at::Reduction::None) {
    loss = at::empty(input.sizes(), input.options());
    a.loss = loss.data_ptr();
  } else {
    block_sums.assign(pr.blocks, 0.0);
    a.block_sums = block_sums.data();
  }
  if (o.kind == BinaryLossKind::bce) {
    block_flags.assign(pr.blocks, 0);
    a.block_flags = block_flags.data();
  }
  const BinaryLossKernels& k = binary_kernels();
  at::parallel_for(0, pr.blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) { k.forward(a, b0, b1); });

  check_range_flags(block_flags);
  if (reduction == at::Reduction::None) return loss;
  return reduced_loss(block_sums, reduction, a.numel, input);
}

// The forward (reduction mean or sum) and the gradient for grad_loss = 1, in one pass over the input
// (Note [Fused gradient], xent/_fused.py). The loss is accumulated in the forward's block sums, so it is
// bitwise the forward op's; the gradient's scale is exactly the one backward() derives from grad_loss = 1.
std::tuple<at::Tensor, at::Tensor> BinaryLossesOnCpu::forward_grad(const at::Tensor& input, const at::Tensor& target,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& pos_weight,
                                                                   const BinaryLossOptions& o) {
  const int64_t reduction = o.reduction;
  TORCH_CHECK(reduction == at::Reduction::Mean || reduction == at::Reduction::Sum, binary_loss_name(o.kind),
              "_fwd_grad: reduction must be mean (1) or sum (2), got ", reduction);
  Prepared pr = prepare(input, target, weight, pos_weight, o);
  BinaryArgs& a = pr.args;
  at::Tensor grad = empty_grad_buffer(input.sizes(), contiguous_strides(input.sizes()), input.scalar_type());
  std::vector<double> block_sums(pr.blocks, 0.0);
  std::vector<uint8_t> block_flags;
  a.block_sums = block_sums.data();
  if (o.kind == BinaryLossKind::bce) {
    block_flags.assign(pr.blocks, 0);
    a.block_flags = block_flags.data();
  }
  if (a.numel > 0) a.grad = grad.data_ptr();
  a.grad_scale.kind = BinaryOperand::scalar;
  a.grad_scale.value = reduction == at::Reduction::Mean ? 1.0 / static_cast<double>(a.numel) : 1.0;
  const BinaryLossKernels& k = binary_kernels();
  at::parallel_for(0, pr.blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) { k.forward_grad(a, b0, b1); });

  check_range_flags(block_flags);
  return {reduced_loss(block_sums, reduction, a.numel, input), grad};
}

at::Tensor BinaryLossesOnCpu::backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& pos_weight, const BinaryLossOptions& o) {
  const int64_t reduction = o.reduction;
  Prepared pr = prepare(input, target, weight, pos_weight, o);
  check_binary_loss_grad(binary_loss_name(o.kind), grad_loss, input, reduction);
  BinaryArgs& a = pr.args;
  at::Tensor grad = empty_grad_buffer(input.sizes(), contiguous_strides(input.sizes()), input.scalar_type());
  if (a.numel == 0) return grad;
  a.grad = grad.data_ptr();
  if (reduction == at::Reduction::None) {
    a.grad_scale = describe_grad(grad_loss, pr.input, pr.keep);
  } else {
    a.grad_scale.kind = BinaryOperand::scalar;
    a.grad_scale.value = grad_loss.item<double>();  // a CPU scalar: no device synchronization
    if (reduction == at::Reduction::Mean) a.grad_scale.value /= static_cast<double>(a.numel);
  }
  const BinaryLossKernels& k = binary_kernels();
  at::parallel_for(0, pr.blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) { k.backward(a, b0, b1); });
  return grad;
}

} // namespace

TORCH_LIBRARY_IMPL(xent, CPU, m) { register_binary_losses<BinaryLossesOnCpu>(m); }

} // namespace xent::cpu
