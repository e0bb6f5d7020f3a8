// The CPU kernel of scale_grad_ (csrc/ops.cpp): the backward of a fused forward + gradient op
// (Note [Fused gradient] in xent/_fused.py) multiplies the gradient its forward computed for
// grad_loss = 1 by the actual grad_loss, in place.
//
// Why in place, and why nothing at all for grad_loss == 1: the gradient is as large as the input, and the
// usual loss.backward() passes exactly 1. Then the fused path touches the gradient only once, in the
// forward; any other value (a GradScaler's scale, 1 / accumulation steps) costs one streaming pass.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>

namespace xent::cpu {
namespace {

// Elements per task: enough that a task is worth a thread, small enough to split 1 M elements.
constexpr int64_t kScaleGrain = int64_t(1) << 16;

// g[i] = g[i] * s for i in [0, n), in acc_t (float for the 16-bit dtypes), rounded once.
template <class T, class acc_t>
void scale_dense(T* g, int64_t n, acc_t s) {
  at::parallel_for(0, n, kScaleGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) g[i] = static_cast<T>(static_cast<acc_t>(g[i]) * s);
  });
}

void scale_grad_(const at::Tensor& grad, const at::Tensor& grad_loss) {
  TORCH_CHECK(grad_loss.numel() == 1, "scale_grad_: grad_loss must have one element, got shape ", grad_loss.sizes());
  TORCH_CHECK(grad.device().is_cpu() && grad_loss.device().is_cpu(), "scale_grad_: the CPU kernel got tensors on ",
              grad.device(), " and ", grad_loss.device());
  TORCH_CHECK(grad.is_non_overlapping_and_dense(),
              "scale_grad_: grad must be dense and non-overlapping (a gradient from a *_fwd_grad op), got strides ",
              grad.strides());
  // A CPU scalar: reading it is not a device synchronization.
  const double s = grad_loss.item<double>();
  if (s == 1.0 || grad.numel() == 0) return;
  // Dense and non-overlapping: the numel elements are exactly the span that starts at data_ptr, in
  // some order, and an elementwise scale does not care which.
  const int64_t n = grad.numel();
  switch (grad.scalar_type()) {
    case at::kFloat: scale_dense(grad.data_ptr<float>(), n, static_cast<float>(s)); break;
    case at::kDouble: scale_dense(grad.data_ptr<double>(), n, s); break;
    case at::kBFloat16: scale_dense(grad.data_ptr<c10::BFloat16>(), n, static_cast<float>(s)); break;
    case at::kHalf: scale_dense(grad.data_ptr<c10::Half>(), n, static_cast<float>(s)); break;
    default: TORCH_CHECK(false, "scale_grad_: expected a float32, float64, bfloat16 or float16 gradient, got ",
                         grad.scalar_type());
  }
}

} // namespace

TORCH_LIBRARY_IMPL(xent, CPU, m) { m.impl("scale_grad_", &scale_grad_); }

} // namespace xent::cpu
