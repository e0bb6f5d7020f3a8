"""Parity suite of xent.cross_entropy / xent.nn.CrossEntropyLoss against PyTorch.

Every parity check compares xent's loss and gradients with two float64 computations on the same
input values: torch.nn.functional.cross_entropy in float64, and the independent reference of
tests/reference.py. Inputs are generated in the tested dtype first and then upcast, so the float64
results are the exact answers for the values xent sees.

Tolerances (each is justified where it is defined, see ``Tolerance``):
* float64: 1e-12 relative (plus a rounding term for cancellation, see ``loss_scale``).
* float32: loss 1e-6 relative (the project's target), gradient 1e-5.
* bfloat16 / float16: xent's error must be at most twice PyTorch's own error in that dtype, plus half
  an ulp of the dtype (the rounding of the result itself). Never a loose fixed tolerance.
"""

import collections
import gc
import hashlib
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn import _reduction as _Reduction

import xent
from bitwise import assert_bitwise
from conftest import cpu_has_flag
from inputs import fixed_rng, keep_first_target, layouts, make_target, make_weight
from reference import cross_entropy_reference, cross_entropy_reference_chunked
from reference_focal import softmax_focal_loss_reference

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [F32, F64, BF16, F16]
LOW = (BF16, F16)
REDUCTIONS = ["none", "mean", "sum"]

# Unit roundoff (half an ulp, relative) of each dtype.
UNIT_ROUNDOFF = {F64: 2.0**-53, F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11}


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


# ================================================================================================
# Comparison.


class Tolerance:
    # float64 loss/gradient: the kernels accumulate in float64; 1e-12 relative leaves room for the
    # different summation orders over up to 50257 classes (each costs ~C * 2**-53 ~ 6e-12 at worst,
    # ~1e-15 in practice) while any formula error shows up far above it.
    F64_RTOL = 1e-12
    # float32 loss: 1e-6 relative is the project's accuracy target for the loss.
    F32_LOSS_RTOL = 1e-6
    # float32 gradient: softmax_j = exp(x_j - lse) carries a relative error of about |x_j - lse| * 2**-24
    # (~1e-6 for the logit ranges used here); 1e-5 relative to the gradient's largest entry keeps a
    # 10x margin without hiding a wrong term (which is O(1) relative).
    F32_GRAD_RTOL = 1e-5
    # Cancellation term: a loss is a difference of terms of magnitude `loss_scale` (lse - x_t, or
    # W lse - sum w x with smoothing); rounding those terms in the accumulation dtype costs a few units
    # of roundoff of that magnitude even when the difference is tiny (a confidently right prediction),
    # where no relative tolerance can hold (PyTorch's float32 loss is off by 1e-3 relative there too).
    # 4 units: lse itself carries ~2 (exp, sum, log) and the subtraction 1.
    CANCELLATION_ULPS = 4.0
    # Low precision: xent may be at most this factor worse than PyTorch in the same dtype ...
    LOW_FACTOR = 2.0
    # ... plus this many units of roundoff of the result's magnitude: rounding the (float32-accumulated)
    # result to bfloat16/float16 costs up to half an ulp = 1 unit, and PyTorch may happen to be exact.
    LOW_ROUNDING_UNITS = 1.0


def _acc_roundoff(dtype):
    return UNIT_ROUNDOFF[F64] if dtype == F64 else UNIT_ROUNDOFF[F32]


def _nan_inf_pattern_equal(actual, expected, what):
    """Checks that xent has NaN exactly where the exact value is NaN, reproduces its infinities, and is
    finite wherever it is finite. Returns (actual, expected) as float64 CPU tensors and the mask of
    finite expected entries (None when all are finite: the fast path for large tensors)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if bool(torch.isfinite(e).all()):
        if not bool(torch.isfinite(a).all()):
            bad = ~torch.isfinite(a)
            raise AssertionError(f"{what}: xent is not finite where the exact value is: at "
                                 f"{bad.nonzero().tolist()[:8]}: {a[bad][:8].tolist()}")
        return a, e, None
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{what}: NaN at different places: xent NaN at {nan_a.nonzero().tolist()[:8]}, "
        f"expected NaN at {nan_e.nonzero().tolist()[:8]}"
    )
    inf_e = torch.isinf(e)
    assert torch.equal(a[inf_e], e[inf_e]), f"{what}: expected infinities {e[inf_e]}, got {a[inf_e]}"
    finite = torch.isfinite(e)
    bad = torch.isinf(a) & finite
    assert not bad.any(), f"{what}: xent is infinite where the exact value is finite: {a[bad][:8]}"
    return a, e, finite


def max_abs_err(actual, expected):
    """max |actual - expected| over the entries where expected is finite (inf if actual is NaN there)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if a.numel() == 0:
        return 0.0
    finite = torch.isfinite(e)
    d = (a - e).abs()
    if not bool(finite.all()):
        d = torch.where(finite, d, torch.zeros((), dtype=F64))
    return torch.nan_to_num(d, nan=math.inf).max().item()


def assert_close_exact_dtype(actual, expected, *, dtype, rtol, atol, what):
    """float32/float64: |actual - expected| <= rtol |expected| + atol elementwise (atol may be a tensor)."""
    a, e, finite = _nan_inf_pattern_equal(actual, expected, what)
    if e.numel() == 0:
        return
    atol = torch.as_tensor(atol, dtype=torch.float64).cpu()
    tol = rtol * e.abs() + atol
    err = (a - e).abs()
    bad = ~(err <= tol)
    if finite is not None:
        bad &= finite
    if bad.any():
        finite = torch.isfinite(e) if finite is None else finite
        i = bad.nonzero()[0].tolist() if bad.dim() else []
        idx = tuple(i)
        tol = tol.expand_as(e)
        raise AssertionError(
            f"{what} ({dtype_id(dtype)}): {int(bad.sum())} of {int(finite.sum())} entries out of tolerance; "
            f"first at {i}: xent {a[idx].item()!r} expected {e[idx].item()!r} "
            f"|err| {err[idx].item():.3e} > tol {tol[idx].item():.3e}; max rel err "
            f"{(err[finite] / e[finite].abs().clamp_min(1e-300)).max().item():.3e}"
        )


def assert_no_worse_than_torch(actual, expected, err_torch, *, dtype, what, cancellation=0.0):
    """bfloat16/float16: xent's max error against the exact value is at most LOW_FACTOR times
    PyTorch's own max error in the same dtype (`err_torch`, see max_abs_err), plus the rounding of the
    result (LOW_ROUNDING_UNITS) and `cancellation`, the float32 rounding of terms that cancel."""
    a, e, finite = _nan_inf_pattern_equal(actual, expected, what)
    if e.numel() == 0 or (finite is not None and not finite.any()):
        return
    err_xent = max_abs_err(a, e)
    magnitude = (e if finite is None else e[finite]).abs().max().item()
    allowed = (Tolerance.LOW_FACTOR * err_torch + Tolerance.LOW_ROUNDING_UNITS * UNIT_ROUNDOFF[dtype] * magnitude
               + cancellation)
    assert err_xent <= allowed, (
        f"{what} ({dtype_id(dtype)}): xent max error {err_xent:.4e} > allowed {allowed:.4e} "
        f"(PyTorch's own error in {dtype_id(dtype)}: {err_torch:.4e}, |exact| up to {magnitude:.4e})"
    )


def _position_coefficients(x64, target, w64, *, ignore_index, label_smoothing):
    """Per position: (|lse| + max_c |x_c|, A_p, mean denominator), where A_p = (1 - eps) w_t + eps W / C
    (class indices; 0 when ignored) or sum_c w_c |q_c| (probabilities) is the weight the position's
    loss and gradient terms carry. Shapes (N, *) for 2-d or K-dim input, (1,) for unbatched input."""
    x = x64.detach().double().cpu()
    target = target.detach().cpu()
    if x.dim() == 1:
        x = x.unsqueeze(0)
        target = target.unsqueeze(0)
    C = x.shape[1]
    w = torch.ones(C, dtype=F64) if w64 is None else w64.detach().double().cpu()
    if C == 0:
        z = torch.zeros(positions_of(x.shape), dtype=F64)
        return z, z, 0.0
    magnitude = torch.nan_to_num(torch.logsumexp(x, 1).abs() + x.abs().amax(1), nan=0.0, posinf=0.0)
    eps = label_smoothing
    shape = [1, C] + [1] * (x.dim() - 2)
    if target.is_floating_point():
        q = (1 - eps) * target.double() + eps / C
        coef = (w.reshape(shape) * q.abs()).sum(1)
        denominator = float(coef.numel())
    else:
        t = target.long()
        keep = t != ignore_index
        w_t = torch.where(keep, w[torch.where(keep, t, 0).clamp(0, C - 1)], torch.zeros((), dtype=F64))
        coef = ((1 - eps) * w_t + eps * w.sum() / C) * keep
        denominator = w_t.sum().item()
    return magnitude, coef, denominator


