"""Fake kernels and autograd formulas of the softmax focal loss operators (schemas in csrc/ops.cpp).

The loss of a position with target distribution q (see csrc/cpu/focal_kernels.h, Note [Focal loss
formula]) is sum_c w_c q_c f(p_c), f(p) = -(1 - p)^gamma log p, p = softmax(logits). The forward ops
return (loss, lse) like the cross-entropy ops; lse is saved for the backward op and not differentiable.

Double backward (the backward ops' own gradient) recomputes the gradient with PyTorch ops from the saved
inputs and differentiates that: exact, but it costs a few passes of PyTorch ops, and a third derivative is
not supported (it raises).
"""

import math

import torch

from . import _fused, _ops
from ._ops import (
    REDUCTION_MEAN,
    REDUCTION_SUM,
    _check_common,
    _check_devices,
    _check_index_target,
    _check_prob_target,
    _fake_forward,
    _fake_grad,
    _position_count,
    _upstream_scale,
    acc_dtype,
)


def _check_gamma(gamma):
    torch._check_value(
        gamma >= 0 and math.isfinite(gamma),
        lambda: f"softmax_focal_loss: gamma must be a finite number >= 0, got {gamma}",
    )


def _register_fakes(ns):
    @torch.library.register_fake(f"{ns}::softmax_focal_loss_fwd")
    def _(logits, target, weight=None, *, gamma=2.0, reduction=1, ignore_index=-100, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_gamma(gamma)
        _check_devices(logits, target, weight)
        _check_index_target(logits, target)
        return _fake_forward(logits, reduction)

    @torch.library.register_fake(f"{ns}::softmax_focal_loss_bwd")
    def _(grad_loss, logits, target, weight, lse, *, gamma=2.0, reduction=1, ignore_index=-100, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_gamma(gamma)
        _check_devices(logits, grad_loss, target, weight, lse)
        _check_index_target(logits, target)
        return _fake_grad(logits)

    @torch.library.register_fake(f"{ns}::softmax_focal_loss_fwd_grad")
    def _(logits, target, weight=None, *, gamma=2.0, reduction=1, ignore_index=-100, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_gamma(gamma)
        _check_devices(logits, target, weight)
        _check_index_target(logits, target)
        torch._check(
            reduction in (REDUCTION_MEAN, REDUCTION_SUM),
            lambda: f"softmax_focal_loss_fwd_grad: reduction must be mean (1) or sum (2), got {reduction}",
        )
        return _fake_forward(logits, reduction) + (_fake_grad(logits),)

    @torch.library.register_fake(f"{ns}::softmax_focal_loss_prob_fwd")
    def _(logits, target, weight=None, *, gamma=2.0, reduction=1, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_gamma(gamma)
        _check_devices(logits, target, weight)
        _check_prob_target(logits, target)
        return _fake_forward(logits, reduction)

    @torch.library.register_fake(f"{ns}::softmax_focal_loss_prob_bwd")
    def _(grad_loss, logits, target, weight, lse, *, gamma=2.0, reduction=1, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_gamma(gamma)
        _check_devices(logits, grad_loss, target, weight, lse)
        _check_prob_target(logits, target)
        return _fake_grad(logits)


# ------------------------------------------------------------------------------------------------
# The formulas with PyTorch ops (target gradient, double backward).


def _class_weight(weight, logits, dtype):
    """w as (1, C, 1, ...) in `dtype` (ones without weight)."""
    C = logits.shape[1]
    shape = [1, C] + [1] * (logits.dim() - 2)
    if weight is None:
        return torch.ones(shape, dtype=dtype, device=logits.device)
    return weight.to(dtype).reshape(shape)


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
    eps = kw.get("label_smoothing", 0.0)
    C = logits.shape[1]
    w_c = _class_weight(weight, logits, acc)
    if prob:
        q = (1 - eps) * target.to(acc) + eps / C
        return w_c * q, _position_count(logits), None
    keep = target != kw.get("ignore_index", -100)
    safe_target = torch.where(keep, target, torch.zeros_like(target)).long()
    onehot = torch.nn.functional.one_hot(safe_target, C).to(acc).movedim(-1, 1)
    keep_c = keep.unsqueeze(1).to(acc)
    q = ((1 - eps) * onehot + eps / C) * keep_c
    w_t = (w_c * onehot).sum(1) * keep.to(acc)
    return w_c * q, w_t.sum(), keep_c


def _focal_grad_reference(grad_loss, logits, target, weight, kw, prob):
    """d loss / d logits = s (a_j h_j - p_j sum_c a_c h_c) with PyTorch ops (acc dtype), differentiable in
    grad_loss, logits and (probability) target."""
    gamma = kw.get("gamma", 2.0)
    reduction = kw.get("reduction", REDUCTION_MEAN)
    acc = acc_dtype(logits.dtype)
    log_p = torch.log_softmax(logits.to(acc), 1)
    p, _, _, h = _focal_terms(log_p, gamma)
    a, denominator, keep_c = _target_distribution(logits, target, weight, kw, prob)
    ah = a * h
    grad = ah - p * ah.sum(1, keepdim=True)
    if keep_c is not None:
        grad = grad * keep_c
    return _upstream_scale(grad_loss, reduction, denominator, logits) * grad


def _prob_target_grad(grad_loss, logits, weight, kw):
    """d loss / d t_c = s (1 - eps) w_c f(p_c), from the logits with PyTorch ops (differentiable)."""
    eps = kw.get("label_smoothing", 0.0)
    reduction = kw.get("reduction", REDUCTION_MEAN)
    acc = acc_dtype(logits.dtype)
    # Recomputed rather than logits - lse: lse is not differentiable, and this term must be (double backward).
    log_p = torch.log_softmax(logits.to(acc), 1)
    _, _, f, _ = _focal_terms(log_p, kw.get("gamma", 2.0))
    s = _upstream_scale(grad_loss, reduction, _position_count(logits), logits)
    return ((1 - eps) * s * _class_weight(weight, logits, acc) * f).to(logits.dtype)


def _double_backward(ctx, v, prob):
    """Gradients of the backward op's output (grad_logits) against v, through _focal_grad_reference."""
    grad_loss, logits, target, weight, _lse = ctx.saved_tensors
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], prob and ctx.needs_input_grad[2]]
    with torch.enable_grad():
        gl = grad_loss.detach().requires_grad_(wanted[0])
        x = logits.detach().requires_grad_(wanted[1])
        t = target.detach().requires_grad_(wanted[2]) if prob else target
        inputs = [i for i, want in zip((gl, x, t), wanted) if want]
        if not inputs:
            return None, None, None, None, None
        grad = _focal_grad_reference(gl, x, t, weight, ctx.kw, prob)
        found = torch.autograd.grad(grad, inputs, v.to(grad.dtype), allow_unused=True)
    found = iter(found)
    out = []
    for tensor, want in zip((grad_loss, logits, target), wanted):
        g = next(found) if want else None
        out.append(None if g is None else g.to(tensor.dtype))
    return out[0], out[1], out[2], None, None


def _register_autograd(ns):
    ops = getattr(torch.ops, ns)

    # ---- class-index targets ----
    def setup_fwd(ctx, inputs, keyword_only_inputs, output):
        logits, target, weight = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, target, weight, output[1])
        ctx.kw = keyword_only_inputs

    def backward_fwd(ctx, grad_loss, _grad_lse):
        logits, target, weight, lse = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = ops.softmax_focal_loss_bwd(grad_loss, logits, target, weight, lse, **ctx.kw)
        return grad_logits, None, None

    torch.library.register_autograd(f"{ns}::softmax_focal_loss_fwd", backward_fwd, setup_context=setup_fwd)

    def separate_backward(grad_loss, inputs, outputs, kw):
        logits, target, weight = inputs
        return ops.softmax_focal_loss_bwd(grad_loss, logits, target, weight, outputs[0], **kw)

    # The fused forward + gradient (Note [Fused gradient] in xent/_fused.py); outputs (lse, grad_logits).
    _fused.register_fused_autograd(ns, "softmax_focal_loss_fwd_grad", separate_backward)

    def setup_bwd(ctx, inputs, keyword_only_inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.kw = keyword_only_inputs

    def backward_bwd(ctx, v):
        return _double_backward(ctx, v, prob=False)

    torch.library.register_autograd(f"{ns}::softmax_focal_loss_bwd", backward_bwd, setup_context=setup_bwd)

    # ---- probability targets ----
    def backward_prob_fwd(ctx, grad_loss, _grad_lse):
        logits, target, weight, lse = ctx.saved_tensors
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_logits = ops.softmax_focal_loss_prob_bwd(grad_loss, logits, target, weight, lse, **ctx.kw)
        if ctx.needs_input_grad[1]:
            grad_target = _prob_target_grad(grad_loss, logits, weight, ctx.kw)
        return grad_logits, grad_target, None

    torch.library.register_autograd(f"{ns}::softmax_focal_loss_prob_fwd", backward_prob_fwd, setup_context=setup_fwd)

    def backward_prob_bwd(ctx, v):
        return _double_backward(ctx, v, prob=True)

    torch.library.register_autograd(f"{ns}::softmax_focal_loss_prob_bwd", backward_prob_bwd, setup_context=setup_bwd)


for _ns in _ops.NAMESPACES:
    _register_fakes(_ns)
    _register_autograd(_ns)
