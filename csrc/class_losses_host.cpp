#include "class_losses_host.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

namespace xent {

std::optional<NCSView> ncs_view(const at::Tensor& t) {
  NCSView v;
  v.N = t.size(0);
  v.C = t.size(1);
  v.stride_n = t.stride(0);
  v.stride_c = t.stride(1);
  // Collapse d1..dk: walking from the innermost dim outwards, each dim of size > 1 must sit exactly
  // `previous extent` elements apart. Size-1 dims have meaningless strides and are skipped.
  int64_t S = 1;
  int64_t inner_stride = 1;
  bool have_inner = false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    const int64_t size = t.size(d);
    S *= size;
    if (size == 1) continue;
    if (!have_inner) {
      inner_stride = t.stride(d);
      have_inner = true;
    } else if (t.stride(d) != inner_stride * (S / size)) {
      return std::nullopt;
    }
  }
  v.S = S;
  v.stride_s = have_inner ? inner_stride : 1;
  return v;
}

at::Tensor contiguous_strides(const at::Tensor& t) {
  return t.numel() == 0 ? at::empty(t.sizes(), t.options()) : t.contiguous();
}

std::vector<int64_t> dense_strides_like(const at::Tensor& like) {
  if (like.is_non_overlapping_and_dense()) return like.strides().vec();
  std::vector<int64_t> strides(like.dim());
  int64_t s = 1;
  for (int64_t d = like.dim() - 1; d >= 0; --d) {
    strides[d] = s;
    s *= std::max<int64_t>(like.size(d), 1);
  }
  return strides;
}

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(
      logits.dim() >= 2,
      op, ": expected logits of shape (N, C) or (N, C, d1, ..., dk), got a ", logits.dim(), "-d tensor");
  // NotImplementedError, as PyTorch's kernels raise for an unsupported dtype.
  TORCH_CHECK_NOT_IMPLEMENTED(
      at::isFloatingType(logits.scalar_type()) &&
          (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble ||
           logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kHalf),
      op, ": expected float32, float64, bfloat16 or float16 logits, got ", logits.scalar_type());
}

void check_index_target(const at::Tensor& logits, const at::Tensor& target) {
  const auto tt = target.scalar_type();
  TORCH_CHECK(
      tt == at::kLong || tt == at::kInt || tt == at::kByte,
      "cross_entropy: expected class-index targets of dtype int64, int32 or uint8, got ", tt,
      " (probability targets must have the logits' shape ", logits.sizes(), ")");
  TORCH_CHECK_VALUE(
      target.dim() >= 1 && target.size(0) == logits.size(0),
      "Expected input batch_size (", logits.size(0), ") to match target batch_size (",
      target.dim() >= 1 ? target.size(0) : 0, ").");
  const auto expected = position_sizes(logits);
  TORCH_CHECK(
      target.sizes().equals(expected),
      "cross_entropy: expected target size ", c10::IntArrayRef(expected), ", got ", target.sizes());
  check_same_device(logits, target, "target");
}

void check_prob_target(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(
      target.sizes().equals(logits.sizes()),
      "cross_entropy: probability targets must have the logits' shape ", logits.sizes(), ", got ",
      target.sizes());
  TORCH_CHECK(
      target.scalar_type() == logits.scalar_type(),
      "cross_entropy: expected probability targets of the logits' dtype ", logits.scalar_type(), ", got ",
      target.scalar_type());
  check_same_device(logits, target, "target");
}

void check_weight(const at::Tensor& logits, const std::optional<at::Tensor>& weight) {
  if (!weight.has_value() || !weight->defined()) return;
  const int64_t C = logits.size(1);
  TORCH_CHECK(
      weight->dim() == 1 && weight->numel() == C,
      "weight tensor should be defined either for all ", C,
      " classes or no classes but got weight tensor of shape: ", weight->sizes());
  TORCH_CHECK(
      weight->scalar_type() == logits.scalar_type(),
      "cross_entropy: expected weight of the logits' dtype ", logits.scalar_type(), ", got ",
      weight->scalar_type());
  check_same_device(logits, *weight, "weight");
}

