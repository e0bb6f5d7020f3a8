// Argument checks of the binary losses (binary_losses_host.h), shared by the CPU and CUDA ops.
#include "binary_losses_host.h"

#include <ATen/ExpandUtils.h>
#include <ATen/core/Reduction.h>
#include <c10/util/Exception.h>

#include <vector>

namespace xent {
namespace {

bool kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_same_device_as_input(const char* name, const at::Tensor& input, const at::Tensor& other,
                                const char* what) {
  TORCH_CHECK(other.device() == input.device(), name, ": expected ", what, " on the input's device ",
              input.device(), ", got ", other.device());
}

// `t` (weight or pos_weight) must broadcast to the input's shape without enlarging it, as PyTorch's
// in-place `loss.mul_(weight)` requires.
void check_broadcast(const char* name, const at::Tensor& input, const std::optional<at::Tensor>& t,
                     const char* what) {
  if (!t.has_value() || !t->defined()) return;
  check_same_device_as_input(name, input, *t, what);
  TORCH_CHECK(!at::isComplexType(t->scalar_type()), name, ": expected a real ", what, ", got ", t->scalar_type());
  const std::vector<int64_t> shape = at::infer_size(t->sizes(), input.sizes());  // raises on a mismatch
  TORCH_CHECK(c10::IntArrayRef(shape).equals(input.sizes()), "output with shape ", input.sizes(),
              " doesn't match the broadcast shape ", c10::IntArrayRef(shape));
}

} // namespace

void check_binary_loss_inputs(const char* name, bool is_bce, const at::Tensor& input, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                              int64_t reduction) {
  TORCH_CHECK_NOT_IMPLEMENTED(kernel_float(input.scalar_type()), "\"", name, "\" not implemented for '",
                              input.scalar_type(), "'");
  if (is_bce) {
    TORCH_CHECK_VALUE(target.sizes().equals(input.sizes()), "Using a target size (", target.sizes(),
                      ") that is different to the input size (", input.sizes(),
                      ") is deprecated. Please ensure they have the same size.");
  } else {
    TORCH_CHECK_VALUE(target.sizes().equals(input.sizes()), "Target size (", target.sizes(),
                      ") must be the same as input size (", input.sizes(), ")");
  }
  // The ops take one dtype; xent.functional applies PyTorch's type promotion before calling them.
  TORCH_CHECK(target.scalar_type() == input.scalar_type(), "Found dtype ", target.scalar_type(), " but expected ",
              input.scalar_type());
  check_same_device_as_input(name, input, target, "target");
  check_broadcast(name, input, weight, "weight");
  check_broadcast(name, input, pos_weight, "pos_weight");
  TORCH_CHECK_VALUE(reduction == at::Reduction::None || reduction == at::Reduction::Mean ||
                        reduction == at::Reduction::Sum,
                    name, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

void check_binary_loss_grad(const char* name, const at::Tensor& grad_loss, const at::Tensor& input,
                            int64_t reduction) {
  check_same_device_as_input(name, input, grad_loss, "grad_loss");
  TORCH_CHECK(kernel_float(grad_loss.scalar_type()), name, " backward: expected a floating grad_loss, got ",
              grad_loss.scalar_type());
  if (reduction == at::Reduction::None) {
    TORCH_CHECK(grad_loss.sizes().equals(input.sizes()), name, " backward: expected grad_loss of shape ",
                input.sizes(), ", got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.dim() == 0, name, " backward: expected a 0-d grad_loss, got ", grad_loss.sizes());
  }
}

} // namespace xent
