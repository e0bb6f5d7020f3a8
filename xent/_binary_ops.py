"""The binary losses' ops: their entries in the op table (xent/_registrar.py), their fake kernels' checks
and outputs, and their formulas written with PyTorch ops.

Ops (schemas in csrc/ops.cpp): ``binary_cross_entropy_{fwd,bwd,fwd_grad}``,
``binary_cross_entropy_with_logits_{fwd,bwd,fwd_grad}`` and ``sigmoid_focal_loss_{fwd,bwd,fwd_grad}`` (the
``*_fwd_grad`` ops: Note [Fused gradient] in xent/_fused.py). The forward ops return the loss only; their
backward calls the ``*_bwd`` op for the input's gradient and computes the (rare) target gradient here with
PyTorch ops. The ``*_bwd`` ops are differentiable too (double backward,
e.g. for gradient penalties) through the second-derivative formulas below.

Gradients with respect to ``weight`` and ``pos_weight`` are not defined, as in PyTorch (whose ops raise
"not differentiable with respect to argument 'weight'"; xent.functional raises the same error).

Notation, per element (see csrc/cpu/binary_loss_kernels_impl.h for the kernels' side): x = input, y = target,
w = weight, pw = pos_weight, s = upstream gradient (divided by numel for 'mean'), p = sigmoid(x),
q = sigmoid(-x), L = 1 + (pw - 1) y. G(x, y) denotes the gradient w.r.t. x for a unit upstream gradient,
so that grad_input = s * G; the double backward needs dG/dx and dG/dy.
"""

import functools

import torch
import torch.nn.functional as F

