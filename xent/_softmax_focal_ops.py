"""The softmax focal loss' ops (``softmax_focal_loss_*`` for class-index targets,
``softmax_focal_loss_prob_*`` for class probabilities; schemas in csrc/ops.cpp): their entries in the op
table (xent/_registrar.py), the gamma check, and the formulas written with PyTorch ops.

The loss of a position with target distribution q (see csrc/cpu/softmax_focal_kernels_impl.h, Note [Focal loss
formula]) is sum_c w_c q_c f(p_c), f(p) = -(1 - p)^gamma log p, p = softmax(logits). The forward ops
return (loss, lse) like the cross-entropy ops; lse is saved for the backward op and not differentiable.

Double backward (the backward ops' own gradient) recomputes the gradient with PyTorch ops from the saved
inputs and differentiates that: exact, but it costs a few passes of PyTorch ops, and a third derivative is
not supported (it raises).
"""

import functools
import math

import torch

from ._common import (
    acc_dtype,
    check_index_target,
    check_prob_target,
    class_index_onehot,
    class_loss_check,
    class_weight,
    position_count,
    position_scale,
    softmax_loss_ops,
)


def check_gamma(gamma: float, caller: str = "softmax_focal_loss") -> None:
    """gamma, the focusing exponent, is a finite number >= 0 (ValueError otherwise)."""
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"{caller}: gamma must be a finite number >= 0, got {gamma}")


# ------------------------------------------------------------------------------------------------
# The formulas with PyTorch ops (target gradient, double backward).


def _focal_terms(log_p, gamma):
    """p, 1 - p, f = -(1 - p)^gamma log p and h = p f'(p), differentiable (see the C++ Note [Focal loss
    formula]); h at p == 1 is its limit (0 for gamma > 0, -1 for gamma == 0)."""
    p = torch.exp(log_p)
    om = -torch.expm1(log_p)
    at_one = om == 0
    om_safe = torch.where(at_one, torch.ones_like(om), om)  # keeps om^(gamma - 1) and its derivative finite
    pw_m1 = om_safe ** (gamma - 1)
    f = -(pw_m1 * om) * log_p
    h = pw_m1 * (gamma * p * log_p - om)
    limit = -1.0 if gamma == 0 else 0.0
    h = torch.where(at_one, torch.full_like(h, limit), h)
    return p, om, f, h


def _target_distribution(logits, target, weight, kw, prob):
    """(a = w q as (N, C, *), the mean's denominator, keep mask (N, 1, *) or None), acc dtype."""
    acc = acc_dtype(logits.dtype)
    eps = kw["label_smoothing"]
    C = logits.shape[1]
    w_c = class_weight(weight, logits, acc)
    if prob:
        q = (1 - eps) * target.to(acc) + eps / C
        return w_c * q, position_count(logits), None
    keep, _, onehot = class_index_onehot(target, kw["ignore_index"], C, acc)
    keep_c = keep.unsqueeze(1).to(acc)
    q = ((1 - eps) * onehot + eps / C) * keep_c
    w_t = (w_c * onehot).sum(1) * keep.to(acc)
    return w_c * q, w_t.sum(), keep_c


def _focal_grad_reference(grad_loss, logits, target, weight, kw, prob):
    """d loss / d logits = s (a_j h_j - p_j sum_c a_c h_c) with PyTorch ops (acc dtype), differentiable in
    grad_loss, logits and (probability) target."""
    acc = acc_dtype(logits.dtype)
    log_p = torch.log_softmax(logits.to(acc), 1)
    p, _, _, h = _focal_terms(log_p, kw["gamma"])
    a, denominator, keep_c = _target_distribution(logits, target, weight, kw, prob)
    ah = a * h
    grad = ah - p * ah.sum(1, keepdim=True)
    if keep_c is not None:
        grad = grad * keep_c
    return position_scale(grad_loss, kw["reduction"], denominator, logits) * grad


def _prob_target_grad(grad_loss, logits, target, options, saved, kw):
    """d loss / d t_c = s (1 - eps) w_c f(p_c), from the logits with PyTorch ops (differentiable)."""
    (weight,) = options
    acc = acc_dtype(logits.dtype)
    # Recomputed rather than logits - lse: lse is not differentiable, and this term must be (double backward).
    log_p = torch.log_softmax(logits.to(acc), 1)
    _, _, f, _ = _focal_terms(log_p, kw["gamma"])
    s = position_scale(grad_loss, kw["reduction"], position_count(logits), logits)
    return ((1 - kw["label_smoothing"]) * s * class_weight(weight, logits, acc) * f).to(logits.dtype)


def _double_backward(grad_loss, logits, target, options, saved, kw, v, needs_input_grad, *, prob):
    """Gradients of the backward op's output (grad_logits) against v, through _focal_grad_reference."""
    (weight,) = options
    wanted = [needs_input_grad[0], needs_input_grad[1], prob and needs_input_grad[2]]
    with torch.enable_grad():
        gl = grad_loss.detach().requires_grad_(wanted[0])
        x = logits.detach().requires_grad_(wanted[1])
        t = target.detach().requires_grad_(wanted[2]) if prob else target
        inputs = [i for i, want in zip((gl, x, t), wanted) if want]
        if not inputs:
            return None, None, None
        grad = _focal_grad_reference(gl, x, t, weight, kw, prob)
        found = torch.autograd.grad(grad, inputs, v.to(grad.dtype), allow_unused=True)
    found = iter(found)
    out = []
    for tensor, want in zip((grad_loss, logits, target), wanted):
        g = next(found) if want else None
        out.append(None if g is None else g.to(tensor.dtype))
    return tuple(out)


def _check_gamma_keyword(kw):
    check_gamma(kw["gamma"])


INDEX = softmax_loss_ops(
    "softmax_focal_loss",
    class_loss_check(check_index_target, _check_gamma_keyword),
    double_backward=functools.partial(_double_backward, prob=False),
    fused=True,
)
PROB = softmax_loss_ops(
    "softmax_focal_loss_prob",
    class_loss_check(check_prob_target, _check_gamma_keyword),
    double_backward=functools.partial(_double_backward, prob=True),
    target_grad=_prob_target_grad,
)