def loss_scale(x64, target, w64, *, ignore_index, label_smoothing, reduction):
    """The magnitude of the terms whose difference is the loss (see Tolerance.CANCELLATION_ULPS), reduced
    like the loss: per position A_p (|lse| + max_c |x_c|) (see _position_coefficients)."""
    magnitude, coef, denominator = _position_coefficients(
        x64, target, w64, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    scale = coef * magnitude
    if reduction == "none":
        return scale.view(-1)[0] if x64.dim() == 1 else scale
    total = scale.sum()
    if reduction == "mean":
        return total / denominator if denominator else torch.zeros((), dtype=F64)
    return total


def grad_scale(x64, target, w64, go64, *, ignore_index, label_smoothing, reduction):
    """The magnitude of the terms whose difference is a gradient entry: s_p (softmax_j A_p - w_j q_j) has
    terms up to |s_p| A_p, s_p being the position's upstream gradient (divided by the mean's
    denominator). Where the exact gradient vanishes by cancellation (C = 1, or q = softmax), rounding
    still leaves a few units of roundoff of this magnitude."""
    _, coef, denominator = _position_coefficients(
        x64, target, w64, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    s = go64.detach().double().cpu().abs()
    if reduction == "mean":
        s = s / denominator if denominator else torch.zeros_like(s)
    if reduction == "none":
        s = s.reshape(coef.shape)
    terms = s * coef
    return terms.max().item() if terms.numel() else 0.0


def assert_loss(actual, expected, err_torch, *, dtype, scale, what):
    """`scale` (see loss_scale): the magnitude of the terms the loss is a difference of."""
    cancellation = Tolerance.CANCELLATION_ULPS * _acc_roundoff(dtype) * scale
    if dtype in LOW:
        # xent accumulates in float32: the cancellation term at float32 precision, as a max.
        c = torch.as_tensor(cancellation, dtype=F64)
        assert_no_worse_than_torch(actual, expected, err_torch, dtype=dtype, what=what,
                                   cancellation=torch.nan_to_num(c, nan=0.0).max().item() if c.numel() else 0.0)
    else:
        rtol = Tolerance.F64_RTOL if dtype == F64 else Tolerance.F32_LOSS_RTOL
        assert_close_exact_dtype(actual, expected, dtype=dtype, rtol=rtol, atol=cancellation, what=what)


def assert_grad(actual, expected, err_torch, *, dtype, what, term_scale=0.0):
    """Gradients: elementwise rtol relative to the entry and to the gradient's largest entry (or to the
    magnitude of its terms, `term_scale` from grad_scale(), where those cancel to ~0). Low precision:
    against PyTorch's own error, plus the float32 rounding of the cancelling terms."""
    if dtype in LOW:
        cancellation = Tolerance.CANCELLATION_ULPS * UNIT_ROUNDOFF[F32] * term_scale
        assert_no_worse_than_torch(actual, expected, err_torch, dtype=dtype, what=what, cancellation=cancellation)
    else:
        rtol = Tolerance.F64_RTOL if dtype == F64 else Tolerance.F32_GRAD_RTOL
        e = expected.detach().double()
        magnitude = torch.nan_to_num(e.abs(), nan=0.0, posinf=0.0).max().item() if e.numel() else 0.0
        magnitude = max(magnitude, term_scale)
        assert_close_exact_dtype(actual, expected, dtype=dtype, rtol=rtol, atol=rtol * magnitude, what=what)


# ================================================================================================
# Inputs and layouts.


def make_logits(shape, dtype, scale=3.0):
    """Random logits in `dtype` (scale 3: some positions confidently right, some confidently wrong)."""
    return (torch.randn(shape, dtype=F64) * scale).to(dtype)


def make_prob_target(shape, dtype, kind="softmax"):
    if kind == "softmax":
        return torch.softmax(torch.randn(shape, dtype=F64) * 2, dim=1 if len(shape) > 1 else 0).to(dtype)
    if kind == "unnormalized":  # PyTorch accepts any values; nothing may assume they sum to 1
        return (torch.rand(shape, dtype=F64) * 2 - 0.5).to(dtype)
    raise ValueError(kind)


def positions_of(shape):
    return (shape[0],) + tuple(shape[2:])


LAYOUTS = layouts(
    "contiguous",
    "transposed",
    "class_sliced",
    "batch_sliced",
    "spatial_sliced",
    "channels_last",
    "permuted",
    "misaligned",
)


def _leaf(t, requires_grad):
    return t.detach().clone().requires_grad_(requires_grad)


def _grad_output_base(shape, dtype, kind, generator):
    """The upstream gradient's values, as (base, shape): the gradient is base.expand(shape), so a
    broadcast (stride-0) gradient stays broadcast on every device. Random values in the loss's dtype."""
    def rand(s):
        return torch.randn(s, dtype=F64, generator=generator).to(dtype)

    if kind == "ones":
        return torch.ones(shape, dtype=dtype), shape
    if kind == "expanded":  # reduction='none' with one upstream value broadcast to every position
        return rand(()), shape
    if kind == "expanded_row" and len(shape) >= 1:  # broadcast along all but the last dim
        return rand(shape[-1:]), shape
    return rand(shape), shape


def _fingerprint(*values):
    """A digest of tensors (dtype, shape and bytes) and plain values."""
    h = hashlib.blake2b(digest_size=16)
    for v in values:
        if isinstance(v, torch.Tensor):
            h.update(repr((v.dtype, tuple(v.shape))).encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


class _References:
    """Everything a parity check compares against, computed on the CPU from the input values."""


# The float64 references (and PyTorch's low-precision results) depend only on the input values and
# options, not on the backend: conftest.py runs a test's backends one after the other, and this small
# cache computes them once per group.
_REFERENCE_CACHE = collections.OrderedDict()
_REFERENCE_CACHE_SIZE = 8


def _torch_target(t):
    """PyTorch takes int64 class indices (uint8 only in some paths: not K-dim, not with label smoothing;
    int32 never): it gets the same values as int64."""
    return t if t.is_floating_point() else t.long()


def _compute_references(x, target, weight, *, kwargs, ref_kwargs, target_grad, grad_output, backward, seed):
    r = _References()
    dtype = x.dtype
    prob = target.is_floating_point()
    w64 = None if weight is None else weight.double()
    effective = ref_kwargs["reduction"]

    # float64: PyTorch and the reference, on the same values.
    x_ref, x_pt = _leaf(x.double(), True), _leaf(x.double(), True)
    t_ref = _leaf(target.double(), target_grad) if prob else target
    t_pt = _leaf(target.double(), target_grad) if prob else _torch_target(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size_average/reduce deprecation
        r.loss_pt = F.cross_entropy(x_pt, t_pt, w64, **kwargs)
    r.loss_ref = cross_entropy_reference(x_ref, t_ref, w64, **ref_kwargs)
    # PyTorch in the tested dtype, for the low-precision comparison.
    r.loss_low = None
    if dtype in LOW:
        x_low = _leaf(x, True)
        t_low = _leaf(target, target_grad) if prob else _torch_target(target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r.loss_low = F.cross_entropy(x_low, t_low, weight, **kwargs)
    r.scale = loss_scale(x.double(), target, w64, ignore_index=ref_kwargs["ignore_index"],
                         label_smoothing=ref_kwargs["label_smoothing"], reduction=effective)
    # PyTorch's own low-precision error against each float64 result (None above float16/bfloat16).
    r.loss_err_low = None
    if r.loss_low is not None:
        r.loss_err_low = (max_abs_err(r.loss_low, r.loss_pt), max_abs_err(r.loss_low, r.loss_ref))
    if not backward:
        return r

    generator = torch.Generator().manual_seed(seed)
    kind = grad_output if effective == "none" else "random"
    r.go_base, r.go_shape = _grad_output_base(tuple(r.loss_pt.shape), dtype, kind, generator)
    go = r.go_base.expand(r.go_shape)
    go64 = go.double()
    inputs_ref, inputs_pt = [x_ref], [x_pt]
    if target_grad:
        inputs_ref.append(t_ref)
        inputs_pt.append(t_pt)
    r.grads_ref = torch.autograd.grad(r.loss_ref, inputs_ref, go64)
    r.grads_pt = torch.autograd.grad(r.loss_pt, inputs_pt, go64)
    r.grads_err_low = [(None, None)] * len(inputs_ref)
    if r.loss_low is not None:
        grads_low = torch.autograd.grad(r.loss_low, [x_low] + ([t_low] if target_grad else []), go)
        r.grads_err_low = [(max_abs_err(gl, gp), max_abs_err(gl, gr))
                           for gl, gp, gr in zip(grads_low, r.grads_pt, r.grads_ref)]
    r.term_scale = grad_scale(x.double(), target, w64, go64, ignore_index=ref_kwargs["ignore_index"],
                              label_smoothing=ref_kwargs["label_smoothing"], reduction=effective)
    r.loss_pt, r.loss_ref = r.loss_pt.detach(), r.loss_ref.detach()
    r.loss_low = None if r.loss_low is None else r.loss_low.detach()
    return r


def _references(x, target, weight, **kw):
    key = _fingerprint(x, target, weight, sorted(kw["kwargs"].items()), sorted(kw["ref_kwargs"].items()),
                       kw["target_grad"], kw["grad_output"], kw["backward"])
    if key in _REFERENCE_CACHE:
        _REFERENCE_CACHE.move_to_end(key)
        return _REFERENCE_CACHE[key]
    refs = _compute_references(x, target, weight, seed=int(key[:8], 16), **kw)
    _REFERENCE_CACHE[key] = refs
    while len(_REFERENCE_CACHE) > _REFERENCE_CACHE_SIZE:
        _REFERENCE_CACHE.popitem(last=False)
    return refs


# ================================================================================================
# The parity check.


def check_cross_entropy(
    backend,
    x,
    target,
    weight=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    size_average=None,
    reduce=None,
    layout="contiguous",
    target_layout="contiguous",
    grad_output="random",
    target_grad=False,
    backward=True,
):
    """Runs xent.cross_entropy on `backend` and checks loss, gradient(s), dtype, shape and strides
    against PyTorch in float64 and the float64 reference (and, in low precision, against PyTorch's own
    error in the dtype). `x`, `target` and `weight` are contiguous CPU tensors; `layout` /
    `target_layout` re-lay them out on the backend's device."""
    dtype = x.dtype
    prob = target.is_floating_point()
    legacy = size_average is not None or reduce is not None
    effective = _Reduction.legacy_get_string(size_average, reduce, emit_warning=False) if legacy else reduction
    kwargs = dict(ignore_index=ignore_index, label_smoothing=label_smoothing)
    if legacy:
        kwargs.update(size_average=size_average, reduce=reduce)
    else:
        kwargs.update(reduction=reduction)
    ref_kwargs = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=effective)
    refs = _references(x, target, weight, kwargs=kwargs, ref_kwargs=ref_kwargs, target_grad=target_grad,
                       grad_output=grad_output, backward=backward)

    # xent on the backend.
    dev = backend.device
    xd = LAYOUTS[layout](backend.put(x)).requires_grad_(True)
    td = backend.put(target)
    if prob:
        td = LAYOUTS[target_layout](td).requires_grad_(target_grad)
    wd = backend.put(weight)
    with backend.active():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = xent.cross_entropy(xd, td, wd, **kwargs)

    what = f"loss[{backend.name}, {tuple(x.shape)}, {layout}, reduction={effective}]"
    assert loss.dtype == dtype, f"{what}: dtype {loss.dtype}, expected the input's {dtype}"
    assert loss.shape == refs.loss_pt.shape, f"{what}: shape {tuple(loss.shape)}, PyTorch {tuple(refs.loss_pt.shape)}"
    assert loss.device.type == dev.type
    if refs.loss_low is not None:
        assert refs.loss_low.shape == loss.shape
    for j, (expected, name) in enumerate(((refs.loss_pt, "vs F.cross_entropy float64"),
                                          (refs.loss_ref, "vs reference"))):
        err_low = None if refs.loss_err_low is None else refs.loss_err_low[j]
        assert_loss(loss.detach().cpu(), expected, err_low, dtype=dtype, scale=refs.scale, what=f"{what} {name}")

    if not backward:
        return loss

    go = backend.put(refs.go_base).expand(refs.go_shape)
    inputs_x = [xd] + ([td] if target_grad else [])
    with backend.active():
        grads = torch.autograd.grad(loss, inputs_x, go)

    names = ["grad_input", "grad_target"]
    for i, g in enumerate(grads):
        gwhat = f"{names[i]}[{backend.name}, {tuple(x.shape)}, {layout}, reduction={effective}]"
        inp = inputs_x[i]
        assert g is not None, f"{gwhat}: no gradient"
        assert g.dtype == inp.dtype, f"{gwhat}: dtype {g.dtype} != input's {inp.dtype}"
        assert g.shape == inp.shape, f"{gwhat}: shape {tuple(g.shape)} != input's {tuple(inp.shape)}"
        if i == 0:
            # The fake kernel promises empty_like(logits, preserve_format) strides (csrc/cpu/cross_entropy.cpp
            # and xent/_ops.py); torch.compile relies on eager returning exactly those.
            expected_strides = torch.empty_like(inp, memory_format=torch.preserve_format).stride()
            if g.numel() > 1:
                assert g.stride() == expected_strides, (
                    f"{gwhat}: strides {g.stride()} != {expected_strides} promised by the fake kernel "
                    f"(input strides {inp.stride()})"
                )
        for j, (expected, name) in enumerate(((refs.grads_pt[i], "vs F.cross_entropy float64"),
                                              (refs.grads_ref[i], "vs reference"))):
            assert expected is not None
            assert_grad(g.cpu(), expected, refs.grads_err_low[i][j], dtype=inp.dtype, what=f"{gwhat} {name}",
                        term_scale=refs.term_scale if i == 0 else 0.0)
    return loss


# ================================================================================================
# The reference itself.

REFERENCE_GRID = list(
    itertools.product(
        [(7, 5), (3, 5, 4), (2, 4, 3, 2), (5,)],  # 2-d, K-dim, unbatched
        [False, True],  # weight
        [(-100, 0.0), (-100, 0.3), (1, 0.3), (-3, 0.3)],  # (ignore_index, fraction ignored)
        [0.0, 0.1, 1.0],  # label smoothing
        REDUCTIONS,
    )
)


@pytest.mark.parametrize("shape,weighted,ignore,smoothing,reduction", REFERENCE_GRID)
def test_reference_matches_pytorch(shape, weighted, ignore, smoothing, reduction):
    """tests/reference.py agrees with F.cross_entropy in float64 (loss and gradient), so the parity
    tests' two references are interchangeable."""
    ignore_index, ignored = ignore
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, F64)
    if len(shape) == 1:
        target = make_target((), C)
    else:
        target = make_target(positions_of(shape), C, ignore_index=ignore_index, ignored=ignored)
    w = make_weight(C, F64) if weighted else None
    for tgt in (target, make_prob_target(shape, F64)):
        kw = dict(reduction=reduction, label_smoothing=smoothing)
        if not tgt.is_floating_point():
            kw["ignore_index"] = ignore_index
        x1, x2 = _leaf(x, True), _leaf(x, True)
        a = cross_entropy_reference(x1, tgt, w, **kw)
        b = F.cross_entropy(x2, tgt, w, **kw)
        # Both are float64 with different summation orders: 1e-13 relative.
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, equal_nan=True)
        go = torch.randn(a.shape, dtype=F64)
        (ga,) = torch.autograd.grad(a, x1, go)
        (gb,) = torch.autograd.grad(b, x2, go)
        torch.testing.assert_close(ga, gb, rtol=1e-13, atol=1e-13, equal_nan=True)


def test_reference_all_ignored_mean_is_nan():
    x = make_logits((4, 3), F64)
    t = torch.full((4,), -100)
    assert torch.isnan(cross_entropy_reference(x, t))
    assert torch.isnan(F.cross_entropy(x, t))


# ================================================================================================
# Shapes x dtypes x reductions.

SHAPES_2D = [(N, C) for N in (0, 1, 7, 1000) for C in (1, 2, 3, 1000)] + [
    (N, C) for N in (1, 7) for C in (32000, 50257)
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES_2D, ids=lambda s: "x".join(map(str, s)))
def test_shapes(backend, shape, dtype, reduction):
    N, C = shape
    x = make_logits(shape, dtype)
    check_cross_entropy(backend, x, make_target((N,), C), reduction=reduction)


KDIM_SHAPES = [(3, 5, 4), (2, 7, 3, 4), (2, 3, 1), (1, 4, 1, 1), (2, 5, 0), (0, 5, 3, 2), (2, 1000, 9), (4, 3, 33, 17)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", KDIM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kdim_shapes(backend, shape, dtype, reduction):
    x = make_logits(shape, dtype)
    check_cross_entropy(backend, x, make_target(positions_of(shape), shape[1]), reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", [1, 3, 1000])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_unbatched(backend, kind, C, dtype, reduction):
    """(C) logits with a () class-index target or a (C) probability target."""
    x = make_logits((C,), dtype)
    target = make_target((), C) if kind == "index" else make_prob_target((C,), dtype)
    check_cross_entropy(backend, x, target, reduction=reduction, label_smoothing=0.1)


# ================================================================================================
# Options and their combinations.

# (ignore_index, fraction of targets ignored)
IGNORE_CASES = {
    "default_none_ignored": (-100, 0.0),
    "default_some_ignored": (-100, 0.3),
    "valid_class_0": (0, 0.0),  # ignore_index is a valid class: every target 0 is ignored
    "negative_-7_some_ignored": (-7, 0.3),
    "all_ignored": (-100, 1.0),  # mean is 0 / 0 = NaN, as in PyTorch
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore", list(IGNORE_CASES), ids=str)
@pytest.mark.parametrize("weight", ["none", "weight", "weight_with_zero"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)  # bfloat16/float16: test_options_low_precision
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4)], ids=lambda s: "x".join(map(str, s)))
def test_options(backend, shape, dtype, weight, ignore, label_smoothing, reduction):
    ignore_index, ignored = IGNORE_CASES[ignore]
    C = shape[1]
    x = make_logits(shape, dtype)
    target = make_target(positions_of(shape), C, ignore_index=ignore_index, ignored=ignored)
    w = None if weight == "none" else make_weight(C, dtype, with_zero=weight == "weight_with_zero")
    check_cross_entropy(
        backend, x, target, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore", ["negative_-5_some_ignored", "valid_class_0", "all_ignored"])
@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_options_low_precision(backend, dtype, ignore, label_smoothing, reduction):
    """bfloat16 / float16 with weight, ignore_index and label smoothing together, 2-d and K-dim."""
    ignore_index, ignored = {"negative_-5_some_ignored": (-5, 0.3), "valid_class_0": (0, 0.0),
                             "all_ignored": (-100, 1.0)}[ignore]
    for shape in [(7, 5), (2, 6, 3, 2)]:
        C = shape[1]
        x = make_logits(shape, dtype)
        target = make_target(positions_of(shape), C, ignore_index=ignore_index, ignored=ignored)
        check_cross_entropy(
            backend, x, target, make_weight(C, dtype), ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing,
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(7, 32000), (2, 50257)], ids=lambda s: "x".join(map(str, s)))
def test_options_large_vocab(backend, shape, dtype, reduction):
    """Weight + ignore_index + label smoothing on large class counts (the chunked / split-row paths)."""
    N, C = shape
    x = make_logits(shape, dtype)
    target = make_target((N,), C, ignore_index=3, ignored=0.3)
    check_cross_entropy(backend, x, target, make_weight(C, dtype), ignore_index=3, reduction=reduction,
                        label_smoothing=0.1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "shape,dtype",
    [((32768, 80), F32), ((8192, 513), BF16), ((2100, 4096), F32), ((2050, 4100), F32)],
    ids=["short-rows-f32", "short-rows-bf16", "stage-sized-rows-f32", "long-rows-f32"],
)
def test_streamed_gradients(backend, shape, dtype, reduction):
    """Gradients large enough for the CPU kernels' non-temporal stores (csrc/cpu/grad_buffer.h): short rows
    through a staging buffer from 8 MiB on, longer rows from the exp loop from 32 MiB on; with weight,
    ignore_index and label smoothing, and without (the index hot path)."""
    N, C = shape
    x = make_logits(shape, dtype)
    target = make_target((N,), C, ignore_index=3, ignored=0.3)
    check_cross_entropy(backend, x, target, make_weight(C, dtype), ignore_index=3, reduction=reduction,
                        label_smoothing=0.1)
    check_cross_entropy(backend, x, make_target((N,), C), reduction=reduction)


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8], ids=dtype_id)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (5, 200)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_target_dtypes(backend, target_dtype, dtype, shape, reduction):
    """int64, int32 and uint8 class indices (int32 is an xent extension: PyTorch gets the same values
    as int64). uint8 cannot hold -100: ignore_index 255 is used there."""
    C = shape[1]
    ignore_index = 255 if target_dtype == torch.uint8 else -100
    target = make_target(positions_of(shape), C, ignore_index=ignore_index, ignored=0.3).to(target_dtype)
    x = make_logits(shape, dtype)
    check_cross_entropy(backend, x, target, make_weight(C, dtype), ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=0.1)


LEGACY = [(sa, r) for sa in (None, True, False) for r in (None, True, False) if (sa, r) != (None, None)]


@pytest.mark.parametrize("size_average,reduce", LEGACY)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_deprecated_size_average_reduce(backend, size_average, reduce, reduction):
    """size_average/reduce override `reduction`, as in PyTorch."""
    x = make_logits((6, 4), F32)
    target = make_target((6,), 4, ignored=0.3)
    check_cross_entropy(backend, x, target, make_weight(4, F32), size_average=size_average, reduce=reduce,
                        reduction=reduction)


# ================================================================================================
# Probability targets.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (2, 3, 2, 3)], ids=lambda s: "x".join(map(str, s)))
def test_prob_targets(backend, shape, dtype, weighted, label_smoothing, reduction):
    """Loss, gradient w.r.t. the logits and w.r.t. the (grad-requiring) probability target."""
    x = make_logits(shape, dtype)
    target = make_prob_target(shape, dtype)
    w = make_weight(shape[1], dtype) if weighted else None
    check_cross_entropy(backend, x, target, w, reduction=reduction, label_smoothing=label_smoothing,
                        target_grad=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "shape", [(0, 5), (1, 1), (1000, 3), (2, 50257), (7, 1000), (0, 4, 3)], ids=lambda s: "x".join(map(str, s))
)
def test_prob_targets_shapes(backend, shape, dtype, reduction):
    x = make_logits(shape, dtype)
    target = make_prob_target(shape, dtype)
    check_cross_entropy(backend, x, target, make_weight(shape[1], dtype), reduction=reduction,
                        label_smoothing=0.1, target_grad=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
def test_prob_targets_unnormalized(backend, dtype, reduction):
    """Probability targets are not required to sum to 1 (or be non-negative) in PyTorch."""
    for shape in [(7, 5), (3, 5, 4), (2, 5000)]:
        x = make_logits(shape, dtype)
        target = make_prob_target(shape, dtype, kind="unnormalized")
        check_cross_entropy(backend, x, target, make_weight(shape[1], dtype), reduction=reduction,
                            label_smoothing=0.1, target_grad=True)


# ================================================================================================
# Memory layouts and upstream gradients.

LAYOUT_CASES = [
    ((7, 5), "transposed"),
    ((300, 37), "transposed"),  # more positions than a vector, with a tail
    ((7, 5), "class_sliced"),
    ((7, 5000), "class_sliced"),
    ((7, 5), "batch_sliced"),
    ((7, 5), "misaligned"),
    ((5, 1000), "misaligned"),
    ((3, 5, 4), "channels_last"),
    ((2, 5, 3, 4), "channels_last"),
    ((2, 300, 5, 7), "channels_last"),
    ((3, 5, 4), "permuted"),
    ((2, 5, 3, 4), "permuted"),
    ((3, 5, 4), "spatial_sliced"),
    ((2, 5, 3, 4), "spatial_sliced"),
    ((3, 5, 4), "misaligned"),
    ((2, 5, 3, 37), "misaligned"),
    ((2, 5, 3, 4), "batch_sliced"),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=dtype_id)
@pytest.mark.parametrize("shape,layout", LAYOUT_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_layouts(backend, shape, layout, dtype, reduction):
    """Non-contiguous and misaligned logits, with every option on; the gradient has the strides the
    fake kernel promises (checked in check_cross_entropy)."""
    C = shape[1]
    x = make_logits(shape, dtype)
    target = make_target(positions_of(shape), C, ignore_index=-100, ignored=0.2)
    check_cross_entropy(backend, x, target, make_weight(C, dtype), reduction=reduction, label_smoothing=0.1,
                        layout=layout)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize(
    "shape,layout,target_layout",
    [
        ((7, 5), "transposed", "contiguous"),
        ((7, 5), "contiguous", "transposed"),
        ((7, 5), "transposed", "transposed"),
        ((7, 5), "class_sliced", "misaligned"),
        ((7, 300), "misaligned", "class_sliced"),
        ((2, 5, 3, 4), "channels_last", "contiguous"),
        ((2, 5, 3, 4), "contiguous", "channels_last"),
        ((2, 5, 3, 4), "permuted", "spatial_sliced"),
        ((3, 5, 4), "channels_last", "channels_last"),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_prob_target_layouts(backend, shape, layout, target_layout, dtype, reduction):
    x = make_logits(shape, dtype)
    target = make_prob_target(shape, dtype)
    check_cross_entropy(backend, x, target, make_weight(shape[1], dtype), reduction=reduction,
                        label_smoothing=0.1, layout=layout, target_layout=target_layout, target_grad=True)


@pytest.mark.parametrize("grad_output", ["expanded", "expanded_row", "ones"])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (2, 5, 3, 4)], ids=lambda s: "x".join(map(str, s)))
def test_broadcast_grad_output(backend, shape, kind, dtype, grad_output):
    """reduction='none' with an expanded (stride-0) upstream gradient."""
    x = make_logits(shape, dtype)
    if kind == "index":
        target = make_target(positions_of(shape), shape[1], ignored=0.2)
    else:
        target = make_prob_target(shape, dtype)
    check_cross_entropy(backend, x, target, make_weight(shape[1], dtype), reduction="none",
                        label_smoothing=0.1, grad_output=grad_output, target_grad=kind == "prob")


@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
def test_expanded_logits(backend, dtype):
    """Logits broadcast along the batch (batch stride 0) and along the classes (class stride 0)."""
    row = make_logits((1, 6), dtype)
    x_batch = row.expand(5, 6)
    col = make_logits((5, 1), dtype)
    x_class = col.expand(5, 6)
    for x in (x_batch, x_class):
        target = make_target((5,), 6)
        xd = backend.put(x.contiguous())
        xd = (xd[:1].expand(5, 6) if x is x_batch else xd[:, :1].expand(5, 6)).requires_grad_(True)
        td = backend.put(target)
        with backend.active():
            loss = xent.cross_entropy(xd, td, reduction="sum", label_smoothing=0.1)
            (g,) = torch.autograd.grad(loss, xd)
        x64 = _leaf(x.double(), True)
        ref = F.cross_entropy(x64, target, reduction="sum", label_smoothing=0.1)
        (g64,) = torch.autograd.grad(ref, x64)
        assert_loss(loss.cpu(), ref, None, dtype=dtype, scale=loss_scale(x64, target, None, ignore_index=-100,
                    label_smoothing=0.1, reduction="sum"), what="expanded logits loss")
        assert_grad(g.cpu(), g64, None, dtype=dtype, what="expanded logits grad")
        assert g.is_contiguous(), f"gradient of expanded logits should be contiguous, strides {g.stride()}"


# ================================================================================================
# Every warp schedule of the emulated CUDA kernels, on a subset reaching every kernel path.

SCHEDULE_CASES = {
    "rows_small": ((7, 3), F32, "index", "contiguous", dict(reduction="none")),
    "rows_options": ((1000, 1000), F32, "index", "contiguous",
                     dict(reduction="mean", weighted=True, label_smoothing=0.1, ignored=0.2)),
    "split_rows_bf16": ((2, 50257), BF16, "index", "contiguous",
                        dict(reduction="sum", weighted=True, label_smoothing=0.1, ignored=0.3)),
    "one_row_f16": ((1, 32000), F16, "index", "contiguous", dict(reduction="none", label_smoothing=1.0)),
    "lanes_kdim": ((3, 17, 5, 7), F32, "index", "contiguous",
                   dict(reduction="none", weighted=True, label_smoothing=0.1, ignored=0.2)),
    "lanes_f64": ((2, 300, 33), F64, "index", "contiguous", dict(reduction="mean", ignored=0.2)),
    "transposed": ((300, 37), F32, "index", "transposed", dict(reduction="sum", weighted=True)),
    "channels_last": ((2, 300, 5, 7), BF16, "index", "channels_last", dict(reduction="none", label_smoothing=0.1)),
    "class_sliced": ((7, 5000), F32, "index", "class_sliced", dict(reduction="mean", weighted=True)),
    "all_ignored": ((7, 50), F32, "index", "contiguous", dict(reduction="mean", ignored=1.0, label_smoothing=0.1)),
    "empty": ((0, 5), F32, "index", "contiguous", dict(reduction="mean")),
    "prob_rows": ((7, 1003), F32, "prob", "contiguous", dict(reduction="mean", weighted=True, label_smoothing=0.1)),
    "prob_split_rows": ((2, 50257), F32, "prob", "contiguous", dict(reduction="sum", label_smoothing=0.1)),
    "prob_lanes_bf16": ((3, 17, 5, 7), BF16, "prob", "contiguous", dict(reduction="none", weighted=True)),
}


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_emulated_schedules(schedule_backend, case):
    shape, dtype, kind, layout, opts = SCHEDULE_CASES[case]
    opts = dict(opts)
    weighted = opts.pop("weighted", False)
    ignored = opts.pop("ignored", 0.0)
    C = shape[1]
    x = make_logits(shape, dtype)
    if kind == "index":
        target = make_target(positions_of(shape), C, ignored=ignored)
    else:
        target = make_prob_target(shape, dtype)
    w = make_weight(C, dtype) if weighted else None
    check_cross_entropy(schedule_backend, x, target, w, layout=layout, target_grad=kind == "prob", **opts)


# ================================================================================================
# The project's float32 accuracy target, without the cancellation allowance.


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(7, 3), (1000, 1000), (7, 32000), (2, 50257), (4, 16, 9, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float32_loss_relative_1e6(backend, shape, reduction, label_smoothing):
    """The float32 loss is within 1e-6 relative of the exact value (mean/sum of well-conditioned
    losses: the logits have scale 1, so no position's loss is a tiny difference of large terms)."""
    x = make_logits(shape, F32, scale=1.0)
    target = make_target(positions_of(shape), shape[1])
    w = make_weight(shape[1], F32)
    with backend.active():
        loss = xent.cross_entropy(backend.put(x), backend.put(target), backend.put(w), reduction=reduction,
                                  label_smoothing=label_smoothing)
    exact = F.cross_entropy(x.double(), target, w.double(), reduction=reduction, label_smoothing=label_smoothing)
    rel = abs(loss.item() - exact.item()) / abs(exact.item())
    assert rel <= 1e-6, f"float32 loss relative error {rel:.3e} > 1e-6 (xent {loss.item()!r}, exact {exact.item()!r})"


@pytest.mark.parametrize("reduction", ["none", "mean"])  # the separate backward op; the fused op
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_float32_gradient_with_large_logits_cpu(offset, reduction):
    """Class-index rows that fit a block (the CPU short-row kernels): the float32 gradient stays within a
    few ulp of the exact softmax when every logit is large. Taken from lse, each p would carry lse's
    rounding (half an ulp of 1e4, 5e-4 relative); the kernels take it from the exponentials' own sum."""
    x = make_logits((64, 80), F32, scale=3.0) + offset
    target = make_target((64,), 80)
    xl = x.clone().requires_grad_()
    loss = xent.cross_entropy(xl, target, reduction=reduction)
    (g,) = torch.autograd.grad(loss.sum() if reduction == "none" else loss, xl)
    x64 = x.double().requires_grad_()
    exact = F.cross_entropy(x64, target, reduction=reduction)
    (g64,) = torch.autograd.grad(exact.sum() if reduction == "none" else exact, x64)
    err = ((g.double() - g64).abs() / g64.abs().max()).max().item()
    assert err <= 1e-6, f"float32 gradient error {err:.3e} (of the largest element) at logits ~{offset}"


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "softmax_focal_loss"])
@pytest.mark.parametrize("targets", ["uniform", "softmax"])
@pytest.mark.parametrize("shape", [(2, 5000, 64), (256, 5000)], ids=["lanes", "rows"])
def test_float32_probability_targets_over_many_classes(backend, loss_fn, targets, shape):
    """Probability targets over 5000 classes: each position's sums over the classes (sum w q, sum w q x,
    sum exp) must not drift. In the lanes layout ((N, C, S), spatial stride 1) as one running float sum of
    5000 equal-sized terms, cross-entropy's loss was off by 6e-4 (eager: 1e-7) on the CPU and in the CUDA
    kernels (emulated), softmax focal's by 2e-5 on the CPU; in the CPU rows layout each vector lane's sum
    of 5000 / 16 terms put it 1.3e-5 off (twelve ulps). The kernels add blocks of classes into doubles.
    Bound: four ulps of the float32 result (the CUDA kernels finish each position in float, lse = m +
    log(s) and then lse * sum(w q) - sum(w q x), and take the mean with a float tree: 2.5 ulps seen), or
    twice eager's error when that is larger."""
    with fixed_rng(7):
        x64 = torch.randn(*shape, dtype=torch.float64) * 2
        t64 = torch.full_like(x64, 1 / 5000) if targets == "uniform" else torch.softmax(torch.randn_like(x64) * 3, 1)
    x, t = x64.float(), t64.float()
    xd, td = x.to(backend.device), t.to(backend.device)
    if loss_fn == "cross_entropy":
        exact = F.cross_entropy(x.double(), t.double()).item()
        eager_err = abs(F.cross_entropy(x, t).item() - exact)
        with backend.active():
            ours = xent.cross_entropy(xd, td).item()
    else:
        exact = softmax_focal_loss_reference(x.double(), t.double(), gamma=2.0).item()
        eager_err = 0.0
        with backend.active():
            ours = xent.softmax_focal_loss(xd, td, gamma=2.0).item()
    bound = max(2 * eager_err, abs(exact) * 2**-21)
    assert abs(ours - exact) <= bound, f"{loss_fn} loss error {abs(ours - exact):.3e} > {bound:.3e} (loss {exact:.4f})"


# ================================================================================================
# Special values.


def _special_rows(dtype):
    inf, nan = math.inf, math.nan
    rows = [
        ([0.0, nan, 1.0], 0),  # NaN logit -> NaN loss
        ([0.0, -inf, 1.0], 0),  # -inf non-target logit: fine
        ([0.0, -inf, 1.0], 1),  # -inf target logit -> inf loss
        ([0.0, inf, 1.0], 0),  # +inf -> NaN
        ([0.0, inf, 1.0], 1),  # +inf target -> NaN
        ([-inf, -inf, -inf], 1),  # all -inf -> NaN
        ([1e4 if dtype != F16 else 6e4, 0.0, -5.0], 2),  # huge logit, no overflow in lse
        ([-1e4 if dtype != F16 else -6e4, 0.0, 5.0], 0),
    ]
    return rows


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_special_values(backend, dtype, label_smoothing):
    """NaN and infinite logits give PyTorch's values (reduction='none', one row per case, and also
    each case placed inside a long row so that the vectorized and chunked paths see it)."""
    for values, t in _special_rows(dtype):
        for C_pad in (0, 5000):
            row = torch.tensor(values, dtype=F64)
            if C_pad:
                row = torch.cat([row, torch.full((C_pad,), -3.0, dtype=F64)])
            x = row.to(dtype).unsqueeze(0)
            target = torch.tensor([t])
            exact = F.cross_entropy(x.double(), target, reduction="none", label_smoothing=label_smoothing)
            ref = cross_entropy_reference(x.double(), target, reduction="none", label_smoothing=label_smoothing)
            # Two float64 computations of the same formula: 1e-13 relative.
            torch.testing.assert_close(exact, ref, rtol=1e-13, atol=1e-13, equal_nan=True)
            low = F.cross_entropy(x, target, reduction="none", label_smoothing=label_smoothing)
            with backend.active():
                loss = xent.cross_entropy(backend.put(x), backend.put(target), reduction="none",
                                          label_smoothing=label_smoothing)
            scale = loss_scale(x.double(), target, None, ignore_index=-100, label_smoothing=label_smoothing,
                               reduction="none")
            assert_loss(loss.cpu(), exact, max_abs_err(low, exact), dtype=dtype, scale=scale,
                        what=f"special logits {values[:3]} target {t} pad {C_pad}")


@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
def test_neg_inf_non_target_gradient(backend, dtype):
    """-inf non-target logits (masked vocabularies) give finite gradients, 0 at the masked classes."""
    x = make_logits((6, 40), dtype)
    x[:, ::3] = -math.inf
    target = torch.tensor([1, 2, 4, 5, 7, 8])
    check_cross_entropy(backend, x, target, reduction="mean")
    check_cross_entropy(backend, x, target, reduction="none")


# ================================================================================================
# Bad inputs: xent raises what PyTorch raises.


def _bad_input_cases():
    x = make_logits((4, 5), F32)
    t = make_target((4,), 5)
    x3 = make_logits((2, 5, 3), F32)
    p = make_prob_target((4, 5), F32)
    meta = torch.device("meta")
    # name: (args, kwargs, words: one of them must appear in xent's message, lower case)
    return {
        "target_out_of_range": ((x, torch.tensor([0, 1, 5, 2])), {}, ["out of bounds", "range"]),
        "target_negative_not_ignore_index": ((x, torch.tensor([0, -1, 3, 2])), {}, ["out of bounds", "range"]),
        "target_out_of_range_kdim": ((x3, torch.tensor([[0, 1, 2], [3, 4, 5]])), {}, ["out of bounds", "range"]),
        "target_out_of_range_ignore_index_set": ((x, torch.tensor([0, -100, 3, 2])), {"ignore_index": -1},
                                                 ["out of bounds", "range"]),
        "batch_size_mismatch": ((x, torch.tensor([0, 1, 2])), {}, ["batch_size", "batch size"]),
        "batch_size_mismatch_kdim": ((x3, torch.zeros(3, 3, dtype=torch.long)), {}, ["batch_size", "batch size"]),
        "kdim_target_shape_mismatch": ((x3, torch.zeros(2, 4, dtype=torch.long)), {}, ["target size", "shape"]),
        "kdim_target_missing_dim": ((x3, torch.zeros(2, dtype=torch.long)), {}, ["target size", "shape"]),
        "float_target_wrong_shape": ((x, torch.rand(4, 4)), {}, ["target", "dtype"]),
        "float_target_class_shape": ((x, torch.rand(4)), {}, ["dtype", "long"]),
        "long_target_probability_shape": ((x, torch.zeros(4, 5, dtype=torch.long)), {}, ["floating point"]),
        "float16_class_targets": ((x, torch.zeros(4, dtype=torch.float16)), {}, ["dtype", "half"]),
        "int16_class_targets": ((x, torch.zeros(4, dtype=torch.int16)), {}, ["dtype", "short"]),
        "bool_class_targets": ((x, torch.zeros(4, dtype=torch.bool)), {}, ["dtype", "bool"]),
        "weight_wrong_size": ((x, t), {"weight": torch.ones(4)}, ["weight"]),
        "weight_2d": ((x, t), {"weight": torch.ones(1, 5)}, ["weight"]),
        "weight_wrong_dtype": ((x, t), {"weight": torch.ones(5, dtype=F64)}, ["weight", "double", "float"]),
        # PyTorch promotes (float64 result) here instead of raising:
        "weight_wrong_dtype_prob_target": ((x, p), {"weight": torch.ones(5, dtype=F64)}, ["weight", "dtype"]),
        "prob_target_wrong_dtype": ((x, p.double()), {}, ["dtype"]),
        # PyTorch accepts a (1,) target for an unbatched (C) input:
        "unbatched_input_with_1_element_target": ((x[0], t[:1]), {"reduction": "none"}, ["target", "size"]),
        "label_smoothing_negative": ((x, t), {"label_smoothing": -0.1}, ["label_smoothing"]),
        "label_smoothing_above_one": ((x, t), {"label_smoothing": 1.1}, ["label_smoothing"]),
        "label_smoothing_above_one_prob": ((x, p), {"label_smoothing": 1.1}, ["label_smoothing"]),
        "invalid_reduction": ((x, t), {"reduction": "avg"}, ["reduction"]),
        "zero_dim_input_long_target": ((torch.tensor(1.0), torch.tensor(0)), {}, ["dim", "floating point"]),
        "zero_dim_input_float_target": ((torch.tensor(1.0), torch.tensor(1.0)), {}, ["dim"]),
        "ignore_index_with_prob_target": ((x, p), {"ignore_index": 0}, ["ignore_index"]),
        "integer_logits": ((torch.zeros(4, 5, dtype=torch.long), t), {}, ["long", "dtype", "implemented"]),
        "target_on_other_device": ((x, t.to(meta)), {}, ["device"]),
        "weight_on_other_device": ((x, t), {"weight": torch.ones(5, device=meta)}, ["device"]),
        "prob_target_on_other_device": ((x, p.to(meta)), {}, ["device"]),
        "logits_on_other_device": ((x.to(meta), t), {}, ["device"]),
    }


BAD_INPUT_CASES = _bad_input_cases()

# Where xent deliberately refuses what PyTorch 2.14 accepts (README, "Where xent deliberately differs"):
# it raises RuntimeError naming the problem.
INTENDED_ERRORS = {
    "label_smoothing_negative": "label smoothing outside [0, 1] is an error (PyTorch treats a negative value as 0)",
    "weight_wrong_dtype_prob_target": "weight must have the logits' dtype (PyTorch promotes with probability targets)",
    "prob_target_wrong_dtype": "probability targets must have the logits' dtype (PyTorch promotes)",
}


@pytest.mark.parametrize("case", list(BAD_INPUT_CASES))
def test_bad_inputs(case):
    """Whatever PyTorch raises for the case, xent raises the same exception type (or a subclass) with a
    message naming the problem; where PyTorch does not raise, xent returns PyTorch's value."""
    args, kwargs, words = BAD_INPUT_CASES[case]
    if case in INTENDED_ERRORS:
        with pytest.raises(RuntimeError) as info:
            xent.cross_entropy(*args, **kwargs)
        message = str(info.value).lower()
        assert any(w in message for w in words), f"{case}: xent's message {str(info.value)!r} names none of {words}"
        return
    try:
        expected = F.cross_entropy(*args, **kwargs)
        torch_error = None
    except Exception as e:  # noqa: BLE001
        torch_error = e
    if torch_error is None:
        got = xent.cross_entropy(*args, **kwargs)
        assert got.device == expected.device and got.dtype == expected.dtype and got.shape == expected.shape, (
            f"{case}: PyTorch returns {expected.dtype} {tuple(expected.shape)} on {expected.device}, xent "
            f"{got.dtype} {tuple(got.shape)} on {got.device}"
        )
        # Same dtype on both sides (float32 here): assert_close's float32 defaults (1.3e-6 relative,
        # about the project's 1e-6 target); this checks behaviour (no error, same value), not accuracy.
        torch.testing.assert_close(got, expected, equal_nan=True)
        return
    with pytest.raises(Exception) as info:
        xent.cross_entropy(*args, **kwargs)
    err = info.value
    assert isinstance(err, type(torch_error)), (
        f"{case}: PyTorch raises {type(torch_error).__name__}({torch_error}); xent raises "
        f"{type(err).__name__}({err})"
    )
    message = str(err).lower()
    assert any(w in message for w in words), f"{case}: xent's message {str(err)!r} names none of {words}"


def test_bad_inputs_match_pytorch_behavior_for_valid_edge_cases():
    """Edge cases PyTorch accepts and xent must too."""
    x = make_logits((4, 5), F32)
    # Negative ignore_index equal to a target's value: ignored, not out of range.
    t = torch.tensor([0, -1, 3, 2])
    # float32 on both sides: assert_close's float32 defaults (1.3e-6 relative, about the 1e-6 target).
    torch.testing.assert_close(xent.cross_entropy(x, t, ignore_index=-1), F.cross_entropy(x, t, ignore_index=-1))
    # Probability targets with a negative ignore_index other than -100 (PyTorch only rejects >= 0).
    p = make_prob_target((4, 5), F32)
    torch.testing.assert_close(xent.cross_entropy(x, p, ignore_index=-1), F.cross_entropy(x, p, ignore_index=-1))
    # Everything on the meta device: shapes and dtypes only, like PyTorch.
    meta = torch.device("meta")
    for tgt in (make_target((4,), 5), p):
        for reduction in REDUCTIONS:
            got = xent.cross_entropy(x.to(meta), tgt.to(meta), torch.ones(5, device=meta), reduction=reduction)
            want = F.cross_entropy(x.to(meta), tgt.to(meta), torch.ones(5, device=meta), reduction=reduction)
            assert got.device == meta and got.shape == want.shape and got.dtype == want.dtype
    # Out-of-range targets with C = 0 classes raise IndexError in both.
    with pytest.raises(IndexError):
        F.cross_entropy(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(IndexError):
        xent.cross_entropy(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
def test_mean_over_zero_weight_targets_is_nan(backend, label_smoothing):
    """Every non-ignored target weighs 0: PyTorch's mean is NaN with or without label smoothing (its
    smoothed mean adds the smoothing term to an NLL mean of 0 / 0), and so is the gradient of every
    non-ignored position; ignored positions keep a zero gradient. (A fuzzer found inf here with smoothing.)"""
    x = torch.tensor([[-4.0, 6.5, 0.5], [1.0, 2.0, 3.0], [0.5, 0.1, -2.0]])
    target = torch.tensor([1, -100, 1])
    w = torch.tensor([2.0, 0.0, 1.0])
    xr = x.clone().requires_grad_()
    want = F.cross_entropy(xr, target, w, label_smoothing=label_smoothing)
    (g_want,) = torch.autograd.grad(want, xr)
    assert want.isnan() and g_want[[0, 2]].isnan().all() and (g_want[1] == 0).all()  # PyTorch's behaviour
    with backend.active():
        # A plain backward takes the fused op's saved gradient (CPU); create_graph, the separate backward op.
        for create_graph in (False, True):
            xl = backend.put(x).requires_grad_()
            loss = xent.cross_entropy(xl, backend.put(target), backend.put(w), label_smoothing=label_smoothing)
            (g,) = torch.autograd.grad(loss, xl, create_graph=create_graph)
            assert loss.isnan().item(), f"xent mean {loss.item()} is not NaN"
            g = g.detach().cpu()
            assert g[[0, 2]].isnan().all() and (g[1] == 0).all(), f"gradient {g}"


def test_unbatched_input_with_a_longer_target_raises_value_error():
    """A (C) input is one position: a (k) class target with k != 1 is a batch-size mismatch, ValueError in
    PyTorch (found by a fuzzer: xent raised RuntimeError from its kernel's shape check)."""
    x, t = torch.randn(5), torch.tensor([0, 1])
    with pytest.raises(ValueError):
        F.cross_entropy(x, t)
    for fn in (xent.cross_entropy, xent.softmax_focal_loss):
        with pytest.raises(ValueError, match="batch_size"):
            fn(x, t)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_strided_kdim_input(kind, reduction):
    """An empty K-dim input whose strides fit no kernel layout (found by a fuzzer: contiguous() returns an
    empty tensor unchanged, and the layout plan asserted; the fused path recursed without end)."""
    x = torch.zeros(0, 3, 4)[..., ::2].requires_grad_()
    t = torch.zeros(0, 3, 4)[..., ::2] if kind == "prob" else torch.zeros(0, 2, dtype=torch.long)
    for fn in (xent.cross_entropy, xent.softmax_focal_loss):
        loss = fn(x, t, reduction=reduction)
        want = F.cross_entropy(x, t, reduction=reduction)
        assert loss.shape == want.shape
        torch.testing.assert_close(loss, want, equal_nan=True)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert g.shape == x.shape
    nll = xent.nll_loss(x, torch.zeros(0, 2, dtype=torch.long), reduction=reduction)
    assert nll.shape == F.nll_loss(x, torch.zeros(0, 2, dtype=torch.long), reduction=reduction).shape


@pytest.mark.parametrize("op", ["fwd", "prob_fwd"])
def test_ops_reject_other_device_arguments(op):
    """The ops themselves (not only the Python wrapper) refuse arguments on another device: a meta
    target must not send a CPU call to the fake kernel, which returns uninitialized memory."""
    x = make_logits((4, 5), F32)
    meta = torch.device("meta")
    if op == "fwd":
        call = lambda t, w: torch.ops.xent.cross_entropy_fwd(x, t, w)  # noqa: E731
        t = make_target((4,), 5)
    else:
        call = lambda t, w: torch.ops.xent.cross_entropy_prob_fwd(x, t, w)  # noqa: E731
        t = make_prob_target((4, 5), F32)
    for target, weight in ((t.to(meta), None), (t, torch.ones(5, device=meta))):
        with pytest.raises(RuntimeError, match="device"):
            call(target, weight)


# ================================================================================================
# torch.library.opcheck on every op.


def _opcheck_samples():
    ops = torch.ops.xent
    samples = []

    def index_samples(shape, dtype, weight, kw):
        C = shape[1]
        x = make_logits(shape, dtype).requires_grad_()
        t = make_target(positions_of(shape), C, ignored=0.2, ignore_index=kw.get("ignore_index", -100))
        keep_first_target(t, kw.get("ignore_index", -100))
        w = make_weight(C, dtype) if weight else None
        samples.append((ops.cross_entropy_fwd, (x, t, w), kw))
        loss, lse = ops.cross_entropy_fwd(x.detach(), t, w, **kw)
        g = make_logits(loss.shape, dtype, 1.0).requires_grad_()
        samples.append((ops.cross_entropy_bwd, (g, x, t, w, lse), kw))

    def prob_samples(shape, dtype, weight, kw):
        x = make_logits(shape, dtype).requires_grad_()
        t = make_prob_target(shape, dtype).requires_grad_()
        w = make_weight(shape[1], dtype) if weight else None
        samples.append((ops.cross_entropy_prob_fwd, (x, t, w), kw))
        loss, lse = ops.cross_entropy_prob_fwd(x.detach(), t.detach(), w, **kw)
        g = make_logits(loss.shape, dtype, 1.0).requires_grad_()
        samples.append((ops.cross_entropy_prob_bwd, (g, x, t, w, lse), kw))

    for dtype in (F32, F64):
        index_samples((4, 5), dtype, False, {})
        index_samples((4, 5), dtype, True, {"reduction": 0, "label_smoothing": 0.1, "ignore_index": 2})
        index_samples((2, 5, 3), dtype, True, {"reduction": 2, "label_smoothing": 0.2})
        index_samples((2, 3, 2, 2), dtype, False, {"reduction": 0})
        prob_samples((4, 5), dtype, False, {})
        prob_samples((4, 5), dtype, True, {"reduction": 0, "label_smoothing": 0.1})
        prob_samples((2, 5, 3), dtype, True, {"reduction": 2, "label_smoothing": 0.3})
    return samples


with fixed_rng(0):  # built at import, before the per-test seed: the same samples every run
    OPCHECK_SAMPLES = _opcheck_samples()


@pytest.mark.parametrize("i", range(len(OPCHECK_SAMPLES)),
                         ids=[f"{s[0]._qualified_op_name.split('::')[-1]}-{j}" for j, s in enumerate(OPCHECK_SAMPLES)])
def test_opcheck(i):
    op, args, kwargs = OPCHECK_SAMPLES[i]
    torch.library.opcheck(op, args, kwargs)


def test_opcheck_covers_every_op():
    names = {s[0]._qualified_op_name.split("::")[-1] for s in OPCHECK_SAMPLES}
    assert names == {"cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_prob_fwd", "cross_entropy_prob_bwd"}


# ================================================================================================
# torch.compile.


def _compile_counter(backend="inductor"):
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend(backend)


@pytest.mark.parametrize("kind", ["index", "prob_kdim"])
def test_compile_fullgraph_inductor(kind):
    """fullgraph=True (no graph break) with Inductor, forward and backward, dynamic=True with two batch
    sizes compiled once, equal to eager xent."""
    torch._dynamo.reset()
    counter = _compile_counter("inductor")

    def f(x, t, w):
        # x * 2 and its backward (a multiply by 2) are exact, so compiled and eager feed the kernels
        # identical values.
        if kind == "index":
            return xent.cross_entropy(x * 2.0, t, w, label_smoothing=0.1, ignore_index=1)
        return xent.cross_entropy(x * 2.0, t, w, label_smoothing=0.1, reduction="sum")

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    w = make_weight(11, F32)
    frames = []
    for N in (6, 13):
        if kind == "index":
            x = make_logits((N, 11), F32)
            t = make_target((N,), 11)
        else:
            x = make_logits((N, 11, 3, 2), F32)
            t = make_prob_target((N, 11, 3, 2), F32)
        results = []
        for fn in (compiled, f):
            xl = _leaf(x, True)
            loss = fn(xl, t, w)
            (g,) = torch.autograd.grad(loss, xl)
            results.append((loss.detach(), g))
        (loss_c, g_c), (loss_e, g_e) = results
        assert loss_c.dtype == loss_e.dtype and loss_c.shape == loss_e.shape
        assert g_c.shape == g_e.shape and g_c.dtype == g_e.dtype
        # The same kernels run on identical inputs: bitwise equal.
        assert torch.equal(loss_c, loss_e), f"compiled loss {loss_c.item()!r} != eager {loss_e.item()!r}"
        assert torch.equal(g_c, g_e), f"compiled gradient differs from eager by {(g_c - g_e).abs().max().item()}"
        frames.append(counter.frame_count)
    # (frame_count counts compiler calls: a restarted analysis of the first call may count twice.)
    assert frames[0] >= 1 and frames[1] == frames[0], f"dynamic=True recompiled for a new batch size: {frames}"


@pytest.mark.parametrize("case", ["index_kdim_none", "index_sum_weight", "prob_smoothing", "prob_target_grad",
                                  "unbatched"])
def test_compile_fullgraph_aot_eager(case):
    """fullgraph=True through AOTAutograd (fake kernels, autograd formulas, functionalization) for more
    option combinations, dynamic=True with two batch sizes compiled once; results equal eager xent
    bitwise (the same kernels run on the same inputs)."""
    torch._dynamo.reset()
    counter = _compile_counter("aot_eager")
    target_grad = case == "prob_target_grad"
    kw = {
        "index_kdim_none": dict(reduction="none", label_smoothing=0.2),
        "index_sum_weight": dict(reduction="sum", ignore_index=-100),
        "prob_smoothing": dict(reduction="mean", label_smoothing=0.3),
        "prob_target_grad": dict(reduction="mean", label_smoothing=0.3),
        "unbatched": dict(reduction="none", label_smoothing=0.1),
    }[case]

    def f(x, t, w):
        return xent.cross_entropy(x, t, w, **kw)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for N in (5, 9):
        if case == "index_kdim_none":
            x = make_logits((N, 4, 3, 2), F32)
            t = make_target((N, 3, 2), 4, ignored=0.2)
            w = None
        elif case == "index_sum_weight":
            x = make_logits((N, 6), F64)
            t = make_target((N,), 6, ignored=0.2).to(torch.int32)
            w = make_weight(6, F64)
        elif case in ("prob_smoothing", "prob_target_grad"):
            x = make_logits((N, 6, 2), F32)
            t = make_prob_target((N, 6, 2), F32)
            w = make_weight(6, F32)
        else:
            x = make_logits((N + 2,), F32)
            t = make_target((), N + 2)
            w = None
        outs = []
        for fn in (compiled, f):
            xl = _leaf(x, True)
            tl = _leaf(t, True) if target_grad else t
            loss = fn(xl, tl, w)
            go = torch.ones_like(loss)
            grads = torch.autograd.grad(loss, [xl, tl] if target_grad else [xl], go)
            outs.append((loss.detach(), grads))
        (lc, gcs), (le, ges) = outs
        assert lc.dtype == le.dtype and lc.shape == le.shape
        assert torch.equal(lc, le), f"{case}: compiled loss {lc} != eager {le}"
        for a, b in zip(gcs, ges):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a, b), f"{case}: compiled gradient differs from eager"
        frames.append(counter.frame_count)
    # (frame_count counts compiler calls: a restarted analysis of the first call may count twice.)
    assert frames[0] >= 1 and frames[1] == frames[0], f"{case}: dynamic=True recompiled for a new batch size: {frames}"


# ================================================================================================
# gradcheck / gradgradcheck in float64.

GRADCHECK_INDEX_CASES = [
    ((4, 5), dict(reduction="mean")),
    ((4, 5), dict(reduction="sum", label_smoothing=0.2)),
    ((4, 5), dict(reduction="none", label_smoothing=0.1, ignore_index=1)),
    ((4, 5), dict(reduction="mean", label_smoothing=0.3, ignore_index=-100, weighted=True, ignored=0.3)),
    ((3, 4, 2), dict(reduction="mean", weighted=True, label_smoothing=0.1, ignored=0.3)),
    ((2, 3, 2, 2), dict(reduction="none", label_smoothing=1.0)),
    ((2, 3, 2, 2), dict(reduction="sum", weighted=True, ignore_index=0)),
    ((5,), dict(reduction="none", label_smoothing=0.1)),
]


def _gradcheck_index_inputs(shape, opts):
    opts = dict(opts)
    weighted = opts.pop("weighted", False)
    ignored = opts.pop("ignored", 0.0)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, F64, scale=1.0).requires_grad_()
    if len(shape) == 1:
        t = make_target((), C)
    else:
        t = make_target(positions_of(shape), C, ignored=ignored, ignore_index=opts.get("ignore_index", -100))
        if ignored:
            t.view(-1)[0] = 0 if opts.get("ignore_index", -100) != 0 else 1  # at least one kept position
    w = make_weight(C, F64) if weighted else None
    return x, t, w, opts


@pytest.mark.parametrize("shape,opts", GRADCHECK_INDEX_CASES, ids=lambda v: str(v))
def test_gradcheck_index(backend, shape, opts):
    x, t, w, kw = _gradcheck_index_inputs(shape, opts)
    xd, td, wd = backend.put(x), backend.put(t), backend.put(w)
    with backend.active():
        assert torch.autograd.gradcheck(lambda x: xent.cross_entropy(x, td, wd, **kw), (xd,))
        assert torch.autograd.gradgradcheck(lambda x: xent.cross_entropy(x, td, wd, **kw), (xd,))


@pytest.mark.parametrize("shape,opts", GRADCHECK_INDEX_CASES, ids=lambda v: str(v))
def test_gradgradcheck_index_through_grad_output(backend, shape, opts):
    """Double backward w.r.t. the upstream gradient as well (grad_loss is an input of the backward op)."""
    x, t, w, kw = _gradcheck_index_inputs(shape, opts)
    xd, td, wd = backend.put(x), backend.put(t), backend.put(w)
    with backend.active():
        loss = xent.cross_entropy(xd.detach(), td, wd, **kw)
    go = make_logits(loss.shape, F64, 1.0).to(xd.device).requires_grad_()

    def first_grad(x, go):
        with backend.active():
            loss = xent.cross_entropy(x, td, wd, **kw)
            (g,) = torch.autograd.grad(loss, x, go, create_graph=True)
        return g

    with backend.active():
        assert torch.autograd.gradcheck(first_grad, (xd, go))


GRADCHECK_PROB_CASES = [
    ((4, 5), dict(reduction="mean")),
    ((4, 5), dict(reduction="sum", label_smoothing=0.2, weighted=True)),
    ((4, 5), dict(reduction="none", label_smoothing=0.1)),
    ((3, 4, 2), dict(reduction="mean", weighted=True, label_smoothing=0.3)),
    ((2, 3, 2, 2), dict(reduction="none", weighted=True)),
    ((5,), dict(reduction="sum", label_smoothing=0.1)),
]


@pytest.mark.parametrize("shape,opts", GRADCHECK_PROB_CASES, ids=lambda v: str(v))
def test_gradcheck_prob(backend, shape, opts):
    """Probability targets: gradients w.r.t. logits and target, first and second order."""
    opts = dict(opts)
    weighted = opts.pop("weighted", False)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = backend.put(make_logits(shape, F64, scale=1.0)).requires_grad_()
    t = backend.put(make_prob_target(shape, F64)).requires_grad_()
    w = backend.put(make_weight(C, F64)) if weighted else None
    fn = lambda x, t: xent.cross_entropy(x, t, w, **opts)  # noqa: E731
    with backend.active():
        assert torch.autograd.gradcheck(fn, (x, t))
        assert torch.autograd.gradgradcheck(fn, (x, t))


# ================================================================================================
# Determinism.

DETERMINISM_CASES = {
    "split_row_2x50257": ((2, 50257), F32, "index"),
    "split_row_bf16_3x40000": ((3, 40000), BF16, "index"),
    "rows_64x1000": ((64, 1000), F32, "index"),
    "rows_f64_300x3000": ((300, 3000), F64, "index"),
    "kdim_lanes_4x7x33x17": ((4, 7, 33, 17), F32, "index"),
    "kdim_lanes_bf16_2x21x64x64": ((2, 21, 64, 64), BF16, "index"),  # blocks in pairs, split across threads
    "transposed_lanes": ((5000, 9), F32, "index_transposed"),
    "prob_2x50257": ((2, 50257), F32, "prob"),
    "prob_kdim": ((4, 7, 33, 17), F32, "prob"),
}


def _determinism_run(backend, shape, dtype, kind):
    """loss (none and mean) and gradients, fresh tensors each call (same values: fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    x = (torch.randn(shape, generator=g, dtype=F64) * 3).to(dtype)
    C = shape[1]
    w = (torch.rand(C, generator=g, dtype=F64) + 0.5).to(dtype)
    if kind.startswith("index"):
        t = torch.randint(0, C, positions_of(shape), generator=g)
        t[torch.rand(positions_of(shape), generator=g) < 0.1] = -100
    else:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=F64), 1).to(dtype)
    xd = backend.put(x)
    if kind == "index_transposed":
        xd = LAYOUTS["transposed"](xd)
    xd.requires_grad_(True)
    td = backend.put(t)
    if kind == "prob":
        td.requires_grad_(True)
    out = []
    with backend.active():
        for reduction in ("none", "mean"):
            loss = xent.cross_entropy(xd, td, backend.put(w), reduction=reduction, label_smoothing=0.1)
            go = torch.ones_like(loss) if reduction == "mean" else torch.linspace(-1, 1, loss.numel(),
                                                                                  device=loss.device).view(loss.shape).to(dtype)
            grads = torch.autograd.grad(loss, [xd, td] if kind == "prob" else [xd], go)
            out.append(loss.detach().cpu())
            out.extend(gr.cpu() for gr in grads)
    return out


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_deterministic_repeated_runs(backend, case):
    shape, dtype, kind = DETERMINISM_CASES[case]
    first = _determinism_run(backend, shape, dtype, kind)
    for _ in range(2):
        assert_bitwise(first, _determinism_run(backend, shape, dtype, kind), f"{case}: repeated run")


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_deterministic_across_thread_counts(cpu_backend, restore_num_threads, case):
    shape, dtype, kind = DETERMINISM_CASES[case]
    torch.set_num_threads(1)
    one = _determinism_run(cpu_backend, shape, dtype, kind)
    for n in sorted({2, restore_num_threads}):
        torch.set_num_threads(n)
        assert_bitwise(one, _determinism_run(cpu_backend, shape, dtype, kind), f"{case}: 1 vs {n} threads")


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_deterministic_across_warp_schedules(case):
    """The CUDA kernels (under the emulator) give bitwise identical results for any warp schedule."""
    from conftest import EMULATED_SCHEDULES, make_backend

    shape, dtype, kind = DETERMINISM_CASES[case]
    runs = [
        (f"{s}-{seed}", _determinism_run(make_backend(f"emulated_cuda-{s}-{seed}"), shape, dtype, kind))
        for s, seed in EMULATED_SCHEDULES
    ]
    for name, out in runs[1:]:
        assert_bitwise(runs[0][1], out, f"{case}: schedule {runs[0][0]} vs {name}")


# ================================================================================================
# Instruction sets.


def test_isa_selection(restore_isa):
    ops = torch.ops.xent
    assert ops._cpu_isa() in ("avx512", "avx2", "generic")
    assert ops._cpu_isa("") == restore_isa  # "" keeps it
    assert ops._cpu_isa("generic") == "generic"  # always available
    with pytest.raises(ValueError, match="instruction set"):
        ops._cpu_isa("sse9")
    assert ops._cpu_isa() == "generic", "a failed selection must keep the previous instruction set"


ISA_SUBSET = [
    ((7, 3), "index", "contiguous", DTYPES),
    ((17, 1000), "index", "contiguous", DTYPES),
    ((2, 50257), "index", "contiguous", [F32, BF16]),  # split rows
    ((3, 17, 5, 7), "index", "contiguous", DTYPES),  # lanes
    # lanes with whole blocks of vectors (walked in pairs) before the single vectors and the partial one
    ((2, 7, 300), "index", "contiguous", DTYPES),
    ((2, 7, 300), "index", "misaligned", [BF16]),
    ((300, 37), "index", "transposed", [F32, F16]),  # lanes from a transposed matrix
    ((5, 1000), "index", "misaligned", [F32, BF16]),
    ((2, 300, 5, 7), "index", "channels_last", [F64, BF16]),
    ((7, 1003), "prob", "contiguous", DTYPES),
    ((3, 17, 5, 7), "prob", "contiguous", [F32, F16]),
]
ISA_PARAMS = [
    pytest.param(shape, kind, layout, dtype, id=f"{'x'.join(map(str, shape))}-{kind}-{layout}-{dtype_id(dtype)}")
    for shape, kind, layout, dtypes in ISA_SUBSET
    for dtype in dtypes
]


@pytest.mark.parametrize("shape,kind,layout,dtype", ISA_PARAMS)
def test_isa_parity(isa, cpu_backend, shape, kind, layout, dtype):
    """A parity subset under every instruction set: each layout / path of the kernels, plain and with
    every option."""
    x = make_logits(shape, dtype)
    C = shape[1]
    if kind == "index":
        target = make_target(positions_of(shape), C, ignored=0.2)
    else:
        target = make_prob_target(shape, dtype)
    for reduction, smoothing, weighted in (("none", 0.0, False), ("mean", 0.1, True), ("sum", 1.0, True)):
        w = make_weight(C, dtype) if weighted else None
        check_cross_entropy(cpu_backend, x, target, w, reduction=reduction, label_smoothing=smoothing,
                            layout=layout, target_grad=kind == "prob")


def test_isa_special_values(isa, cpu_backend):
    for dtype in DTYPES:
        test_special_values(cpu_backend, dtype, 0.1)


def test_cpu_exp_accuracy(isa):
    """The kernels' vectorized exp: relative error below 4 ulp (4 * 2**-23) where the result is a
    normal float (x > -87.3), over [-104, 88]; 0 below the smallest normal result (no subnormals, whose
    microcode assists made -inf-masked logits ten times slower); exact special values."""
    x = torch.linspace(-104.0, 88.0, 4_000_001, dtype=F32)
    # plus every float32 in a few narrow windows (around 0, ln 2 multiples, range ends)
    extra = [torch.arange(-2048, 2048, dtype=torch.int32).view(F32)]
    for center in (0.0, math.log(2), -math.log(2), 10 * math.log(2), -87.3, 88.0, -1.0, 1.0):
        c = torch.tensor([center], dtype=F32).view(torch.int32)
        extra.append((c + torch.arange(-2000, 2000, dtype=torch.int32)).view(F32))
    x = torch.cat([x] + extra)
    x = x[(x >= -104) & (x <= 88) & torch.isfinite(x)]
    y = torch.ops.xent._cpu_exp(x)
    assert y.dtype == F32 and y.shape == x.shape
    exact = torch.exp(x.double())
    normal = x > -87.3
    rel = ((y[normal].double() - exact[normal]).abs() / exact[normal])
    worst = rel.argmax()
    # 4 ulp: the kernels' accuracy budget for exp (the loss target of 1e-6 relative needs a few ulp).
    assert rel.max().item() < 4 * 2.0**-23, (
        f"{isa}: exp max relative error {rel.max().item() / 2.0**-23:.2f} ulp at x={x[normal][worst].item()!r}"
    )
    # x < -87.33654 (exp(x) < 2**-126): exactly 0; from there on a normal float.
    flushed = x < -87.33654
    assert (y[flushed] == 0).all(), f"{isa}: exp below -87.33654 must be 0, got {y[flushed].max().item()!r}"
    assert (y[~flushed] >= 2.0**-126).all(), f"{isa}: exp from -87.33654 on must be a normal float"
    special = torch.tensor([0.0, -0.0, -math.inf, math.nan, -1000.0], dtype=F32)
    ys = torch.ops.xent._cpu_exp(special)
    assert ys[0].item() == 1.0 and ys[1].item() == 1.0, f"{isa}: exp(0) = {ys[0].item()!r}, exp(-0) = {ys[1].item()!r}"
    assert ys[2].item() == 0.0, f"{isa}: exp(-inf) = {ys[2].item()!r}"
    assert math.isnan(ys[3].item()), f"{isa}: exp(nan) = {ys[3].item()!r}"
    assert ys[4].item() == 0.0, f"{isa}: exp(-1000) = {ys[4].item()!r}"


def test_cpu_exp_lengths_and_layout(isa):
    """Every length around the vector width (tails), and non-contiguous input."""
    for n in list(range(0, 70)) + [1023, 1025]:
        x = torch.linspace(-20, 20, n, dtype=F32)
        y = torch.ops.xent._cpu_exp(x)
        exact = torch.exp(x.double())
        if n:
            assert ((y.double() - exact).abs() / exact).max().item() < 4 * 2.0**-23, f"{isa}: length {n}"
    x = torch.linspace(-20, 20, 200, dtype=F32).view(20, 10).t()
    # The same 4-ulp budget as test_cpu_exp_accuracy.
    torch.testing.assert_close(torch.ops.xent._cpu_exp(x).double(), torch.exp(x.double()), rtol=4 * 2.0**-23, atol=0)


@pytest.mark.parametrize("shape", [(6, 1000), (2, 3, 40, 7)], ids=["rows", "lanes"])
def test_avx512_bf16_gradient_bits(monkeypatch, restore_isa, shape):
    """With AVX512_BF16 the AVX-512 kernels round bf16 gradients with vcvtne2ps2bf16, which flushes
    subnormals to zero and keeps NaN signs and payloads; vectors holding those must take the integer
    rounding, so the bits equal those of the plain AVX-512 table (XENT_CPU_AVX512_BF16=0): subnormal
    gradient elements (logits 90 below the max, small upstream gradients), NaN rows, -inf logits."""
    if not cpu_has_flag("avx512_bf16"):
        pytest.skip("the CPU lacks AVX512_BF16")
    torch.ops.xent._cpu_isa("avx512")
    C = shape[1]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g) * 3
    x.select(1, 0).fill_(80.0)  # softmax of the other classes near exp(-80): with upstream 1e-8, subnormal
    x.select(1, 1).copy_(torch.linspace(-50.0, 0.0, x.select(1, 1).numel()).view_as(x.select(1, 1)))
    x.select(1, 2).fill_(-math.inf)
    x.view(-1)[1005] = math.nan  # a NaN logit of a counted position: NaN gradients there
    x = x.to(BF16)
    positions = (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, C, positions, generator=g)
    target.view(-1)[::3] = -100
    # (shuffled: not correlated with the logits' linspace)
    upstream = torch.logspace(-1, -8, target.numel())[torch.randperm(target.numel(), generator=g)]
    upstream = upstream.view(positions).to(BF16)

    def grad():
        xr = x.clone().requires_grad_()
        xent.cross_entropy(xr, target, reduction="none").backward(upstream)
        return xr.grad

    with_bf16 = grad()
    monkeypatch.setenv("XENT_CPU_AVX512_BF16", "0")
    plain = grad()
    bits, plain_bits = with_bf16.view(torch.int16), plain.view(torch.int16)
    subnormal = (plain.float().abs() < torch.finfo(F32).tiny) & (plain.float() != 0)
    assert subnormal.any() and plain.isnan().any(), "the inputs must exercise the fix-up"
    mismatch = (bits != plain_bits).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} gradient elements differ, first at {mismatch[0].tolist()}"


# ================================================================================================
# The gradient buffer cache.


def test_grad_cache(restore_grad_cache, free_memory):
    ops = torch.ops.xent
    original = restore_grad_cache
    shape = (64, 32768)  # 8 MiB of float32 gradient: above the cache's 4 MiB minimum
    x = make_logits(shape, F32).requires_grad_()
    t = make_target((64,), 32768)

    def backward():
        loss = xent.cross_entropy(x, t)
        (g,) = torch.autograd.grad(loss, x)
        return g

    assert ops._cpu_grad_cache(0) == [0, 0], "capacity 0 must free everything held"
    g = backward()
    del g
    gc.collect()
    assert ops._cpu_grad_cache() == [0, 0], "with capacity 0 a freed gradient must not be held"

    capacity = max(original, 64 << 20)
    assert ops._cpu_grad_cache(capacity) == [capacity, 0]
    g = backward()
    g_expected = g.clone()
    assert ops._cpu_grad_cache()[1] == 0
    g.fill_(math.nan)  # dirty the buffer: a reuse must overwrite every element
    del g
    gc.collect()
    held = ops._cpu_grad_cache()[1]
    assert held >= 64 * 32768 * 4, f"a freed gradient should be kept for reuse (held {held})"
    g = backward()
    assert ops._cpu_grad_cache()[1] == 0, "the next backward of the same size should reuse the held buffer"
    assert torch.equal(g, g_expected), "a reused (dirty) buffer must be fully overwritten"
    del g
    gc.collect()
    assert ops._cpu_grad_cache()[1] == held
    assert ops._cpu_grad_cache(0) == [0, 0]


# ================================================================================================
# More than 2**31 elements.


@pytest.mark.huge
@pytest.mark.parametrize("shape", [(1, 2**31 + 64), (2**16 + 1, 2**15)], ids=["one_row", "many_rows"])
def test_huge_input(free_memory, restore_num_threads, shape):
    """bfloat16 logits with more than 2**31 elements (4.3 GB): 64-bit indexing of classes (one row of
    2**31 + 64) and of rows (offsets past 2**31 elements). The forward is compared with a chunked float64
    reference that never holds a float64 copy of more than 2**20 logits (peak ~4.5 GB); the fused forward +
    gradient's gradient (4.3 GB more) on its last 2**20 elements."""
    N, C = shape
    x = torch.empty(shape, dtype=BF16)
    # Filled by repeating a random block whose length (2**24 + 13) divides neither C nor 2**32, so a
    # wrapped 32-bit offset reads a different value (and a fill is a fast memory copy).
    block = make_logits((2**24 + 13,), BF16, scale=1.5)
    flat = x.view(-1)
    for i in range(0, flat.numel(), block.numel()):
        n = min(block.numel(), flat.numel() - i)
        flat[i : i + n].copy_(block[:n])
    del flat, block
    if N == 1:
        target = torch.tensor([C - 7])  # a class index beyond 2**31
        x[0, C - 7] = 6.0
    else:
        target = make_target((N,), C)
        target[-1] = C - 1  # the very last element of the tensor
        x[-1, C - 1] = 6.0
    try:
        # One thread for the reference's thousands of small ops: OpenMP barriers under a loaded machine
        # cost more than the second core gains (7 s vs 27 s measured).
        torch.set_num_threads(1)
        ref_mean, ref_rows = cross_entropy_reference_chunked(x, target)
        torch.set_num_threads(restore_num_threads)
        for reduction, expected in (("mean", ref_mean), ("none", ref_rows), ("sum", ref_rows.sum())):
            loss = xent.cross_entropy(x, target, reduction=reduction)
            assert loss.dtype == BF16 and loss.shape == expected.shape
            # One bfloat16 ulp at most (2**-8 relative bounds it): rounding the result costs half an ulp,
            # the float32 accumulation far less than the other half.
            err = (loss.double() - expected).abs()
            assert bool((err <= 2.0**-8 * expected.abs()).all()), (
                f"{reduction}: max error {err.max().item():.4e}; xent {loss.flatten()[:4].tolist()} "
                f"expected {expected.flatten()[:4].tolist()}"
            )
            del loss
        # The fused forward + gradient (what a differentiated mean / sum takes): the same loss, and a
        # gradient whose elements past 2**31 are exp(x - lse) - [c == t] (sum: grad_loss scale 1), checked
        # on the tensor's last 2**20 elements (they hold the target) against float64.
        loss, lse, grad = torch.ops.xent.cross_entropy_fwd_grad(x, target, None, reduction=2)
        assert torch.equal(loss, xent.cross_entropy(x, target, reduction="sum"))
        tail = min(C, 2**20)
        x_tail = x[-1, C - tail :].double()
        expected = torch.exp(x_tail - lse[-1].double())
        expected[target[-1] - (C - tail)] -= 1.0
        err = (grad[-1, C - tail :].double() - expected).abs()
        assert bool((err <= 2.0**-8 * expected.abs() + 1e-30).all()), f"gradient tail: max error {err.max().item():.3e}"
        del grad, lse, loss
    finally:
        del x
        gc.collect()


# ================================================================================================
# xent.nn.CrossEntropyLoss.

MODULE_ARGS = [
    {},
    {"weight": "w"},
    {"ignore_index": 1},
    {"reduction": "none"},
    {"reduction": "sum"},
    {"label_smoothing": 0.2},
    {"size_average": False},
    {"reduce": False},
    {"size_average": True, "reduce": True},
    {"weight": "w", "ignore_index": 0, "reduction": "sum", "label_smoothing": 0.1},
    {"weight": "w", "ignore_index": -3, "reduction": "mean", "label_smoothing": 1.0},
]


@pytest.mark.parametrize("kwargs", MODULE_ARGS, ids=str)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_module_matches_torch(kwargs, kind):
    w = make_weight(5, F64)
    kw = {k: (w if v == "w" else v) for k, v in kwargs.items()}
    if kind == "prob" and kw.get("ignore_index", -100) >= 0:
        kw["ignore_index"] = -100  # PyTorch rejects ignore_index >= 0 with probability targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = xent.nn.CrossEntropyLoss(**kw)
        theirs = torch.nn.CrossEntropyLoss(**kw)
    assert isinstance(ours, torch.nn.Module)
    assert ours.reduction == theirs.reduction
    assert ours.ignore_index == theirs.ignore_index and ours.label_smoothing == theirs.label_smoothing
    x = make_logits((6, 5, 2), F64)
    t = make_target((6, 2), 5, ignored=0.3, ignore_index=kw.get("ignore_index", -100)) if kind == "index" \
        else make_prob_target((6, 5, 2), F64)
    xa, xb = _leaf(x, True), _leaf(x, True)
    a, b = ours(xa, t), theirs(xb, t)
    # float64 on both sides: 1e-12 relative (summation order only).
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    go = torch.randn(a.shape, dtype=F64)
    torch.testing.assert_close(torch.autograd.grad(a, xa, go)[0], torch.autograd.grad(b, xb, go)[0],
                               rtol=1e-12, atol=1e-12)
    # state_dict round trips, also between the two classes.
    sd = ours.state_dict()
    assert set(sd) == set(theirs.state_dict())
    for k in sd:
        assert torch.equal(sd[k], theirs.state_dict()[k])
    fresh = xent.nn.CrossEntropyLoss(weight=torch.zeros(5, dtype=F64)) if "weight" in kw else xent.nn.CrossEntropyLoss()
    fresh.load_state_dict(theirs.state_dict())
    if "weight" in kw:
        assert torch.equal(fresh.weight, kw["weight"])
    back = torch.nn.CrossEntropyLoss(weight=torch.zeros(5, dtype=F64)) if "weight" in kw else torch.nn.CrossEntropyLoss()
    back.load_state_dict(ours.state_dict())
    if "weight" in kw:
        assert torch.equal(back.weight, kw["weight"])


def test_module_is_a_module():
    m = xent.nn.CrossEntropyLoss(weight=make_weight(4, F32), label_smoothing=0.1)
    assert isinstance(m, torch.nn.Module)
    assert "weight" in dict(m.named_buffers())
    m64 = m.double()
    assert m64.weight.dtype == F64
    x = make_logits((3, 4), F64)
    t = make_target((3,), 4)
    # float64 on both sides: 1e-12 relative (summation order only).
    torch.testing.assert_close(m64(x, t), F.cross_entropy(x, t, m64.weight, label_smoothing=0.1),
                               rtol=1e-12, atol=1e-12)
    assert "CrossEntropyLoss" in repr(m)
    # Works inside a model, with its parameters' gradient (float32; m was converted in place above).
    m32 = m.float()
    assert m32.weight.dtype == F32
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    loss = m32(model(torch.randn(3, 8)), t)
    loss.backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()
