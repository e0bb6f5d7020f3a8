"""Fake (meta) kernels and autograd formulas of the xent operators.

Every operator schema is in csrc/ops.cpp. The forward ops return (loss, lse); lse (the per-position
log-sum-exp, float32 or float64) is saved for the backward op and is not differentiable. The backward ops
are themselves differentiable (double backward, e.g. for gradient penalties) through the formulas in
``_cross_entropy_double_backward`` below, written with PyTorch ops.
"""

import torch

from . import _C  # noqa: F401  (registers the `xent` library and its CPU/CUDA kernels)
from . import _fused

NAMESPACES = ["xent"]
try:  # the test-only emulated-CUDA library (tests/simt), present only in XENT_BUILD_EMULATOR builds
    from . import _C_emulated  # noqa: F401

    NAMESPACES.append("xent_emulated")
except ImportError:
    pass

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def position_shape(logits):
    """Shape of the per-position tensors (loss with reduction='none', lse): the logits' without dim 1."""
    return (logits.shape[0],) + tuple(logits.shape[2:])


# ------------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and strides of the outputs, with the checks that need only metadata.


def _check_common(logits, weight, reduction, label_smoothing):
    torch._check(
        logits.dim() >= 2,
        lambda: f"cross_entropy: expected logits of shape (N, C) or (N, C, d1, ..., dk), got {logits.dim()}-d",
    )
    torch._check(
        logits.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        lambda: f"cross_entropy: expected float32, float64, bfloat16 or float16 logits, got {logits.dtype}",
    )
    torch._check(reduction in (0, 1, 2), lambda: f"cross_entropy: reduction must be 0, 1 or 2, got {reduction}")
    torch._check(
        0.0 <= label_smoothing <= 1.0,
        lambda: f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}",
    )
    if weight is not None:
        torch._check(
            weight.dim() == 1 and weight.shape[0] == logits.shape[1],
            lambda: f"weight tensor should be defined either for all {logits.shape[1]} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}",
        )


def _check_devices(logits, *others):
    # A fake kernel also runs for mixed real and meta arguments: it must refuse them as the kernels do.
    for other in others:
        if other is not None:
            torch._check(
                other.device == logits.device,
                lambda: f"Expected all tensors to be on the same device, but found {logits.device} and {other.device}",
            )


def _check_index_target(logits, target):
    torch._check(
        target.dtype in (torch.int64, torch.int32, torch.uint8),
        lambda: f"cross_entropy: expected class-index targets of dtype int64, int32 or uint8, got {target.dtype}",
    )
    torch._check(
        tuple(target.shape) == position_shape(logits),
        lambda: f"cross_entropy: expected target size {list(position_shape(logits))}, got {list(target.shape)}",
    )


def _check_prob_target(logits, target):
    torch._check(
        target.shape == logits.shape and target.dtype == logits.dtype,
        lambda: "cross_entropy: probability targets must have the logits' shape and dtype",
    )


def _fake_forward(logits, reduction):
    loss_shape = position_shape(logits) if reduction == REDUCTION_NONE else ()
    loss = logits.new_empty(loss_shape)
    lse = logits.new_empty(position_shape(logits), dtype=acc_dtype(logits.dtype))
    return loss, lse


def _fake_grad(logits):
    # Same rule as the kernels (csrc/cross_entropy_host.h: dense_strides_like).
    return torch.empty_like(logits, memory_format=torch.preserve_format)


