// Every xent operator schema, in one place.
//
// Note [xent op conventions]
// ---------------------------
// * logits are (N, C) or (N, C, d1, ..., dk): the class dimension is dim 1, as in
//   torch.nn.functional.cross_entropy. Unbatched (C) inputs are unsqueezed by the Python wrapper.
// * Class-index targets are (N) or (N, d1, ..., dk), int64, int32 or uint8. Probability targets have the
//   logits' shape and dtype and go through the `*_prob_*` ops.
// * `reduction` is at::Reduction: 0 = none, 1 = mean, 2 = sum.
// * Forward ops also return `lse`, the log-sum-exp over classes for every position, shape (N, d1..dk),
//   float32 (float64 for float64 logits). The backward reuses it instead of reading the logits twice, and
//   it is a differentiable output (d lse / d logits = softmax), so z-loss and `return_lse` can build on it.
// * Options come after `*` as keyword-only arguments with defaults. New options (z_loss, logit softcap,
//   logit scale, in-place gradient, fused linear + cross-entropy, vocabulary-parallel) are appended the
//   same way, so existing callers, serialized graphs and C++ users keep working.
// * Backward ops take the forward's saved tensors explicitly and never mutate them.
//
// The same file builds two libraries: `xent` (the real CPU and CUDA kernels) and, in the test-only build
// of xent/_C_emulated, `xent_emulated`, whose CPU kernels run the CUDA device code under the SIMT
// emulator (tests/simt). Both get exactly these schemas.

#include <torch/library.h>

#ifndef XENT_OPS_NAMESPACE
#define XENT_OPS_NAMESPACE xent
#endif