from ._common import acc_dtype, fake_loss, reduce_like_loss, upstream_scale
from ._library import REDUCTION_NONE
from ._registrar import LossOps

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# ATen's EPSILON of binary_cross_entropy_backward: the float 1e-12 (also for float64 inputs).
BCE_EPS = float(torch.tensor(1e-12, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------
# Fake kernels: the checks that need only metadata, and the outputs' shapes, dtypes and strides
# (contiguous, as csrc/cpu/binary_losses.cpp returns them).


def _check_args(name, input, target, weight, pos_weight, reduction):
    if input.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(f'"{name}" not implemented for \'{input.dtype}\'')
    torch._check_value(
        target.shape == input.shape,
        lambda: f"{name}: target size {list(target.shape)} must be the same as input size {list(input.shape)}",
    )
    torch._check(
        target.dtype == input.dtype, lambda: f"Found dtype {target.dtype} but expected {input.dtype}"
    )
    for what, t in (("target", target), ("weight", weight), ("pos_weight", pos_weight)):
        # A meta argument among CPU ones dispatches here: refuse it rather than return uninitialized memory.
        torch._check(
            t is None or t.device == input.device,
            lambda: f"{name}: expected {what} on the input's device {input.device}, got {t.device}",
        )
    for what, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            torch._check(
                tuple(torch.broadcast_shapes(t.shape, input.shape)) == tuple(input.shape),
                lambda: f"output with shape {list(input.shape)} doesn't match the broadcast shape of {what} "
                f"{list(t.shape)}",
            )
    torch._check_value(reduction in (0, 1, 2), lambda: f"{name}: reduction must be 0, 1 or 2, got {reduction}")


def _weights(options):
    """(weight, pos_weight) from an op's options (weight[, pos_weight]); pos_weight None where it has none."""
    return options[0], (options[1] if len(options) == 2 else None)


def _check(name):
    """The fake kernels' check of the loss `name`'s ops (LossOps.check)."""

    def check(input, target, options, kw, tensors):
        _check_args(name, input, target, *_weights(options), kw["reduction"])

    return check


def _fake_outputs(input, kw):
    return (fake_loss(input, kw["reduction"], tuple(input.shape)),)


def _fake_grad(input):
    return input.new_empty(tuple(input.shape))


# ------------------------------------------------------------------------------------------------
# Formulas, in the accumulation dtype (float32, or float64 for float64 inputs).


def _acc(t, acc):
    return None if t is None else t.to(acc)


def _weighted(t, w):
    return t if w is None else t * w


class _Powers:
    """f = m^gamma and the factors of its derivatives: f' = h1 m', f'' = h2 m'^2 + h1 m'', with
    h1 = gamma m^(gamma - 1) and h2 = gamma (gamma - 1) m^(gamma - 2); gamma = 0 has no derivative
    (torch's pow_backward), gamma = 1 no second derivative."""

    def __init__(self, m, gamma):
        self.zero = gamma == 0
        if self.zero:
            self.f = torch.ones_like(m)
            self.h1 = self.h2 = torch.zeros_like(m)
        elif gamma == 1:
            self.f, self.h1, self.h2 = m, torch.ones_like(m), torch.zeros_like(m)
        else:
            self.f = torch.pow(m, gamma)
            self.h1 = gamma * torch.pow(m, gamma - 1)
            self.h2 = gamma * (gamma - 1) * torch.pow(m, gamma - 2)


def _focal_terms(x, y, w, pw, alpha, gamma):
    """Every per-element term of the focal loss and its derivatives (module docstring notation;
    ce_u = (1 - y) x - L log_sigmoid(x), m = 1 - p_t = (1 - y) p + y q, a = alpha_t)."""
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    log_p = F.logsigmoid(x)
    if pw is None:
        L, pwy, pw_m1 = torch.ones_like(y), y, None
    else:
        pw_m1 = pw - 1
        L, pwy = 1 + pw_m1 * y, pw * y
    t = {}
    t["ce_u"] = (1 - y) * x - L * log_p
    t["ce_x"] = (1 - y) * p - pwy * q
    t["ce_xx"] = L * p * q
    t["ce_y"] = -x if pw is None else -x - pw_m1 * log_p  # = log_sigmoid(-x) - pw log_sigmoid(x)
    t["ce_xy"] = -torch.ones_like(x) if pw is None else pw_m1 * p - pw
    m = (1 - y) * p + y * q
    m_x = p * q * (1 - 2 * y)
    m_xx = m_x * (q - p)
    m_y = 1 - 2 * p
    m_xy = -2 * p * q
    pw_ = _Powers(m, gamma)
    t["f"] = pw_.f
    t["f_x"] = pw_.h1 * m_x
    t["f_xx"] = pw_.h2 * m_x * m_x + pw_.h1 * m_xx
    t["f_y"] = pw_.h1 * m_y
    t["f_xy"] = pw_.h2 * m_y * m_x + pw_.h1 * m_xy
    if alpha >= 0:
        t["a"] = alpha * y + (1 - alpha) * (1 - y)
        t["a_y"] = 2 * alpha - 1
    else:
        t["a"], t["a_y"] = 1.0, 0.0
    t["w"] = 1.0 if w is None else w
    return t


def _grad_terms(kind, x, y, w, pw, kw):
    """(G, dG/dx, dG/dy) of the op family `kind` (acc dtype, broadcast to the input)."""
    if kind == "bce":
        # G = w (x - y) / max(x (1 - x), eps). Where the clamp is active, G is linear in x.
        D = x * (1 - x)
        Dc = D.clamp_min(BCE_EPS)
        G = _weighted((x - y) / Dc, w)
        dx = _weighted(torch.where(D >= BCE_EPS, (x * x - 2 * x * y + y) / (D * D), 1.0 / BCE_EPS), w)
        dy = _weighted(-1.0 / Dc, w)
        return G, dx, dy
    if kind == "logits":
        p, q = torch.sigmoid(x), torch.sigmoid(-x)
        if pw is None:
            return _weighted(p - y, w), _weighted(p * q, w), _weighted(-torch.ones_like(x), w)
        L = 1 + (pw - 1) * y
        return (
            _weighted((1 - y) * p - pw * y * q, w),
            _weighted(L * p * q, w),
            _weighted((pw - 1) * p - pw, w),
        )
    t = _focal_terms(x, y, w, pw, kw.get("alpha", 0.25), kw.get("gamma", 2.0))
    a, a_y, wt = t["a"], t["a_y"], t["w"]
    inner = t["ce_x"] * t["f"] + t["ce_u"] * t["f_x"]
    G = a * wt * inner
    dx = a * wt * (t["ce_xx"] * t["f"] + 2 * t["ce_x"] * t["f_x"] + t["ce_u"] * t["f_xx"])
    dy = wt * (
        a_y * inner
        + a * (t["ce_xy"] * t["f"] + t["ce_x"] * t["f_y"] + t["ce_y"] * t["f_x"] + t["ce_u"] * t["f_xy"])
    )
    return G, dx, dy


def _target_grad(kind, grad_loss, x, y, w, pw, kw):
    """d loss / d target (acc dtype), as PyTorch's autograd gives it (torchvision's for focal)."""
    s = upstream_scale(grad_loss, kw["reduction"], x.numel(), x.dtype)
    if kind == "bce":
        # ATen's binary_cross_entropy_target_backward: -grad * w * logit(x) (no clamping).
        return -s * _weighted(torch.logit(x), w)
    if kind == "logits":
        # ATen: grad * w * (log_sigmoid(-x) - pw log_sigmoid(x)), or -grad * w * x without pos_weight.
        if pw is None:
            return -s * _weighted(x, w)
        return s * _weighted(F.logsigmoid(-x) - pw * F.logsigmoid(x), w)
    t = _focal_terms(x, y, w, pw, kw.get("alpha", 0.25), kw.get("gamma", 2.0))
    # loss = a w ce_u f: d/dy = w (a_y ce_u f + a (ce_y f + ce_u f_y)).
    return s * t["w"] * (t["a_y"] * t["ce_u"] * t["f"] + t["a"] * (t["ce_y"] * t["f"] + t["ce_u"] * t["f_y"]))


# ------------------------------------------------------------------------------------------------
# Autograd.


def _weights_in(options, acc):
    """(weight, pos_weight) in `acc`, None where absent."""
    weight, pos_weight = _weights(options)
    return _acc(weight, acc), _acc(pos_weight, acc)


def _target_grad_of(kind, grad_loss, input, target, options, saved, kw):
    acc = acc_dtype(input.dtype)
    g = _target_grad(kind, grad_loss, input.to(acc), target.to(acc), *_weights_in(options, acc), kw)
    return g.to(target.dtype)


def _double_backward(kind, grad_loss, input, target, options, saved, kw, v, needs_input_grad):
    # grad_input = s * G(x, y), linear in grad_loss: d/d grad_loss = reduce(v G), d/dx = v s dG/dx,
    # d/dy = v s dG/dy.
    reduction = kw["reduction"]
    acc = acc_dtype(input.dtype)
    G, dG_dx, dG_dy = _grad_terms(kind, input.to(acc), target.to(acc), *_weights_in(options, acc), kw)
    v = v.to(acc)
    s = upstream_scale(grad_loss, reduction, input.numel(), acc)
    grad_grad_loss = grad_input = grad_target = None
    if needs_input_grad[0]:
        per_element = (v * G).expand(input.shape) if reduction == REDUCTION_NONE else v * G
        grad_grad_loss = reduce_like_loss(per_element, reduction, input.numel()).to(grad_loss.dtype)
    if needs_input_grad[1]:
        grad_input = (v * s * dG_dx).expand(input.shape).to(input.dtype)
    if needs_input_grad[2]:
        grad_target = (v * s * dG_dy).expand(input.shape).to(target.dtype)
    return grad_grad_loss, grad_input, grad_target


def _entry(kind, name):
    return LossOps(
        name,
        check=_check(name),
        fake_outputs=_fake_outputs,
        fake_grad=_fake_grad,
        double_backward=functools.partial(_double_backward, kind),
        target_grad=functools.partial(_target_grad_of, kind),
        fused=True,
    )


BINARY_CROSS_ENTROPY = _entry("bce", "binary_cross_entropy")
BINARY_CROSS_ENTROPY_WITH_LOGITS = _entry("logits", "binary_cross_entropy_with_logits")
SIGMOID_FOCAL_LOSS = _entry("focal", "sigmoid_focal_loss")