def _register_fakes(ns):
    @torch.library.register_fake(f"{ns}::cross_entropy_fwd")
    def _(logits, target, weight=None, *, reduction=1, ignore_index=-100, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_devices(logits, target, weight)
        _check_index_target(logits, target)
        return _fake_forward(logits, reduction)

    @torch.library.register_fake(f"{ns}::cross_entropy_bwd")
    def _(grad_loss, logits, target, weight, lse, *, reduction=1, ignore_index=-100, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_devices(logits, grad_loss, target, weight, lse)
        _check_index_target(logits, target)
        return _fake_grad(logits)

    @torch.library.register_fake(f"{ns}::cross_entropy_fwd_grad")
    def _(logits, target, weight=None, *, reduction=1, ignore_index=-100, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_devices(logits, target, weight)
        _check_index_target(logits, target)
        torch._check(
            reduction in (REDUCTION_MEAN, REDUCTION_SUM),
            lambda: f"cross_entropy_fwd_grad: reduction must be mean (1) or sum (2), got {reduction}",
        )
        return _fake_forward(logits, reduction) + (_fake_grad(logits),)

    @torch.library.register_fake(f"{ns}::cross_entropy_prob_fwd")
    def _(logits, target, weight=None, *, reduction=1, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_devices(logits, target, weight)
        _check_prob_target(logits, target)
        return _fake_forward(logits, reduction)

    @torch.library.register_fake(f"{ns}::cross_entropy_prob_fwd_grad")
    def _(logits, target, weight=None, *, reduction=1, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_devices(logits, target, weight)
        _check_prob_target(logits, target)
        torch._check(
            reduction in (REDUCTION_MEAN, REDUCTION_SUM),
            lambda: f"cross_entropy_prob_fwd_grad: reduction must be mean (1) or sum (2), got {reduction}",
        )
        return _fake_forward(logits, reduction) + (_fake_grad(logits),)

    @torch.library.register_fake(f"{ns}::cross_entropy_prob_bwd")
    def _(grad_loss, logits, target, weight, lse, *, reduction=1, label_smoothing=0.0):
        _check_common(logits, weight, reduction, label_smoothing)
        _check_devices(logits, grad_loss, target, weight, lse)
        _check_prob_target(logits, target)
        return _fake_grad(logits)


# ------------------------------------------------------------------------------------------------
# Autograd.


def _class_dim_view(t, logits):
    """A per-position tensor (N, *) viewed to broadcast against the logits (N, C, *)."""
    return t.unsqueeze(1)


def _upstream_scale(grad_loss, reduction, denominator, logits):
    """Per-position upstream gradient s_p, shape (N, 1, *), in the accumulation dtype."""
    acc = acc_dtype(logits.dtype)
    g = grad_loss.to(acc)
    if reduction == REDUCTION_NONE:
        return _class_dim_view(g, logits)
    if reduction == REDUCTION_MEAN:
        g = g / denominator
    return g.reshape((1,) * logits.dim())


def _reduce_positions(per_position, reduction, denominator):
    """The adjoint of _upstream_scale: per-position values (N, *) to grad_loss's shape."""
    if reduction == REDUCTION_NONE:
        return per_position
    total = per_position.sum()
    return total / denominator if reduction == REDUCTION_MEAN else total


def _index_terms(logits, target, weight, ignore_index, label_smoothing):
    """Per-position pieces of the class-index gradient, all broadcastable to (N, C, *), acc dtype.

    grad = s * (softmax * a - b - onehot * (1 - eps) * w_t), with a = (1 - eps) w_t + eps W_all / C and
    b_c = eps w_c / C; ignored positions have keep = 0.
    """
    acc = acc_dtype(logits.dtype)
    C = logits.shape[1]
    keep = target != ignore_index
    safe_target = torch.where(keep, target, torch.zeros_like(target)).long()
    if weight is None:
        w = torch.ones(C, dtype=acc, device=logits.device)
    else:
        w = weight.to(acc)
    shape = [1, C] + [1] * (logits.dim() - 2)
    w_c = w.reshape(shape)
    w_t = w[safe_target] * keep.to(acc)  # (N, *)
    eps = label_smoothing
    a = (1 - eps) * w_t + eps * w.sum() / C * keep.to(acc)
    onehot = torch.nn.functional.one_hot(safe_target, C).to(acc).movedim(-1, 1)
    denominator = w_t.sum()
    return keep, w_c, w_t, a, onehot, denominator


def _softmax_from_lse(logits, lse, keep=None):
    p = torch.exp(logits.to(lse.dtype) - _class_dim_view(lse, logits))
    if keep is not None:  # lse of an ignored position is 0: keep its (unused) softmax finite
        p = torch.where(_class_dim_view(keep, logits), p, torch.zeros_like(p))
    return p


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
            grad_logits = ops.cross_entropy_bwd(grad_loss, logits, target, weight, lse, **ctx.kw)
        return grad_logits, None, None

    torch.library.register_autograd(f"{ns}::cross_entropy_fwd", backward_fwd, setup_context=setup_fwd)

    def separate_backward(grad_loss, inputs, outputs, kw):
        logits, target, weight = inputs
        return ops.cross_entropy_bwd(grad_loss, logits, target, weight, outputs[0], **kw)

    _fused.register_fused_autograd(ns, "cross_entropy_fwd_grad", separate_backward)

    def setup_bwd(ctx, inputs, keyword_only_inputs, output):
        grad_loss, logits, target, weight, lse = inputs
        ctx.save_for_backward(grad_loss, logits, target, weight, lse)
        ctx.kw = keyword_only_inputs

    def backward_bwd(ctx, v):
        # Double backward of grad = s * (softmax * a - b - onehot (1 - eps) w_t), lse being a function of
        # the logits: d/dlogits = s a softmax * (v - <softmax, v>); d/ds = <v, softmax a - b - onehot ...>.
        grad_loss, logits, target, weight, lse = ctx.saved_tensors
        kw = ctx.kw
        eps = kw.get("label_smoothing", 0.0)
        reduction = kw.get("reduction", REDUCTION_MEAN)
        keep, w_c, w_t, a, onehot, denominator = _index_terms(
            logits, target, weight, kw.get("ignore_index", -100), eps
        )
        C = logits.shape[1]
        p = _softmax_from_lse(logits, lse, keep)
        v = v.to(p.dtype)
        s = _upstream_scale(grad_loss, reduction, denominator, logits)
        pv = (p * v).sum(1, keepdim=True)
        grad_logits = grad_grad_loss = None
        if ctx.needs_input_grad[1]:
            grad_logits = (s * _class_dim_view(a, logits) * p * (v - pv)).to(logits.dtype)
        if ctx.needs_input_grad[0]:
            b = eps / C * w_c * _class_dim_view(keep.to(p.dtype), logits)
            dir_grad = p * _class_dim_view(a, logits) - b - onehot * _class_dim_view((1 - eps) * w_t, logits)
            per_position = (dir_grad * v).sum(1)
            grad_grad_loss = _reduce_positions(per_position, reduction, denominator).to(grad_loss.dtype)
        return grad_grad_loss, grad_logits, None, None, None

    torch.library.register_autograd(f"{ns}::cross_entropy_bwd", backward_bwd, setup_context=setup_bwd)

    # ---- probability targets ----
    def setup_prob_fwd(ctx, inputs, keyword_only_inputs, output):
        logits, target, weight = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, target, weight, output[1])
        ctx.kw = keyword_only_inputs

    def backward_prob_fwd(ctx, grad_loss, _grad_lse):
        logits, target, weight, lse = ctx.saved_tensors
        kw = ctx.kw
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_logits = ops.cross_entropy_prob_bwd(grad_loss, logits, target, weight, lse, **kw)
        if ctx.needs_input_grad[1]:
            grad_target = _prob_target_grad(grad_loss, logits, weight, lse, kw)
        return grad_logits, grad_target, None

    torch.library.register_autograd(f"{ns}::cross_entropy_prob_fwd", backward_prob_fwd, setup_context=setup_prob_fwd)

    def separate_prob_backward(grad_loss, inputs, outputs, kw):
        logits, target, weight = inputs
        return ops.cross_entropy_prob_bwd(grad_loss, logits, target, weight, outputs[0], **kw)

    _fused.register_fused_autograd(ns, "cross_entropy_prob_fwd_grad", separate_prob_backward)

    def setup_prob_bwd(ctx, inputs, keyword_only_inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.kw = keyword_only_inputs

    def backward_prob_bwd(ctx, v):
        # grad = s * (softmax * A - w q), A = sum_c w_c q_c, q = (1 - eps) t + eps / C:
        # d/dlogits = s A softmax * (v - <softmax, v>); d/dt_j = s (1 - eps) w_j (<softmax, v> - v_j).
        grad_loss, logits, target, weight, lse = ctx.saved_tensors
        kw = ctx.kw
        eps = kw.get("label_smoothing", 0.0)
        reduction = kw.get("reduction", REDUCTION_MEAN)
        C = logits.shape[1]
        p = _softmax_from_lse(logits, lse)
        v = v.to(p.dtype)
        w_c = _prob_weight(weight, logits, p.dtype)
        q = (1 - eps) * target.to(p.dtype) + eps / C
        A = (w_c * q).sum(1, keepdim=True)
        denominator = _position_count(logits)
        s = _upstream_scale(grad_loss, reduction, denominator, logits)
        pv = (p * v).sum(1, keepdim=True)
        grad_grad_loss = grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            per_position = ((p * A - w_c * q) * v).sum(1)
            grad_grad_loss = _reduce_positions(per_position, reduction, denominator).to(grad_loss.dtype)
        if ctx.needs_input_grad[1]:
            grad_logits = (s * A * p * (v - pv)).to(logits.dtype)
        if ctx.needs_input_grad[2]:
            grad_target = (s * (1 - eps) * w_c * (pv - v)).to(target.dtype)
        return grad_grad_loss, grad_logits, grad_target, None, None

    torch.library.register_autograd(f"{ns}::cross_entropy_prob_bwd", backward_prob_bwd, setup_context=setup_prob_bwd)


def _position_count(logits):
    """N * d1 * ... * dk, the probability-target mean's denominator, kept symbolic under dynamic shapes
    (float() or numel() // C would specialize the compiled graph on the batch size)."""
    count = 1
    for size in position_shape(logits):
        count = count * size
    return count


def _prob_weight(weight, logits, dtype):
    C = logits.shape[1]
    shape = [1, C] + [1] * (logits.dim() - 2)
    if weight is None:
        return torch.ones(shape, dtype=dtype, device=logits.device)
    return weight.to(dtype).reshape(shape)


def _prob_target_grad(grad_loss, logits, weight, lse, kw):
    """d loss / d target_j = -s (1 - eps) w_j log_softmax_j, written with PyTorch ops (differentiable)."""
    eps = kw.get("label_smoothing", 0.0)
    reduction = kw.get("reduction", REDUCTION_MEAN)
    C = logits.shape[1]
    acc = lse.dtype
    # Recomputed rather than logits - lse: lse is not differentiable, and this term must be (double backward).
    log_softmax = torch.log_softmax(logits.to(acc), 1)
    denominator = _position_count(logits)
    s = _upstream_scale(grad_loss, reduction, denominator, logits)
    return (-(1 - eps) * s * _prob_weight(weight, logits, acc) * log_softmax).to(logits.dtype)


# ------------------------------------------------------------------------------------------------
# NLL loss.


def _register_nll(ns):
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::nll_loss_fwd")
    def _(input, target, weight=None, *, reduction=1, ignore_index=-100):
        _check_common(input, weight, reduction, 0.0)
        _check_devices(input, target, weight)
        _check_index_target(input, target)
        loss_shape = position_shape(input) if reduction == REDUCTION_NONE else ()
        return input.new_empty(loss_shape), input.new_empty(())

    @torch.library.register_fake(f"{ns}::nll_loss_bwd")
    def _(grad_loss, input, target, weight, total_weight, *, reduction=1, ignore_index=-100):
        _check_common(input, weight, reduction, 0.0)
        _check_devices(input, grad_loss, target, weight, total_weight)
        _check_index_target(input, target)
        return _fake_grad(input)

    def setup_fwd(ctx, inputs, keyword_only_inputs, output):
        input, target, weight = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(input, target, weight, output[1])
        ctx.kw = keyword_only_inputs

    def backward_fwd(ctx, grad_loss, _grad_total_weight):
        input, target, weight, total_weight = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = ops.nll_loss_bwd(grad_loss, input, target, weight, total_weight, **ctx.kw)
        return grad_input, None, None

    torch.library.register_autograd(f"{ns}::nll_loss_fwd", backward_fwd, setup_context=setup_fwd)

    def setup_bwd(ctx, inputs, keyword_only_inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.kw = keyword_only_inputs

    def backward_bwd(ctx, v):
        # grad_input = -s w_t onehot(t) is linear in grad_loss and constant in the input.
        grad_loss, input, target, weight, total_weight = ctx.saved_tensors
        grad_grad_loss = None
        if ctx.needs_input_grad[0]:
            keep, _, w_t, _, onehot, _ = _index_terms(input, target, weight, ctx.kw.get("ignore_index", -100), 0.0)
            per_position = -(onehot * v.to(w_t.dtype)).sum(1) * w_t
            reduction = ctx.kw.get("reduction", REDUCTION_MEAN)
            grad_grad_loss = _reduce_positions(per_position, reduction, total_weight.to(w_t.dtype)).to(grad_loss.dtype)
        return grad_grad_loss, None, None, None, None

    torch.library.register_autograd(f"{ns}::nll_loss_bwd", backward_bwd, setup_context=setup_bwd)


for _ns in NAMESPACES:
    _register_fakes(_ns)
    _register_autograd(_ns)
    _register_nll(_ns)