void check_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(
      reduction == at::Reduction::None || reduction == at::Reduction::Mean ||
          reduction == at::Reduction::Sum,
      "cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

void check_label_smoothing(double label_smoothing) {
  TORCH_CHECK(
      label_smoothing >= 0.0 && label_smoothing <= 1.0,
      "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
}

void check_gamma(double gamma) {
  TORCH_CHECK_VALUE(gamma >= 0.0 && std::isfinite(gamma), "softmax_focal_loss: gamma must be a finite number >= 0, got ",
                    gamma);
}

void check_softmax_loss_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const SoftmaxLossOptions& options,
                             bool has_gamma) {
  check_logits(logits, op);
  if (options.prob) check_prob_target(logits, target);
  else check_index_target(logits, target);
  check_weight(logits, weight);
  check_reduction(options.reduction);
  check_label_smoothing(options.label_smoothing);
  if (has_gamma) check_gamma(options.gamma);
}

void check_nll_loss_args(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t reduction) {
  check_logits(input, "nll_loss");
  check_index_target(input, target);
  check_weight(input, weight);
  check_reduction(reduction);
}

void check_nll_loss_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& input,
                                    const at::Tensor& total_weight, int64_t reduction) {
  check_same_device(input, grad_loss, "grad_loss");
  check_same_device(input, total_weight, "total_weight");
  const auto positions = position_sizes(input);
  if (reduction == at::Reduction::None) {
    TORCH_CHECK(grad_loss.sizes().equals(positions), "nll_loss backward: expected grad_loss of shape ",
                c10::IntArrayRef(positions), ", got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.dim() == 0, "nll_loss backward: expected a 0-d grad_loss, got ", grad_loss.sizes());
  }
  TORCH_CHECK(total_weight.numel() == 1, "nll_loss backward: expected a one-element total_weight");
}

void check_same_device(const at::Tensor& logits, const at::Tensor& other, const char* name) {
  TORCH_CHECK(
      other.device() == logits.device(),
      "cross_entropy: expected ", name, " on the logits' device ", logits.device(), ", got ", other.device());
}

void check_backward_inputs(
    const at::Tensor& grad_loss,
    const at::Tensor& logits,
    const at::Tensor& lse,
    int64_t reduction) {
  check_same_device(logits, grad_loss, "grad_loss");
  check_same_device(logits, lse, "lse");
  const auto positions = position_sizes(logits);
  if (reduction == at::Reduction::None) {
    TORCH_CHECK(
        grad_loss.sizes().equals(positions),
        "cross_entropy backward: expected grad_loss of shape ", c10::IntArrayRef(positions), ", got ",
        grad_loss.sizes());
  } else {
    TORCH_CHECK(
        grad_loss.dim() == 0, "cross_entropy backward: expected a 0-d grad_loss, got ", grad_loss.sizes());
  }
  TORCH_CHECK(
      lse.sizes().equals(positions) && lse.scalar_type() == acc_dtype(logits.scalar_type()),
      "cross_entropy backward: expected lse of shape ", c10::IntArrayRef(positions), " and dtype ",
      acc_dtype(logits.scalar_type()), ", got ", lse.sizes(), " ", lse.scalar_type());
}

at::ScalarType acc_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<int64_t> position_sizes(const at::Tensor& logits) {
  std::vector<int64_t> sizes;
  sizes.reserve(logits.dim() - 1);
  sizes.push_back(logits.size(0));
  for (int64_t d = 2; d < logits.dim(); ++d) sizes.push_back(logits.size(d));
  return sizes;
}

at::Tensor weight_for_kernel(const at::Tensor& logits, const std::optional<at::Tensor>& weight) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  return weight->to(acc_dtype(logits.scalar_type())).contiguous();
}

} // namespace xent
