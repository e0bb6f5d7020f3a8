"""Cross-entropy's ops (``cross_entropy_*`` for class-index targets, ``cross_entropy_prob_*`` for class
probabilities; schemas in csrc/ops.cpp): their entries in the op table (xent/_registrar.py) and the formulas
written with PyTorch ops: the probability target's gradient and the backward ops' own gradients (double
backward, e.g. for gradient penalties).

The forward ops return (loss, lse); lse, the per-position log-sum-exp (float32, or float64 for float64
logits), is saved for the backward op and is not differentiable. Notation: s is the upstream gradient of a
position (xent/_common.py), p = softmax(logits), eps = label_smoothing, w the class weights.
"""

import torch

from ._common import (
    check_index_target,
    check_prob_target,
    class_loss_check,
    class_weight,
    index_target_terms,
    position_count,
    position_scale,
    reduce_like_loss,
    softmax_loss_ops,
)


def _softmax_from_lse(logits, lse, keep=None):
    p = torch.exp(logits.to(lse.dtype) - lse.unsqueeze(1))
    if keep is not None:  # lse of an ignored position is 0: keep its (unused) softmax finite
        p = torch.where(keep.unsqueeze(1), p, torch.zeros_like(p))
    return p


def _index_double_backward(grad_loss, logits, target, options, saved, kw, v, needs_input_grad):
    """grad = s * (p a - b - onehot (1 - eps) w_t), with a = (1 - eps) w_t + eps W_all / C, b_c = eps w_c / C
    and keep = 0 at ignored positions. lse being a function of the logits:
    d/dlogits = s a p * (v - <p, v>); d/ds = <v, p a - b - onehot (1 - eps) w_t>."""
    (weight,), (lse,) = options, saved
    eps = kw["label_smoothing"]
    reduction = kw["reduction"]
    C = logits.shape[1]
    keep, w, w_t, onehot = index_target_terms(logits, target, weight, kw["ignore_index"])
    a = ((1 - eps) * w_t + eps * w.sum() / C * keep.to(w.dtype)).unsqueeze(1)
    denominator = w_t.sum()
    p = _softmax_from_lse(logits, lse, keep)
    v = v.to(p.dtype)
    s = position_scale(grad_loss, reduction, denominator, logits)
    pv = (p * v).sum(1, keepdim=True)
    grad_grad_loss = grad_logits = None
    if needs_input_grad[1]:
        grad_logits = (s * a * p * (v - pv)).to(logits.dtype)
    if needs_input_grad[0]:
        w_c = w.reshape([1, C] + [1] * (logits.dim() - 2))
        b = eps / C * w_c * keep.to(p.dtype).unsqueeze(1)
        dir_grad = p * a - b - onehot * ((1 - eps) * w_t).unsqueeze(1)
        per_position = (dir_grad * v).sum(1)
        grad_grad_loss = reduce_like_loss(per_position, reduction, denominator).to(grad_loss.dtype)
    return grad_grad_loss, grad_logits, None


def _prob_double_backward(grad_loss, logits, target, options, saved, kw, v, needs_input_grad):
    """grad = s * (p A - w q), A = sum_c w_c q_c, q = (1 - eps) t + eps / C:
    d/dlogits = s A p * (v - <p, v>); d/dt_j = s (1 - eps) w_j (<p, v> - v_j)."""
    (weight,), (lse,) = options, saved
    eps = kw["label_smoothing"]
    reduction = kw["reduction"]
    C = logits.shape[1]
    p = _softmax_from_lse(logits, lse)
    v = v.to(p.dtype)
    w_c = class_weight(weight, logits, p.dtype)
    q = (1 - eps) * target.to(p.dtype) + eps / C
    A = (w_c * q).sum(1, keepdim=True)
    denominator = position_count(logits)
    s = position_scale(grad_loss, reduction, denominator, logits)
    pv = (p * v).sum(1, keepdim=True)
    grad_grad_loss = grad_logits = grad_target = None
    if needs_input_grad[0]:
        per_position = ((p * A - w_c * q) * v).sum(1)
        grad_grad_loss = reduce_like_loss(per_position, reduction, denominator).to(grad_loss.dtype)
    if needs_input_grad[1]:
        grad_logits = (s * A * p * (v - pv)).to(logits.dtype)
    if needs_input_grad[2]:
        grad_target = (s * (1 - eps) * w_c * (pv - v)).to(target.dtype)
    return grad_grad_loss, grad_logits, grad_target


def _prob_target_grad(grad_loss, logits, target, options, saved, kw):
    """d loss / d target_j = -s (1 - eps) w_j log_softmax_j (differentiable)."""
    (weight,), (lse,) = options, saved
    acc = lse.dtype
    # Recomputed rather than logits - lse: lse is not differentiable, and this term must be (double backward).
    log_softmax = torch.log_softmax(logits.to(acc), 1)
    s = position_scale(grad_loss, kw["reduction"], position_count(logits), logits)
    return (-(1 - kw["label_smoothing"]) * s * class_weight(weight, logits, acc) * log_softmax).to(logits.dtype)


INDEX = softmax_loss_ops(
    "cross_entropy",
    class_loss_check(check_index_target),
    double_backward=_index_double_backward,
    fused=True,
)
PROB = softmax_loss_ops(
    "cross_entropy_prob",
    class_loss_check(check_prob_target),
    double_backward=_prob_double_backward,
    target_grad=_prob_target_grad,
    fused=True,
)