TORCH_LIBRARY(XENT_OPS_NAMESPACE, m) {
  // Cross-entropy with class-index targets.
  //   logits (N, C, *), target (N, *), weight (C) or None.
  //   loss: () for mean/sum, (N, *) for none, logits' dtype. lse: (N, *), float32/float64.
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight=None, *, int reduction=1, "
      "int ignore_index=-100, float label_smoothing=0.0) -> (Tensor loss, Tensor lse)");
  //   grad_loss: the loss's shape. Returns grad_logits, the logits' shape and dtype.
  m.def(
      "cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, *, "
      "int reduction=1, int ignore_index=-100, float label_smoothing=0.0) -> Tensor grad_logits");

  //   The fused forward + gradient (see scale_grad_ below): cross_entropy_fwd's outputs and grad_logits.
  m.def(
      "cross_entropy_fwd_grad(Tensor logits, Tensor target, Tensor? weight=None, *, int reduction=1, "
      "int ignore_index=-100, float label_smoothing=0.0) -> (Tensor loss, Tensor lse, Tensor grad_logits)");

  // Cross-entropy with probability targets: target has the logits' shape (N, C, *).
  m.def(
      "cross_entropy_prob_fwd(Tensor logits, Tensor target, Tensor? weight=None, *, int reduction=1, "
      "float label_smoothing=0.0) -> (Tensor loss, Tensor lse)");
  m.def(
      "cross_entropy_prob_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, *, "
      "int reduction=1, float label_smoothing=0.0) -> Tensor grad_logits");
  m.def(
      "cross_entropy_prob_fwd_grad(Tensor logits, Tensor target, Tensor? weight=None, *, int reduction=1, "
      "float label_smoothing=0.0) -> (Tensor loss, Tensor lse, Tensor grad_logits)");

  // Negative log-likelihood: input holds log-probabilities (N, C, *), target class indices (N, *).
  //   loss: () for mean/sum, (N, *) for none. total_weight: () in the input's dtype, the mean's
  //   denominator (sum of weight[target] over non-ignored targets), saved for the backward as in ATen.
  m.def(
      "nll_loss_fwd(Tensor input, Tensor target, Tensor? weight=None, *, int reduction=1, int ignore_index=-100) "
      "-> (Tensor loss, Tensor total_weight)");
  m.def(
      "nll_loss_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor total_weight, *, "
      "int reduction=1, int ignore_index=-100) -> Tensor grad_input");

  // Binary losses, elementwise: input (*) and target of the same shape; weight broadcastable to the
  // input; pos_weight broadcastable along the last dimension (one value per class). loss: () for
  // mean/sum, the input's shape for none.
  //   binary_cross_entropy: input holds probabilities in [0, 1]; logs are clamped at -100 as in PyTorch.
  m.def("binary_cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight=None, *, int reduction=1) -> Tensor loss");
  m.def(
      "binary_cross_entropy_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, *, int reduction=1) "
      "-> Tensor grad_input");
  //   Fused forward + gradient (Note [Fused gradient]): the reduced loss and grad_input for grad_loss = 1.
  m.def(
      "binary_cross_entropy_fwd_grad(Tensor input, Tensor target, Tensor? weight=None, *, int reduction=1) "
      "-> (Tensor loss, Tensor grad_input)");
  //   binary_cross_entropy_with_logits: input holds logits.
  m.def(
      "binary_cross_entropy_with_logits_fwd(Tensor input, Tensor target, Tensor? weight=None, "
      "Tensor? pos_weight=None, *, int reduction=1) -> Tensor loss");
  m.def(
      "binary_cross_entropy_with_logits_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor? pos_weight, *, int reduction=1) -> Tensor grad_input");
  //   Fused forward + gradient (Note [Fused gradient]): the reduced loss and grad_input for grad_loss = 1.
  m.def(
      "binary_cross_entropy_with_logits_fwd_grad(Tensor input, Tensor target, Tensor? weight=None, "
      "Tensor? pos_weight=None, *, int reduction=1) -> (Tensor loss, Tensor grad_input)");
  //   sigmoid_focal_loss: torchvision.ops.sigmoid_focal_loss (alpha < 0 disables alpha weighting), with
  //   weight and pos_weight applied to its binary cross-entropy term as in binary_cross_entropy_with_logits.
  m.def(
      "sigmoid_focal_loss_fwd(Tensor input, Tensor target, Tensor? weight=None, Tensor? pos_weight=None, *, "
      "float alpha=0.25, float gamma=2.0, int reduction=0) -> Tensor loss");
  m.def(
      "sigmoid_focal_loss_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, *, "
      "float alpha=0.25, float gamma=2.0, int reduction=0) -> Tensor grad_input");
  //   Fused forward + gradient (Note [Fused gradient]): the reduced loss and grad_input for grad_loss = 1.
  m.def(
      "sigmoid_focal_loss_fwd_grad(Tensor input, Tensor target, Tensor? weight=None, Tensor? pos_weight=None, *, "
      "float alpha=0.25, float gamma=2.0, int reduction=1) -> (Tensor loss, Tensor grad_input)");

  // Softmax focal loss: sum_c w_c q_c (1 - p_c)^gamma (-log p_c), p = softmax(logits), q the (smoothed)
  // target distribution; gamma = 0 is cross_entropy's formula. Same arguments, shapes and lse as the
  // cross_entropy ops, plus gamma >= 0.
  m.def(
      "softmax_focal_loss_fwd(Tensor logits, Tensor target, Tensor? weight=None, *, float gamma=2.0, "
      "int reduction=1, int ignore_index=-100, float label_smoothing=0.0) -> (Tensor loss, Tensor lse)");
  m.def(
      "softmax_focal_loss_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, *, "
      "float gamma=2.0, int reduction=1, int ignore_index=-100, float label_smoothing=0.0) -> Tensor grad_logits");
  //   The fused forward + gradient (see scale_grad_ below): softmax_focal_loss_fwd's outputs and grad_logits.
  m.def(
      "softmax_focal_loss_fwd_grad(Tensor logits, Tensor target, Tensor? weight=None, *, float gamma=2.0, "
      "int reduction=1, int ignore_index=-100, float label_smoothing=0.0) -> (Tensor loss, Tensor lse, "
      "Tensor grad_logits)");
  m.def(
      "softmax_focal_loss_prob_fwd(Tensor logits, Tensor target, Tensor? weight=None, *, float gamma=2.0, "
      "int reduction=1, float label_smoothing=0.0) -> (Tensor loss, Tensor lse)");
  m.def(
      "softmax_focal_loss_prob_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, *, "
      "float gamma=2.0, int reduction=1, float label_smoothing=0.0) -> Tensor grad_logits");

  // Fused forward + gradient (Note [Fused gradient] in xent/_fused.py). A `*_fwd_grad` op takes its
  // `*_fwd` op's arguments (reduction mean or sum only), returns the same outputs followed by grad_input:
  // d loss / d input for grad_loss = 1, with the input's shape and dtype, computed in the forward's pass
  // over the input. The autograd formula then only has to scale it by the actual grad_loss, in place:
  //   scale_grad_: grad *= grad_loss (a one-element tensor); nothing is read or written when grad_loss is
  //   exactly 1, the usual loss.backward().
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_loss) -> ()");

  // Test and tuning hooks (leading underscore: not API).
  //   _cpu_exp: the CPU kernels' vectorized exp applied to a float32 tensor, to test its accuracy.
  m.def("_cpu_exp(Tensor x) -> Tensor");
  //   _cpu_isa: selects the CPU kernel instruction set ("avx512", "avx2", "generic"; "" keeps it) and
  //   returns the one in use. Selecting one the CPU lacks raises.
  m.def("_cpu_isa(str isa=\"\") -> str");
  //   _cpu_grad_cache: the CPU gradient-buffer cache. Sets its capacity in bytes when `capacity` >= 0
  //   (0 disables it and frees what it holds) and returns [capacity, bytes held now].
  m.def("_cpu_grad_cache(int capacity=-1) -> int[]");
#ifdef XENT_EMULATED_BUILD
  //   _simt_schedule: the emulator's warp schedule for later launches: "forward", "reverse" or "random"
  //   (seeded).
  m.def("_simt_schedule(str schedule, int seed=0) -> ()");
  //   _simt_traffic: global-memory bytes [read, written] by the device code of the last launches since the
  //   previous call (and resets the counters).
  m.def("_simt_traffic() -> int[]");
#endif
}
