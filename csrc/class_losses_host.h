// Host-side argument checks, shapes and options of the losses over a class dimension (cross-entropy,
// softmax focal loss, NLL), shared by their CPU and CUDA ops.
//
// Every kernel sees the logits as a 3-d view (N, C, S): N batch rows, C classes, S = d1 * ... * dk spatial
// positions (S = 1 for 2-d logits). A "position" is one (n, s) pair; there are N * S of them and each has
// one loss and one lse. Positions are numbered p = n * S + s, which is also their index in the contiguous
// (N, *) target, loss and lse tensors.
#pragma once

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace xent {

// The options of a softmax-loss op (cross-entropy, softmax focal), gathered from its schema's arguments
// (csrc/ops.cpp) by softmax_loss_ops.h.
struct SoftmaxLossOptions {
  bool prob = false;         // probability targets (the `*_prob_*` ops); else class indices
  int64_t reduction = 1;     // at::Reduction
  int64_t ignore_index = -100;
  double label_smoothing = 0;
  double gamma = 0;          // softmax focal loss: the focusing exponent
};

// A (N, C, S) strided view of a tensor of shape (N, C, d1, ..., dk), in elements.
struct NCSView {
  int64_t N = 0, C = 0, S = 1;
  int64_t stride_n = 0, stride_c = 0, stride_s = 0;
};

// The (N, C, S) view of `t` if its trailing dims d1..dk collapse into one strided dim, else nullopt.
std::optional<NCSView> ncs_view(const at::Tensor& t);

// Strides (in elements) for a new tensor shaped like `like`: the same strides when `like` is
// non-overlapping and dense (so channels-last and transposed layouts are kept and the kernels stream both
// tensors in the same order), contiguous strides otherwise.
std::vector<int64_t> dense_strides_like(const at::Tensor& like);

// t with contiguous strides: t.contiguous(), except that an empty tensor, which contiguous() returns as it
// is whatever its strides (it counts as contiguous), gets a new one (there is nothing to copy). The
// kernels' layout plans rely on the strides.
at::Tensor contiguous_strides(const at::Tensor& t);

// A 'mean' reduction: total / denominator (the summed weights w_t of the non-ignored class-index targets,
// or the number of positions); the gradient's scale is mean_of(grad_loss, ...) likewise. PyTorch's
// label-smoothed cross_entropy takes its mean as an NLL mean plus a smoothing term over the same
// denominator, so when that is 0 (every target weighs 0, or all are ignored) its NLL part is 0 / 0 = NaN
// and so is the result, where our one total over 0 would be inf: with label_smoothing > 0 a zero
// denominator gives NaN. (Without smoothing total / 0 is already PyTorch's NLL mean, NaN or +-inf.)
inline double mean_of(double total, double denominator, double label_smoothing) {
  return denominator == 0 && label_smoothing > 0 ? std::nan("") : total / denominator;
}

// Checks shared by every cross-entropy op; the messages and exception types follow PyTorch's
// (ValueError for a batch mismatch, IndexError for an out-of-range target is raised by the kernels).
void check_logits(const at::Tensor& logits, const char* op);
void check_index_target(const at::Tensor& logits, const at::Tensor& target);
void check_prob_target(const at::Tensor& logits, const at::Tensor& target);
void check_weight(const at::Tensor& logits, const std::optional<at::Tensor>& weight);
void check_reduction(int64_t reduction);
void check_label_smoothing(double label_smoothing);
void check_same_device(const at::Tensor& logits, const at::Tensor& other, const char* name);
// gamma of the softmax focal loss: finite and >= 0 (ValueError).
void check_gamma(double gamma);
// Every check above of a softmax-loss op's arguments; `op` names the loss in messages ("cross_entropy",
// "softmax_focal_loss"), `has_gamma` says whether options.gamma is one of them.
void check_softmax_loss_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const SoftmaxLossOptions& options,
                             bool has_gamma);
// Every check of an NLL op's arguments; the backward's grad_loss (the loss's shape) and total_weight (one
// element), on the input's device.
void check_nll_loss_args(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t reduction);
void check_nll_loss_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& input,
                                    const at::Tensor& total_weight, int64_t reduction);
// grad_loss must have the forward loss's shape; lse must be (N, *) in the accumulation dtype.
void check_backward_inputs(
    const at::Tensor& grad_loss,
    const at::Tensor& logits,
    const at::Tensor& lse,
    int64_t reduction);

// The dtype of lse and of all accumulation: float64 for float64 logits, float32 otherwise.
at::ScalarType acc_dtype(at::ScalarType logits_dtype);

// Sizes of the per-position tensors (loss with reduction=none, lse): logits' sizes without dim 1.
std::vector<int64_t> position_sizes(const at::Tensor& logits);

// Weight as a contiguous (C) tensor in the accumulation dtype, or an undefined tensor.
at::Tensor weight_for_kernel(const at::Tensor& logits, const std::optional<at::Tensor>& weight);

} // namespace xent
