"""Parity suite of xent's binary losses against PyTorch and torchvision.

* ``xent.binary_cross_entropy`` vs ``torch.nn.functional.binary_cross_entropy``,
* ``xent.binary_cross_entropy_with_logits`` vs ``torch.nn.functional.binary_cross_entropy_with_logits``,
* ``xent.sigmoid_focal_loss`` vs ``torchvision.ops.sigmoid_focal_loss`` (with weight / pos_weight: the same
  composite with the weighted ``F.binary_cross_entropy_with_logits`` inside),
and the modules BCELoss, BCEWithLogitsLoss, SigmoidFocalLoss.

Every parity check (tests/harness/parity.py) compares xent's loss and gradients (input, and target where
PyTorch gives one) with two float64 computations on the same values: PyTorch's / torchvision's own, and
the independent reference of tests/reference_binary.py. Inputs are generated in the tested dtype and then
upcast, so the float64 results are the exact answers for the values xent sees. The shared tests (opcheck,
compile, gradcheck, determinism, bad inputs, warp schedules) are ``TestBinaryCrossEntropy``'s,
``TestBinaryCrossEntropyWithLogits``'s and ``TestSigmoidFocalLoss``'s, from tests/harness/tester.py.

Error model (``BinaryLoss``, tests/harness/tolerance.py pytorch_parity_bound):
* float64: 1e-12 relative; against PyTorch also a few units of float64 roundoff of the terms PyTorch's own
  formula cancels (its with-logits loss (1 - y) x - L log_sigmoid(x), torchvision's 1 - p_t).
* float32: loss 1e-6 relative (the project's target), gradient 1e-5 of its largest entry.
* bfloat16 / float16: xent's error at most twice PyTorch's own error in that dtype plus half an ulp of the
  result.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import xent
from conftest import simt_traffic
from harness.parity import LossSpec, check_parity, leaf
from harness.tester import BadInput, CompileCase, LossTester, ModuleCase
from harness.tolerance import (
    BF16, DTYPES, F16, F32, F64, LOW, UNIT_ROUNDOFF, Bound, assert_within, dtype_id, pytorch_parity_bound,
)
from inputs import ALL_LAYOUTS, fixed_rng, make_weight, shape_id
from reference_binary import (
    binary_cross_entropy_reference,
    binary_cross_entropy_with_logits_reference,
    sigmoid_focal_loss_reference,
)

tv_ops = pytest.importorskip("torchvision.ops")

REDUCTIONS = ["none", "mean", "sum"]
KINDS = ["bce", "logits", "focal"]
OP_NAMES = {
    "bce": "binary_cross_entropy",
    "logits": "binary_cross_entropy_with_logits",
    "focal": "sigmoid_focal_loss",
}


# ================================================================================================
# The three implementations of each loss.


def _reduce(loss, reduction):
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" else loss.sum()


def torch_loss(kind, x, y, weight=None, pos_weight=None, *, reduction="mean", alpha=0.25, gamma=2.0):
    """PyTorch's loss (torchvision's for focal) in the arguments' dtype."""
    if kind == "bce":
        return F.binary_cross_entropy(x, y, weight, reduction=reduction)
    if kind == "logits":
        return F.binary_cross_entropy_with_logits(x, y, weight, reduction=reduction, pos_weight=pos_weight)
    if weight is None and pos_weight is None:
        return tv_ops.sigmoid_focal_loss(x, y, alpha, gamma, reduction)
    # torchvision's composite with weight / pos_weight in its cross-entropy term.
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, weight, reduction="none", pos_weight=pos_weight)
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return _reduce(loss, reduction)


def ref_loss(kind, x, y, weight=None, pos_weight=None, *, reduction="mean", alpha=0.25, gamma=2.0):
    if kind == "bce":
        return binary_cross_entropy_reference(x, y, weight, reduction)
    if kind == "logits":
        return binary_cross_entropy_with_logits_reference(x, y, weight, pos_weight, reduction)
    return sigmoid_focal_loss_reference(x, y, alpha, gamma, reduction, weight, pos_weight)


def xent_loss(kind, x, y, weight=None, pos_weight=None, *, reduction="mean", alpha=0.25, gamma=2.0):
    if kind == "bce":
        assert pos_weight is None
        return xent.binary_cross_entropy(x, y, weight, reduction=reduction)
    if kind == "logits":
        return xent.binary_cross_entropy_with_logits(x, y, weight, reduction=reduction, pos_weight=pos_weight)
    return xent.sigmoid_focal_loss(x, y, alpha, gamma, reduction, weight=weight, pos_weight=pos_weight)


# ================================================================================================
# The error model.


def _terms(kind, x, y, w, pw, alpha, gamma):
    """Per-element float64 magnitudes: (terms PyTorch's formula cancels, focal's log m for pow's error)."""
    x, y = x.double(), y.double()
    w = 1.0 if w is None else w.double().abs()
    pw = 1.0 if pw is None else pw.double()
    L = 1 + (pw - 1) * y
    if kind == "bce":
        return torch.zeros_like(x), torch.zeros_like(x)
    ce_terms = ((1 - y) * x).abs() + (L * F.logsigmoid(x)).abs()
    if kind == "logits":
        return w * ce_terms, torch.zeros_like(x)
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    m = (1 - y) * p + y * q
    a = (alpha * y + (1 - alpha) * (1 - y)).abs() if alpha >= 0 else torch.ones_like(x)
    ce = binary_cross_entropy_with_logits_reference(x, y, None, None if isinstance(pw, float) else pw, "none").abs()
    fm = m.abs() ** gamma if gamma else torch.ones_like(m)
    dm = gamma * m.abs() ** (gamma - 1) if gamma else torch.zeros_like(m)
    # torchvision's 1 - p_t loses ~1 ulp of 1 absolutely; its ce the with-logits cancellation.
    cancel = w * a * (ce_terms * fm + ce * torch.nan_to_num(dm, posinf=0.0))
    return cancel, torch.log(m.abs()).abs()


def loss_tolerances(kind, dtype, x, y, w, pw, reduction, alpha, gamma):
    """(relative error beyond the project's target, absolute error of PyTorch's float64 result), reduced
    like the loss."""
    cancel, log_m = _terms(kind, x, y, w, pw, alpha, gamma)
    cancel = Bound.cancellation(torch.nan_to_num(cancel, nan=0.0, posinf=0.0), F64).atol
    rtol = torch.zeros_like(cancel)
    if dtype != F64 and kind == "focal" and gamma != int(gamma):
        # exp(gamma log m) carries log's error times gamma |log m| (csrc/cpu/simd/math.h: vpow).
        rtol = (gamma * torch.nan_to_num(log_m, posinf=0.0) + 2) * UNIT_ROUNDOFF[F32]
    if reduction == "none":
        return rtol, cancel
    n = max(cancel.numel(), 1)
    r = rtol.max() if rtol.numel() else torch.tensor(0.0, dtype=F64)
    return r, cancel.sum() / (n if reduction == "mean" else 1)


class BinaryLoss(LossSpec):
    """One of the binary losses, `kind` (KINDS); operands weight and pos_weight (None for
    binary_cross_entropy, which has none)."""

    def __init__(self, kind):
        self.kind = kind
        self.name = OP_NAMES[kind]
        self.api = getattr(xent, self.name)
        self.torch_api = {"bce": F.binary_cross_entropy, "logits": F.binary_cross_entropy_with_logits,
                          "focal": tv_ops.sigmoid_focal_loss}[kind]

    def xent(self, x, y, weight=None, pos_weight=None, **options):
        return xent_loss(self.kind, x, y, weight, pos_weight, **options)

    def expected(self, x, y, weight=None, pos_weight=None, **options):
        return {"reference": ref_loss(self.kind, x, y, weight, pos_weight, **options),
                "PyTorch": torch_loss(self.kind, x, y, weight, pos_weight, **options)}

    def torch_in_dtype(self, x, y, weight=None, pos_weight=None, **options):
        return torch_loss(self.kind, x, y, weight, pos_weight, **options)

    def loss_bound(self, p, against):
        o = p.options
        rtol, cancel = p.memo("tolerances", lambda: loss_tolerances(
            self.kind, p.dtype, p.input, p.target, *p.operands, o.get("reduction", "mean"), o.get("alpha", 0.25),
            o.get("gamma", 2.0)))
        # PyTorch's float64 formula cancels; the reference's does not.
        return pytorch_parity_bound(p.dtype, p.expected[against], p.torch_loss,
                                    extra=Bound(rtol, cancel if against == "PyTorch" else 0.0))

    def grad_bound(self, p, i, against, grad_output, grads):
        torch_grad = None if p.torch_grads is None else p.torch_grads[i]
        return pytorch_parity_bound(p.dtype, grads[against][i], torch_grad, grad=True)

    def promised_grad_strides(self, input):
        # The fake kernels (xent/_binary_ops.py) return a contiguous gradient.
        return torch.empty(input.shape).stride()


BINARY = {kind: BinaryLoss(kind) for kind in KINDS}


# ================================================================================================
# Inputs and layouts.


def make_input(kind, shape, dtype, scale=3.0):
    """Logits randn * scale; for BCE probabilities sigmoid(randn * 2.5) kept in [0.01, 0.99] so that no
    value rounds to exactly 0 or 1 (tested separately, see test_special_values_bce)."""
    z = torch.randn(shape, dtype=F64)
    if kind == "bce":
        return torch.sigmoid(z * 2.5).clamp(0.01, 0.99).to(dtype)
    return (z * scale).to(dtype)


def make_target(shape, dtype, soft=False):
    if soft:
        return torch.rand(shape, dtype=F64).to(dtype)
    return (torch.rand(shape, dtype=F64) < 0.3).to(dtype)


def make_pos_weight(shape, dtype):
    return (torch.rand(shape, dtype=F64) * 3 + 0.5).to(dtype)


def check(kind, backend, x, y, weight=None, pos_weight=None, *, reduction="mean", alpha=0.25, gamma=2.0,
          layout="contiguous", target_layout="contiguous", grad_output="random", target_grad=True):
    """The parity check of xent's `kind` loss (tests/harness/parity.py); the target is differentiated
    unless target_grad=False. Returns xent's loss."""
    options = dict(reduction=reduction)
    if kind == "focal":
        options.update(alpha=alpha, gamma=gamma)
    return check_parity(BINARY[kind], backend, x, y, weight, pos_weight, layout=layout, target_layout=target_layout,
                        grad_output=grad_output, target_grad=target_grad, **options).loss


def make_case(kind, shape, dtype, soft=False):
    return make_input(kind, shape, dtype), make_target(shape, dtype, soft=soft or kind == "bce")


# ================================================================================================
# The references themselves.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", ["plain", "weight", "pos_weight", "both"])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_pytorch(kind, options, reduction):
    """tests/reference_binary.py agrees with PyTorch / torchvision in float64 (loss and gradients w.r.t.
    input and target), so the parity tests' two references are interchangeable."""
    if kind == "bce" and options in ("pos_weight", "both"):
        pytest.skip("binary_cross_entropy has no pos_weight")
    shape = (6, 5)
    x, y = make_case(kind, shape, F64, soft=True)
    x = x.clamp(-8, 8)  # away from PyTorch's float64 cancellation, so that 1e-13 holds
    w = make_weight((5,), F64) if options in ("weight", "both") else None
    pw = make_pos_weight((5,), F64) if options in ("pos_weight", "both") else None
    for gamma, alpha in ((2.0, 0.25), (0.0, -1.0), (1.5, 0.6)):
        opts = dict(reduction=reduction)
        if kind == "focal":
            opts.update(alpha=alpha, gamma=gamma)
        x1, y1, x2, y2 = leaf(x, True), leaf(y, True), leaf(x, True), leaf(y, True)
        a = ref_loss(kind, x1, y1, w, pw, **opts)
        b = torch_loss(kind, x2, y2, w, pw, **opts)
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
        go = torch.randn(a.shape, dtype=F64)
        for ga, gb in zip(torch.autograd.grad(a, [x1, y1], go), torch.autograd.grad(b, [x2, y2], go)):
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
        if kind != "focal":
            break


# ================================================================================================
# Shapes x dtypes x reductions.

# Detection-like (N, 80), classification-like (N, 1000) (a CI-sized (4096, 1000)), K-dim, 1-d, 0-d, empty.
SHAPES = [(300, 80), (256, 1000), (2, 3, 5, 7), (17,), (), (0, 80), (0,), (5, 0)]
SHAPE_CASES = [
    (shape, dtype, reduction)
    for shape in SHAPES
    for dtype in DTYPES
    for reduction in REDUCTIONS
    if not (shape == (256, 1000) and reduction == "sum")  # the large shape: 'mean' covers the reduced path
]


@pytest.mark.parametrize("shape,dtype,reduction", SHAPE_CASES,
                         ids=[f"{shape_id(s)}-{dtype_id(d)}-{r}" for s, d, r in SHAPE_CASES])
@pytest.mark.parametrize("kind", KINDS)
def test_shapes(backend, kind, shape, dtype, reduction):
    x, y = make_case(kind, shape, dtype)
    check(kind, backend, x, y, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("kind", KINDS)
def test_soft_targets(backend, kind, dtype, reduction):
    x, y = make_case(kind, (64, 33), dtype, soft=True)
    check(kind, backend, x, y, make_weight((33,), dtype), None if kind == "bce" else make_pos_weight((33,), dtype),
          reduction=reduction)


def test_empty_reductions(backend):
    """An empty input: mean is NaN, sum is 0, none is empty, gradients are empty: as PyTorch."""
    for kind in KINDS:
        for shape in ((0,), (0, 80), (3, 0)):
            x, y = make_case(kind, shape, F32)
            for reduction in REDUCTIONS:
                xl = backend.put(x).requires_grad_()
                with backend.active():
                    loss = xent_loss(kind, xl, backend.put(y), reduction=reduction)
                    (g,) = torch.autograd.grad(loss, xl, torch.ones_like(loss))
                expected = torch_loss(kind, x, y, reduction=reduction)
                assert loss.shape == expected.shape and loss.dtype == expected.dtype
                torch.testing.assert_close(loss.cpu(), expected, equal_nan=True)
                assert g.shape == x.shape


# ================================================================================================
# weight / pos_weight broadcasts (Note [Binary loss operands] in csrc/cpu/binary_loss_kernels.h).

OPERAND_SHAPES = {
    # name: shape for a (N, C) = (37, 80) input and for a K-dim (2, 3, 5, 7) input
    "scalar_0d": ((), ()),
    "scalar_1x1": ((1, 1), (1, 1, 1)),
    "per_class": ((80,), (7,)),
    "per_class_1xC": ((1, 80), (1, 1, 7)),
    "per_row": ((37, 1), (2, 3, 5, 1)),
    "full": ((37, 80), (2, 3, 5, 7)),
    "other_broadcast": ((37, 80), (3, 1, 7)),  # K-dim: materialized; 2-d: a full weight again
}


# (weight, pos_weight): each operand kind alone, both of one kind, and mixed with a scalar / per class.
OPERAND_CASES = (
    [(k, None) for k in OPERAND_SHAPES]
    + [(None, k) for k in OPERAND_SHAPES]
    + [(k, k) for k in OPERAND_SHAPES]
    + [("full", "per_class"), ("per_row", "scalar_0d"), ("per_class", "other_broadcast")]
)


@pytest.mark.parametrize("weight,pos_weight", OPERAND_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", KINDS)
def test_weight_broadcasts(backend, kind, weight, pos_weight):
    """Every operand kind of the kernels, for float (float32), double (float64) accumulation and an
    operand in the input's 16-bit dtype (bfloat16), unreduced and reduced."""
    if kind == "bce" and pos_weight is not None:
        pytest.skip("binary_cross_entropy has no pos_weight")
    for dtype in (F32, F64, BF16):
        for reduction in ("none", "sum"):
            for i, shape in enumerate(((37, 80), (2, 3, 5, 7))):
                x, y = make_case(kind, shape, dtype)
                w = make_weight(OPERAND_SHAPES[weight][i], dtype) if weight else None
                pw = make_pos_weight(OPERAND_SHAPES[pos_weight][i], dtype) if pos_weight else None
                check(kind, backend, x, y, w, pw, reduction=reduction)


def _weight_layout(name, shape, dtype):
    """A weight for an input of `shape` stored in a layout of its own (the CUDA kernels read operands in
    place through their strides, Note [CUDA binary loss kernels])."""
    if name == "full_transposed":
        return ALL_LAYOUTS["transposed"](make_weight(shape, dtype))
    if name == "per_class_sliced":  # stride 2
        return ALL_LAYOUTS["last_dim_sliced"](make_weight(shape[-1:], dtype))
    if name == "per_row_expanded":  # (N, 1) expanded to (N, C): stride 0 in the last dim
        return make_weight(tuple(shape[:-1]) + (1,), dtype).expand(shape)
    if name == "full_misaligned":  # dense, storage offset 1: read element by element
        return ALL_LAYOUTS["misaligned"](make_weight(shape, dtype))
    if name == "full_float32":  # dense in the accumulation dtype for a 16-bit input
        return make_weight(shape, F32 if dtype in LOW else dtype)
    if name == "alternating":  # broadcast in every other dim: more merged dims than the kernels index
        return make_weight(tuple(s if i % 2 else 1 for i, s in enumerate(shape)), dtype)
    raise ValueError(name)


WEIGHT_LAYOUTS = ["full_transposed", "per_class_sliced", "per_row_expanded", "full_misaligned", "full_float32",
                  "alternating"]


@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_weight_layouts(backend, kind, layout):
    """weight and pos_weight in non-contiguous, broadcast (stride 0), misaligned and other-dtype layouts, on
    inputs whose vector path is taken (contiguous) or not (misaligned), including a 9-d input whose operand
    dims do not merge into the kernels' four."""
    for dtype in (F32, BF16, F64):
        for shape in ((37, 80), (2, 3, 5, 7), (2, 3, 2, 3, 2, 3, 2, 3, 5)):
            x, y = make_case(kind, shape, dtype)
            w = _weight_layout(layout, shape, dtype)
            pw = None if kind == "bce" else _weight_layout(layout, shape, dtype)
            for reduction, input_layout in (("none", "contiguous"), ("sum", "misaligned")):
                check(kind, backend, x, y, w, pw, reduction=reduction, layout=input_layout)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_other_dtypes(kind, backend):
    """weight / pos_weight of another dtype than the input (float64 or int64 for float32 input, float32
    for bfloat16): PyTorch multiplies them in; so does xent."""
    for dtype, wdtype in ((F32, F64), (F32, torch.int64), (BF16, F32), (F64, F32)):
        x, y = make_case(kind, (9, 13), dtype)
        for shape in ((13,), (9, 13), ()):
            w = make_weight(shape, F64)
            w = (w * 3).round().to(wdtype) if not wdtype.is_floating_point else w.to(wdtype)
            pw = None if kind == "bce" else make_pos_weight(shape, F64).to(wdtype if wdtype.is_floating_point else F32)
            for reduction in REDUCTIONS:
                with backend.active():
                    got = xent_loss(kind, backend.put(x), backend.put(y), backend.put(w), backend.put(pw),
                                    reduction=reduction).cpu()
                expected = torch_loss(kind, x, y, w, pw, reduction=reduction)
                assert got.dtype == expected.dtype == dtype
                exact = ref_loss(kind, x, y, w, pw, reduction=reduction)
                tol = 2e-2 if dtype == BF16 else 1e-6
                torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)


# ================================================================================================
# Memory layouts and upstream gradients.

LAYOUT_CASES = [
    ("transposed", "contiguous"),
    ("contiguous", "transposed"),
    ("last_dim_sliced", "last_dim_sliced"),
    ("misaligned", "misaligned"),
    ("misaligned", "transposed"),
]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("layout,target_layout", LAYOUT_CASES, ids=lambda v: v)
@pytest.mark.parametrize("kind", KINDS)
def test_layouts(backend, kind, layout, target_layout, dtype, reduction):
    for shape in ((37, 80), (2, 3, 5, 7), (31,)):
        x, y = make_case(kind, shape, dtype)
        C = shape[-1]
        check(kind, backend, x, y, make_weight((C,), dtype), None if kind == "bce" else make_pos_weight((C,), dtype),
              reduction=reduction, layout=layout, target_layout=target_layout)


@pytest.mark.parametrize("grad_output", ["ones", "expanded", "expanded_row", "transposed"])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("kind", KINDS)
def test_grad_output_layouts(backend, kind, dtype, grad_output):
    """reduction='none' with an upstream gradient that is broadcast (stride 0, as loss.sum() gives) or
    not contiguous."""
    for shape in ((37, 80), (2, 3, 5, 7)):
        x, y = make_case(kind, shape, dtype)
        check(kind, backend, x, y, reduction="none", grad_output=grad_output)


# ================================================================================================
# Focal options.


FOCAL_OPTIONS = [(0.25, g) for g in (0.0, 0.5, 1.0, 2.0, 2.5, 3.0, 5.0)] + [(a, 2.0) for a in (0.0, 1.0, -1.0)]


@pytest.mark.parametrize("alpha,gamma", FOCAL_OPTIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
def test_focal_alpha_gamma(backend, dtype, alpha, gamma):
    """gamma: none (0), products (1, 2, 3, 5), exp(gamma log m) (0.5, 2.5); alpha: off (< 0), 0, 1."""
    x, y = make_case("focal", (61, 17), dtype)
    for reduction in REDUCTIONS:
        check("focal", backend, x, y, reduction=reduction, alpha=alpha, gamma=gamma)


# ================================================================================================
# Accuracy of the vectorized math, per instruction set (csrc/cpu/simd/: vlog, vlog1p, exp, vpow).


def _ulp_error_ok(actual, exact, ulps, what, floor=2.0**-126):
    """|actual - exact| <= ulps * 2**-23 |exact| + floor: results below the normal range have no relative
    accuracy (the AVX2 and generic exp of csrc/cpu/simd/vec.h flush them to 0)."""
    a, e = actual.double(), exact.double()
    err = (a - e).abs()
    tol = ulps * 2.0**-23 * e.abs() + floor
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} values out of {ulps} ulp; worst rel err "
        f"{(err / e.abs().clamp_min(1e-300)).max().item():.3e} at input index {int((err - tol).argmax())}"
    )


def test_bce_log_accuracy(isa):
    """-max(log x, -100) and -max(log(1 - x), -100) over [0, 1], subnormals included: BCE with y = 1 / 0
    reads the kernels' vlog and vlog1p directly."""
    x = torch.cat([
        torch.logspace(-45, 0, 20001, dtype=F64),
        1 - torch.logspace(-8, -0.01, 5001, dtype=F64),
        torch.rand(10007, dtype=F64),
    ]).to(F32).clamp(0, 1)
    x64 = x.double()
    for y, exact in ((1.0, -torch.clamp(torch.log(x64), min=-100)), (0.0, -torch.clamp(torch.log1p(-x64), min=-100))):
        got = xent.binary_cross_entropy(x, torch.full_like(x, y), reduction="none")
        _ulp_error_ok(got, exact, 3, f"{isa}: bce y={y}")


def test_logits_softplus_and_sigmoid_accuracy(isa):
    """The with-logits loss for y in {0, 1} is softplus(+-x), its gradient sigmoid(x) or -sigmoid(-x): a
    few ulp over the whole float range (no cancellation anywhere)."""
    x = torch.cat([torch.linspace(-100, 100, 40001, dtype=F64), torch.logspace(-30, 4, 2001, dtype=F64),
                   -torch.logspace(-30, 4, 2001, dtype=F64)]).to(F32)
    x64 = x.double()
    for y in (0.0, 1.0):
        t = torch.full_like(x, y)
        xl = leaf(x, True)
        got = xent.binary_cross_entropy_with_logits(xl, t, reduction="none")
        (g,) = torch.autograd.grad(got, xl, torch.ones_like(got))
        exact = binary_cross_entropy_with_logits_reference(x64, t.double(), reduction="none")
        exact_g = torch.sigmoid(x64) - y
        if y == 1.0:
            exact_g = -torch.sigmoid(-x64)
        _ulp_error_ok(got, exact, 4, f"{isa}: with-logits loss y={y}")
        _ulp_error_ok(g, exact_g, 4, f"{isa}: with-logits grad y={y}")


@pytest.mark.parametrize("gamma", [2.0, 2.5, 0.5])
def test_focal_accuracy(isa, gamma):
    """The focal loss in float32 over a sweep of logits, against float64: integer gamma within a few ulp,
    other gamma within (gamma |log m| + 8) ulp (exp(gamma log m), see csrc/cpu/simd/math.h vpow)."""
    x = torch.linspace(-30, 30, 20001, dtype=F64).to(F32)
    for y in (0.0, 1.0):
        t = torch.full_like(x, y)
        got = xent.sigmoid_focal_loss(x, t, 0.25, gamma, "none")
        exact = sigmoid_focal_loss_reference(x.double(), t.double(), 0.25, gamma, "none")
        p, q = torch.sigmoid(x.double()), torch.sigmoid(-x.double())
        m = (1 - y) * p + y * q
        ulps = 8 + (0 if gamma == int(gamma) else gamma * torch.log(m).abs())
        _ulp_error_ok(got, exact, ulps, f"{isa}: focal gamma={gamma} y={y}")


# ================================================================================================
# Special values.

INF, NAN = math.inf, math.nan


def _special_vector(values, dtype, pad):
    """The special values inside a vector of ordinary ones (`pad` of them before and after), so that both
    the vector body and the tail of a block see them."""
    core = torch.tensor(values, dtype=F64)
    if pad:
        filler = torch.full((pad,), 0.3, dtype=F64)
        core = torch.cat([filler, core, filler[:7]])
    return core.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ["logits", "focal"])
def test_special_values_logits(backend, kind, dtype):
    """NaN and infinite logits / targets give PyTorch's (torchvision's) values, NaN included: e.g. a -inf
    logit gives NaN as in PyTorch's formula, +inf with y = 0 gives inf."""
    big = 6e4 if dtype == F16 else 1e4
    xs = [INF, -INF, NAN, 0.0, -0.0, big, -big, 88.0, -88.0, 100.0, -100.0, 20.0, -20.0]
    for pad in (0, 40):
        for y_value in (0.0, 1.0, 0.5, NAN):
            for pos_weight in (None, torch.tensor(2.5, dtype=dtype)):
                x = _special_vector(xs, dtype, pad)
                y = torch.full_like(x, y_value)
                for gamma in (2.0, 0.0):
                    opts = dict(reduction="none")
                    if kind == "focal":
                        opts.update(alpha=0.25, gamma=gamma)
                    exact = torch_loss(kind, x.double(), y.double(), None, None if pos_weight is None
                                       else pos_weight.double(), **opts)
                    low = torch_loss(kind, x, y, None, pos_weight, **opts)
                    with backend.active():
                        got = xent_loss(kind, backend.put(x), backend.put(y), None, backend.put(pos_weight), **opts)
                    what = f"{kind} special x, y={y_value}, pos_weight={pos_weight is not None}, pad={pad}"
                    # (In float16 PyTorch's own result overflows to inf for x = -6e4 with pos_weight,
                    # an intermediate beyond 65504; xent's float32 intermediates keep the finite value.)
                    bound = pytorch_parity_bound(dtype, exact, low, extra=Bound.cancellation(big, F64))
                    assert_within(got, exact, bound, what=what)
                    if kind != "focal":
                        break


@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
@pytest.mark.parametrize("kind", ["logits", "focal"])
def test_special_values_gradient(backend, kind, dtype):
    """Gradients at NaN / infinite logits have PyTorch's NaN pattern and values."""
    xs = [INF, -INF, NAN, 0.0, 1e4, -1e4, 88.0, -88.0, 20.0, -20.0]
    for y_value in (0.0, 1.0, 0.5):
        for gamma in (2.0, 0.0, 1.0):
            x = _special_vector(xs, dtype, 40)
            y = torch.full_like(x, y_value)
            opts = dict(reduction="sum")
            if kind == "focal":
                opts.update(alpha=0.25, gamma=gamma)
            x1, x2 = leaf(x, True), backend.put(x).requires_grad_()
            (g_pt,) = torch.autograd.grad(torch_loss(kind, x1, y, **opts), x1)
            with backend.active():
                (g,) = torch.autograd.grad(xent_loss(kind, x2, backend.put(y), **opts), x2)
            assert_within(g, g_pt, pytorch_parity_bound(dtype, g_pt.double(), grad=True),
                          what=f"{kind} grad at special x, y={y_value}, gamma={gamma}")
            if kind != "focal":
                break


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_special_values_bce(backend, dtype):
    """BCE at the ends of [0, 1]: logs clamped at -100 (loss 100 or 0), gradients (x - y) / 1e-12 where
    x (1 - x) < 1e-12; subnormal probabilities are not clamped (log 1e-40 = -92.1). float16 gradients are
    checked in test_bce_float16_gradient_deviation."""
    tiny = {F32: 1e-40, F64: 1e-300, BF16: 1e-40, F16: 6e-8}[dtype]
    xs = [0.0, 1.0, tiny, 1 - 2.0**-10, 0.5, 2.0**-20]
    for y_value in (0.0, 1.0, 0.25):
        x = _special_vector(xs, dtype, 40)
        y = torch.full_like(x, y_value)
        exact = F.binary_cross_entropy(x.double(), y.double(), reduction="none")
        low = F.binary_cross_entropy(x, y, reduction="none")
        xl = backend.put(x).requires_grad_()
        with backend.active():
            got = xent.binary_cross_entropy(xl, backend.put(y), reduction="none")
        assert_within(got, exact, pytorch_parity_bound(dtype, exact, low), what=f"bce at the ends, y={y_value}")
        if dtype == F16:
            continue
        x64 = leaf(x.double(), True)
        (g_exact,) = torch.autograd.grad(F.binary_cross_entropy(x64, y.double(), reduction="sum"), x64)
        with backend.active():
            (g,) = torch.autograd.grad(got.sum(), xl)
        g = g.cpu()
        g_low = None
        if dtype in LOW:
            x_low = leaf(x, True)
            (g_low,) = torch.autograd.grad(F.binary_cross_entropy(x_low, y, reduction="sum"), x_low)
        assert_within(g, g_exact, pytorch_parity_bound(dtype, g_exact, g_low, grad=True),
                      what=f"bce grad at the ends, y={y_value}")


def test_bce_float16_gradient_deviation(backend):
    """Documented deviation: PyTorch's float16 BCE backward clamps x (1 - x) at EPSILON = 1e-12 *rounded to
    float16*, i.e. 0, so x = 0 with y = 0 gives 0 / 0 = NaN. xent computes in float32 like the other
    dtypes: the true limit 0 (and -inf where the float32 value -1e12 overflows float16, as PyTorch)."""
    x = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=F16)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=F16)
    xl, xt = backend.put(x).requires_grad_(), leaf(x, True)
    with backend.active():
        (g,) = torch.autograd.grad(xent.binary_cross_entropy(xl, backend.put(y), reduction="sum"), xl)
    (g_pt,) = torch.autograd.grad(F.binary_cross_entropy(xt, y, reduction="sum"), xt)
    assert g.cpu().tolist() == [0.0, 0.0, -math.inf, math.inf]
    assert torch.isnan(g_pt[:2]).all() and g_pt[2:].tolist() == [-math.inf, math.inf]


# ================================================================================================
# BCE's range checks.


@pytest.mark.parametrize("where", ["first", "body", "tail", "last_block"])
@pytest.mark.parametrize("bad", ["input_above_one", "input_negative", "input_nan", "target_above_one",
                                 "target_negative", "target_nan"])
def test_bce_out_of_range_raises(backend, bad, where):
    """One bad value anywhere (first element, inside a vector, in a block's tail, in the last of many
    blocks) raises PyTorch's RuntimeError, whatever the reduction and the dtype; the CUDA kernels fail a
    device-side assert naming it (a RuntimeError under the emulator), as PyTorch's CUDA kernel."""
    if backend.name == "cuda":
        pytest.skip("a device-side assert leaves the CUDA context unusable for the rest of the session")
    n = {"first": 100, "body": 100, "tail": 100, "last_block": 3 * 2048 + 5}[where]
    pos = {"first": 0, "body": 37, "tail": 99, "last_block": n - 2}[where]
    for dtype in (F32, BF16, F64):
        x = torch.full((n,), 0.5, dtype=dtype)
        y = torch.full((n,), 1.0, dtype=dtype)
        value = {"above_one": 1.5, "negative": -1e-3, "nan": NAN}[bad.split("_", 1)[1]]
        (x if bad.startswith("input") else y)[pos] = value
        message = f"all elements of {bad.split('_')[0]} should be between 0 and 1"
        with pytest.raises(RuntimeError, match=message):
            F.binary_cross_entropy(x, y)
        if backend.emulated:
            message = "device-side assert.*binary_cross_entropy: " + message
        for reduction in REDUCTIONS:
            with pytest.raises(RuntimeError, match=message):
                with backend.active():
                    xent.binary_cross_entropy(backend.put(x), backend.put(y), reduction=reduction)


def test_bad_input_messages():
    """The messages of the common mistakes are PyTorch's."""
    x, y = torch.randn(3, 4), torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"Target size \(torch.Size\(\[2, 4\]\)\) must be the same as input size"):
        xent.binary_cross_entropy_with_logits(x, y[:2])
    with pytest.raises(ValueError, match="Using a target size"):
        xent.binary_cross_entropy(y, y[:2])
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        xent.binary_cross_entropy(y, y, reduction="avg")
    with pytest.raises(ValueError, match="Invalid Value for arg 'reduction'"):
        xent.sigmoid_focal_loss(x, y, reduction="avg")
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'pos_weight'"):
        xent.binary_cross_entropy_with_logits(x, y, pos_weight=torch.ones(4, requires_grad=True))
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        xent.binary_cross_entropy(y.long(), y.long())
    with pytest.raises(RuntimeError, match="Found dtype Double but expected Float"):
        xent.binary_cross_entropy(y, y.double())
    with pytest.raises(RuntimeError, match="must match the size of tensor"):
        xent.binary_cross_entropy_with_logits(x, y, weight=torch.ones(3))
    # Without grad mode a weight that requires grad is fine, as in PyTorch.
    with torch.no_grad():
        w = torch.ones(4, requires_grad=True)
        torch.testing.assert_close(xent.binary_cross_entropy_with_logits(x, y, w),
                                   F.binary_cross_entropy_with_logits(x, y, w))


def test_ops_check_their_arguments():
    """The ops themselves (not only the Python wrappers) refuse what would read out of bounds or mix
    devices."""
    ops = torch.ops.xent
    x, y = torch.randn(3, 4), torch.rand(3, 4)
    with pytest.raises(ValueError):
        ops.binary_cross_entropy_with_logits_fwd(x, y[:2])
    with pytest.raises(RuntimeError, match="Found dtype"):
        ops.sigmoid_focal_loss_fwd(x, y.double())
    with pytest.raises(RuntimeError, match="device"):
        ops.binary_cross_entropy_with_logits_fwd(x, y, torch.ones(4, device="meta"))
    with pytest.raises(RuntimeError):
        ops.binary_cross_entropy_fwd(y, y, torch.ones(5))
    with pytest.raises(ValueError, match="reduction"):
        ops.binary_cross_entropy_fwd(y, y, reduction=3)
    with pytest.raises(RuntimeError, match="grad_loss"):
        ops.binary_cross_entropy_with_logits_bwd(torch.ones(3), x, y, None, None, reduction=0)
    with pytest.raises(RuntimeError, match="grad_loss"):
        ops.binary_cross_entropy_with_logits_bwd(torch.ones(3, 4), x, y, None, None, reduction=1)


@pytest.mark.parametrize("kind", ["logits", "focal"])
def test_mixed_dtypes_follow_pytorch(kind):
    """Type promotion as PyTorch's composite formulas: with-logits takes the target's dtype, focal the
    promoted one; values agree with the float64 truth and gradients come back in each argument's dtype."""
    x, y = torch.randn(5, 6, dtype=F64), torch.rand(5, 6, dtype=F64)
    for a, b in ((F32, F64), (F64, F32), (BF16, F32), (F32, BF16), (F16, BF16)):
        xa, yb = leaf(x.to(a), True), leaf(y.to(b), True)
        got = xent_loss(kind, xa, yb)
        expected = torch_loss(kind, x.to(a), y.to(b))
        assert got.dtype == expected.dtype, f"{a} {b}: {got.dtype} vs PyTorch's {expected.dtype}"
        exact = ref_loss(kind, x.to(a), y.to(b))
        tol = 2e-2 if got.dtype in LOW or a in LOW else 1e-6
        torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)
        gx, gy = torch.autograd.grad(got, [xa, yb])
        assert gx.dtype == a and gy.dtype == b


def test_deprecated_size_average_reduce():
    x, y = torch.randn(4, 5), torch.rand(4, 5)
    p = torch.sigmoid(x)
    for size_average, reduce in ((None, False), (False, None), (True, True), (False, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(
                xent.binary_cross_entropy(p, y, size_average=size_average, reduce=reduce),
                F.binary_cross_entropy(p, y, size_average=size_average, reduce=reduce))
            torch.testing.assert_close(
                xent.binary_cross_entropy_with_logits(x, y, size_average=size_average, reduce=reduce),
                F.binary_cross_entropy_with_logits(x, y, size_average=size_average, reduce=reduce))


def test_compile_fullgraph_inductor():
    """fullgraph=True (no graph break) with Inductor, forward and backward of all three losses in one
    graph, dynamic=True with two batch sizes compiled once; equal to eager xent."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    def f(x, y, w, pw):
        a = xent.binary_cross_entropy_with_logits(x * 2.0, y, w, pos_weight=pw)
        b = xent.sigmoid_focal_loss(x, y, 0.25, 2.0, "mean")
        c = xent.binary_cross_entropy(torch.sigmoid(x).clamp(0.01, 0.99), y, reduction="sum")
        return a + b + 1e-3 * c

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    w, pw = make_weight((11,), F32), make_pos_weight((11,), F32)
    frames = []
    for N in (6, 13):
        x, y = make_case("logits", (N, 11), F32)
        outs = []
        for fn in (compiled, f):
            xl = leaf(x, True)
            loss = fn(xl, y, w, pw)
            (g,) = torch.autograd.grad(loss, xl)
            outs.append((loss.detach(), g))
        (lc, gc), (le, ge) = outs
        # Same xent kernels in both; inductor may fuse the PyTorch ops around them (upstream-gradient scaling,
        # casts) in another order, which moves a float32 result by an ulp or two, far below 1e-6.
        torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-9)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], f"dynamic=True recompiled for a new batch size: {frames}"


# ================================================================================================
# The shared tests (tests/harness/tester.py), one class per loss.

def _opcheck_samples(ns, kind):
    ops = getattr(torch.ops, ns)
    samples = []
    configs = (
        ((4, 5), None, None, 1),
        ((4, 5), (5,), (5,), 0),
        ((2, 3, 4), (3, 1), (4,), 2),
        ((2, 3, 4), (2, 3, 4), (), 1),
        ((7,), (), None, 0),
    )
    for dtype in (F64, F32):
        for shape, wshape, pwshape, reduction in configs if dtype == F64 else configs[:2]:
            if True:
                name = OP_NAMES[kind]
                x, y = make_case(kind, shape, dtype, soft=True)
                if kind != "bce":
                    x = ALL_LAYOUTS["transposed"](x)  # a non-contiguous input as well
                x.requires_grad_()
                y.requires_grad_()
                w = make_weight(wshape, dtype) if wshape is not None else None
                pw = make_pos_weight(pwshape, dtype) if pwshape is not None else None
                options = (w,) if kind == "bce" else (w, pw)
                kw = {"reduction": reduction}
                if kind == "focal":
                    kw.update(alpha=0.3, gamma=2.0 if reduction != 2 else 1.5)
                fwd, bwd = getattr(ops, f"{name}_fwd"), getattr(ops, f"{name}_bwd")
                samples.append((fwd, (x, y) + options, kw))
                loss = fwd(x.detach(), y.detach(), *options, **kw)
                g = torch.randn(loss.shape, dtype=dtype).requires_grad_()
                samples.append((bwd, (g, x, y) + options, kw))
    return samples



def _compile_case(case):
    """Through AOTAutograd (fake kernels, autograd formulas incl. the target gradient): the loss bitwise
    equal to eager (the same kernels run); the target gradient is computed with PyTorch ops that
    torch.compile may fuse: float32 ulps, not bitwise."""
    kind = case.split("_")[0]
    target_grad = "target_grad" in case

    def fn(x, y, w, pw):
        if kind == "bce":
            return xent.binary_cross_entropy(x, y, w, reduction="none" if case == "bce_none" else "mean")
        if kind == "logits":
            return xent.binary_cross_entropy_with_logits(x, y, w, pos_weight=pw)
        return xent.sigmoid_focal_loss(x, y, 0.3, 2.0, "sum", weight=w, pos_weight=pw)

    def make_args(N):
        x, y = make_case(kind, (N, 3, 4), F32, soft=True)
        pw = make_pos_weight((4,), F32) if kind != "bce" and case != "focal_sum" else None
        return x, y, make_weight((4,), F32), pw

    return f"{case}-aot_eager", CompileCase("aot_eager", fn, make_args, differentiate=(0, 1) if target_grad else (0,),
                                            grad_tolerance=(1e-6, 1e-7))


COMPILE_CASES = dict(_compile_case(case) for case in ("bce_none", "bce_target_grad", "logits_pos_weight",
                                                      "logits_target_grad", "focal_sum", "focal_target_grad_weighted"))


GRADCHECK_CASES = [
    ("bce", (4, 5), dict(reduction="mean")),
    ("bce", (3, 4, 2), dict(reduction="none", weight=(4, 1))),
    ("bce", (6,), dict(reduction="sum", weight=(6,))),
    ("logits", (4, 5), dict(reduction="mean")),
    ("logits", (4, 5), dict(reduction="none", weight=(5,), pos_weight=(5,))),
    ("logits", (3, 4, 2), dict(reduction="sum", pos_weight=(3, 4, 2))),
    ("logits", (), dict(reduction="mean", pos_weight=())),
    ("focal", (4, 5), dict(reduction="none")),
    ("focal", (4, 5), dict(reduction="mean", gamma=0.0, alpha=-1.0)),
    ("focal", (4, 5), dict(reduction="sum", gamma=1.0, weight=(5,), pos_weight=(5,))),
    ("focal", (3, 4, 2), dict(reduction="mean", gamma=2.5, alpha=0.6, pos_weight=(2,))),
    ("focal", (6,), dict(reduction="none", gamma=3.0, weight=())),
]


def _gradcheck_inputs(kind, shape, opts):
    opts = dict(opts)
    x = make_input(kind, shape, F64, scale=1.5)
    if kind == "bce":
        x = x.clamp(0.1, 0.9)  # finite differences stay inside (0, 1)
    y = make_target(shape, F64, soft=True).clamp(0.05, 0.95)
    w = make_weight(opts.pop("weight"), F64) if "weight" in opts else None
    pw = make_pos_weight(opts.pop("pos_weight"), F64) if "pos_weight" in opts else None
    return x.requires_grad_(), y.requires_grad_(), w, pw, opts


DETERMINISM_CASES = {
    "bce_3000x80": ("bce", (3000, 80), F32),
    "logits_700x1000": ("logits", (700, 1000), F32),
    "logits_bf16_3000x80": ("logits", (3000, 80), BF16),
    "focal_kdim": ("focal", (8, 9, 33, 47), F32),
    "focal_f64_1000x81": ("focal", (1000, 81), F64),
}


def _determinism_run(backend, kind, shape, dtype, target_grad=True):
    """Losses (none, mean, sum) and gradients (input, and target unless target_grad=False) with per-class
    weight and pos_weight, fresh tensors each call (same values: fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(shape, generator=g, dtype=F64)
    x = (torch.sigmoid(z).clamp(0.01, 0.99) if kind == "bce" else z * 3).to(dtype)
    y = torch.rand(shape, generator=g, dtype=F64).to(dtype)
    C = shape[-1]
    w = (torch.rand(C, generator=g, dtype=F64) + 0.5).to(dtype)
    pw = None if kind == "bce" else (torch.rand(C, generator=g, dtype=F64) * 2 + 0.5).to(dtype)
    xd, yd = backend.put(x).requires_grad_(), backend.put(y).requires_grad_(target_grad)
    out = []
    with backend.active():
        for reduction in REDUCTIONS:
            loss = xent_loss(kind, xd, yd, backend.put(w), backend.put(pw), reduction=reduction)
            go = torch.ones_like(loss) if reduction != "none" else torch.linspace(
                -1, 1, loss.numel(), device=loss.device).view(loss.shape).to(dtype)
            out.append(loss.detach().cpu())
            out.extend(gr.cpu() for gr in torch.autograd.grad(loss, [xd, yd] if target_grad else [xd], go))
    return out


def _bad_input_cases():
    p = torch.rand(3, 4)
    x = torch.randn(3, 4)
    y = torch.rand(3, 4)
    meta = torch.device("meta")
    w_grad = torch.rand(4, requires_grad=True)
    return {
        # name: (kind, args, kwargs)
        "bce_size_mismatch": ("bce", (p, y[:2]), {}),
        "bce_0d_vs_1d": ("bce", (torch.rand(1), torch.rand(())), {}),
        "bce_bad_reduction": ("bce", (p, y), {"reduction": "avg"}),
        "bce_elementwise_mean": ("bce", (p, y), {"reduction": "elementwise_mean"}),
        "bce_int_input": ("bce", (p.long(), y.long()), {}),
        "bce_target_dtype": ("bce", (p, y.double()), {}),
        "bce_bool_target": ("bce", (p, y > 0.5), {}),
        "bce_weight_not_broadcastable": ("bce", (p, y), {"weight": torch.ones(3)}),
        "bce_weight_bigger": ("bce", (p, y), {"weight": torch.ones(2, 3, 4)}),
        "bce_weight_requires_grad": ("bce", (p, y), {"weight": w_grad}),
        "bce_weight_other_device": ("bce", (p, y), {"weight": torch.ones(4, device=meta)}),
        "bce_target_other_device": ("bce", (p, y.to(meta)), {}),
        "logits_size_mismatch": ("logits", (x, y[:2]), {}),
        "logits_broadcastable_target": ("logits", (x, y[:1]), {}),
        "logits_bad_reduction": ("logits", (x, y), {"reduction": "avg"}),
        "logits_int_input": ("logits", (x.long(), y), {}),
        "logits_int_target": ("logits", (x, y.long()), {}),
        "logits_bool_target": ("logits", (x, y > 0.5), {}),
        "logits_mixed_float_dtypes": ("logits", (x, y.double()), {}),
        "logits_mixed_float_dtypes_2": ("logits", (x.double(), y), {}),
        "logits_bf16_input_f32_target": ("logits", (x.bfloat16(), y), {}),
        "logits_weight_not_broadcastable": ("logits", (x, y), {"weight": torch.ones(3)}),
        "logits_weight_bigger": ("logits", (x, y), {"weight": torch.ones(2, 3, 4)}),
        "logits_pos_weight_not_broadcastable": ("logits", (x, y), {"pos_weight": torch.ones(3)}),
        "logits_pos_weight_bigger": ("logits", (x, y), {"pos_weight": torch.ones(2, 3, 4)}),
        "logits_pos_weight_column": ("logits", (x, y), {"pos_weight": torch.rand(3, 1) + 0.5}),
        "logits_int_weights": ("logits", (x, y), {"weight": torch.ones(4, dtype=torch.long),
                                                  "pos_weight": torch.full((4,), 2, dtype=torch.long)}),
        "logits_weight_requires_grad": ("logits", (x, y), {"weight": w_grad}),
        "logits_pos_weight_requires_grad": ("logits", (x, y), {"pos_weight": w_grad}),
        "logits_weight_other_device": ("logits", (x, y), {"weight": torch.ones(4, device=meta)}),
        "focal_size_mismatch": ("focal", (x, y[:2]), {}),
        "focal_bad_reduction": ("focal", (x, y), {"reduction": "avg"}),
        "focal_int_input": ("focal", (x.long(), y), {}),
        "focal_int_target": ("focal", (x, y.long()), {}),
        "focal_mixed_float_dtypes": ("focal", (x.double(), y), {}),
        "focal_mixed_float_dtypes_2": ("focal", (x.half(), y.bfloat16()), {}),
    }


def _module_cases():
    """{kind: {id: ModuleCase}} of BCELoss and BCEWithLogitsLoss (the weight: "w", pos_weight: "pw")."""
    w, pw = make_weight((5,), F64), make_pos_weight((5,), F64)
    cases = {"bce": {}, "logits": {}}
    for name, arg in [
        ("BCELoss", {}),
        ("BCELoss", {"weight": "w"}),
        ("BCELoss", {"reduction": "none"}),
        ("BCELoss", {"weight": "w", "reduction": "sum"}),
        ("BCELoss", {"size_average": False}),
        ("BCEWithLogitsLoss", {}),
        ("BCEWithLogitsLoss", {"pos_weight": "pw"}),
        ("BCEWithLogitsLoss", {"weight": "w", "pos_weight": "pw", "reduction": "none"}),
        ("BCEWithLogitsLoss", {"reduce": False}),
    ]:
        kind = "bce" if name == "BCELoss" else "logits"
        kw = {k: {"w": w, "pw": pw}.get(v, v) if isinstance(v, str) else v for k, v in arg.items()}
        cases[kind][f"{name}-{arg}"] = ModuleCase(name, kw, lambda kind=kind: make_case(kind, (6, 5), F64, soft=True))
    return cases


with fixed_rng(0):  # built at import, before the per-test seed: the same values every run
    BAD_INPUT_CASES = _bad_input_cases()
    MODULE_CASES = _module_cases()


# A subset reaching every kernel path: vector kernels with whole blocks and a partial last block, the
# scalar kernels (misaligned input, fresh output), the head and tail of a misaligned input whose target has
# the same alignment (reductions), strided / broadcast / scalar operands, integer and non-integer gamma.
SCHEDULE_CASES = {
    # name: (kind, shape, dtype, layout, target_layout, weight shape, pos_weight shape, options)
    "bce_vector_mean": ("bce", (300, 80), F32, "contiguous", "contiguous", (80,), None, dict(reduction="mean")),
    "bce_head_tail_sum": ("bce", (37, 81), BF16, "misaligned", "misaligned", (37, 1), None, dict(reduction="sum")),
    "logits_scalar_none": ("logits", (2, 3, 5, 7), F32, "misaligned", "transposed", (3, 1, 7), (7,),
                           dict(reduction="none")),
    "logits_f64_blocks": ("logits", (1100, 9), F64, "contiguous", "contiguous", (), (9,), dict(reduction="mean")),
    "focal_vector_sum": ("focal", (64, 257), BF16, "contiguous", "contiguous", (64, 257), (), dict(reduction="sum")),
    "focal_pow_none": ("focal", (33, 40), F32, "transposed", "contiguous", None, (40,),
                       dict(reduction="none", gamma=2.5, alpha=-1.0)),
}



class BinaryLossTester(LossTester):
    """The shared tests of one binary loss (``kind``): the cases of that kind in each table."""

    kind = None

    @classmethod
    def tables(cls, kind):
        """The class attributes of `kind`'s tester."""
        return dict(
            kind=kind,
            spec=BINARY[kind],
            OPS=(f"{OP_NAMES[kind]}_fwd", f"{OP_NAMES[kind]}_bwd"),
            COMPILE_CASES={name: case for name, case in COMPILE_CASES.items() if name.startswith(f"{kind}_")},
            GRADCHECK_CASES={f"{shape}-{opts}": (k, shape, opts) for k, shape, opts in GRADCHECK_CASES if k == kind},
            DETERMINISM_CASES={name: case for name, case in DETERMINISM_CASES.items() if case[0] == kind},
            BAD_INPUTS={name: BadInput(args, kwargs) for name, (k, args, kwargs) in BAD_INPUT_CASES.items() if k == kind},
            SCHEDULE_CASES={name: case for name, case in SCHEDULE_CASES.items() if case[0] == kind},
            # An empty (0, 3, 2) input and target, neither dense.
            EMPTY_TARGETS={"target": lambda x: torch.zeros(0, 3, 4)[..., ::2]},
            MODULE_CASES=MODULE_CASES.get(kind, {}),
        )

    @classmethod
    def opcheck_samples(cls, ns):
        return _opcheck_samples(ns, cls.kind)

    def gradcheck_problem(self, case, backend):
        kind, shape, opts = case
        x, y, w, pw, kw = _gradcheck_inputs(kind, shape, opts)
        wd, pwd = backend.put(w), backend.put(pw)
        return (lambda x, y: xent_loss(kind, x, y, wd, pwd, **kw)), (backend.put(x), backend.put(y))

    def determinism_run(self, backend, case, kernels_only=False):
        # The target gradient is computed with PyTorch's elementwise ops, whose vectorized bodies and scalar
        # tails may round differently depending on how the elements are split among threads.
        return _determinism_run(backend, *case, target_grad=not kernels_only)

    def run_schedule_case(self, backend, case):
        kind, shape, dtype, layout, target_layout, wshape, pwshape, opts = case
        x, y = make_case(kind, shape, dtype, soft=True)
        w = make_weight(wshape, dtype) if wshape is not None else None
        pw = make_pos_weight(pwshape, dtype) if pwshape is not None else None
        check(kind, backend, x, y, w, pw, layout=layout, target_layout=target_layout, **opts)


class TestBinaryCrossEntropy(BinaryLossTester):
    locals().update(BinaryLossTester.tables("bce"))


class TestBinaryCrossEntropyWithLogits(BinaryLossTester):
    locals().update(BinaryLossTester.tables("logits"))


class TestSigmoidFocalLoss(BinaryLossTester):
    locals().update(BinaryLossTester.tables("focal"))
    test_module_matches_torch = None  # torch.nn has no such module: test_sigmoid_focal_loss_module


# ================================================================================================
# Memory traffic of the CUDA kernels (SIMT emulator counts, Note [CUDA binary loss kernels]).

VECTORS_PER_BLOCK = 256 * 4  # binary_losses.cuh: kBlock x kVectorsPerThread


def _kernel_blocks(numel, elt, vectorized, head=0):
    nvec = (numel - head) // (16 // elt) if vectorized else numel
    return max(1, -(-nvec // VECTORS_PER_BLOCK))


@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=dtype_id)
@pytest.mark.parametrize("shape", [(64, 4096), (37, 81)], ids=shape_id)
@pytest.mark.parametrize("kind", KINDS)
def test_traffic(kind, shape, dtype, weighted, layout):
    """Forward: each input and target element read once (and an input-shaped weight once), the loss written
    once (reduction none) or one double partial per block written and read back by the finish kernel.
    Backward: the same reads plus grad_loss once (none) or the 0-d grad_loss once per block (mean), and
    each gradient element written once. Exact byte counts."""
    if not xent.testing.emulated_cuda_available():
        pytest.skip("needs the test-only emulator build (XENT_BUILD_EMULATOR=1)")
    ops = torch.ops.xent_emulated
    x, y = make_case(kind, shape, dtype, soft=True)
    x, y = ALL_LAYOUTS[layout](x), ALL_LAYOUTS[layout](y)
    w = make_weight(shape, dtype) if weighted else None
    n, elt = x.numel(), x.element_size()
    stream = n * elt * (3 if weighted else 2)  # input, target (, weight)
    fwd = getattr(ops, f"{OP_NAMES[kind]}_fwd")
    bwd = getattr(ops, f"{OP_NAMES[kind]}_bwd")
    options = (w,) if kind == "bce" else (w, None)
    # Misaligned input and target share their alignment: the forward's vector kernels with a scalar head
    # (reductions) or, against the aligned fresh loss / gradient, the scalar kernels.
    head = (16 - (x.data_ptr() % 16)) % 16 // elt
    for reduction in (0, 1):
        loss, read, written = simt_traffic(lambda: fwd(x, y, *options, reduction=reduction))
        if reduction == 0:
            assert (read, written) == (stream, n * elt), (read, written)
        else:
            blocks = _kernel_blocks(n, elt, True, head)
            assert (read, written) == (stream + 8 * blocks, 8 * blocks + elt), (read, written, blocks)
        go = torch.randn(loss.shape, dtype=F64).to(dtype)
        grad, read, written = simt_traffic(lambda: bwd(go, x, y, *options, reduction=reduction))
        blocks = _kernel_blocks(n, elt, layout == "contiguous")
        expected_read = stream + (n * elt if reduction == 0 else 8 * blocks)
        assert (read, written) == (expected_read, n * elt), (read, written, blocks)


# ================================================================================================
# Instruction sets.

ISA_SHAPES = [(37, 80), (3, 1001), (5,)]  # whole vectors; blocks with vector tails; a lone tail


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", KINDS)
def test_isa_parity(isa, cpu_backend, kind, dtype):
    """Every instruction set's kernels (vector body, tails, operand kinds, integer and non-integer focal
    gamma) against the float64 truth."""
    for shape in ISA_SHAPES:
        x, y = make_case(kind, shape, dtype, soft=True)
        C = shape[-1]
        cases = (
            ("none", None, None),
            ("sum", make_weight((C,), dtype), make_pos_weight((C,), dtype)),
            ("mean", make_weight(shape, dtype), make_pos_weight((), dtype)),
        )
        for reduction, w, pw in cases:
            check(kind, cpu_backend, x, y, w, None if kind == "bce" else pw, reduction=reduction,
                  gamma=2.5 if reduction == "sum" else 2.0)


@pytest.mark.parametrize("kind", ["logits", "focal"])
def test_isa_special_values(isa, cpu_backend, kind):
    for dtype in DTYPES:
        test_special_values_logits(cpu_backend, kind, dtype)
    test_special_values_bce(cpu_backend, F32)


# ================================================================================================
# The fused forward + gradient ops (Note [Fused gradient] in xent/_fused.py; the API-level checks of every
# fused loss are in tests/test_fused_grad.py).

FUSED_OPS = {
    "bce": ("binary_cross_entropy", False),
    "logits": ("binary_cross_entropy_with_logits", True),
    "focal": ("sigmoid_focal_loss", True),
}


def _same_values(a, b):
    """Bitwise equal values (signed zeros included), NaN where NaN. NaN payloads and signs may differ: which
    operand's NaN an instruction propagates depends on the operand order the compiler picked."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a[~nan].view(ints), b[~nan].view(ints))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", KINDS)
def test_isa_fused_op_is_bitwise_the_separate_ops(isa, kind, dtype):
    """Every instruction set's `*_fwd_grad` kernel gives bitwise the `*_fwd` op's loss and the `*_bwd` op's
    gradient for grad_loss = 1 (vector body, tails, operand kinds, the weightless instance, special values,
    integer and non-integer gamma): the fused kernel shares their terms, and fma contraction must not
    round them differently."""
    name, has_pos_weight = FUSED_OPS[kind]
    ops = torch.ops.xent
    fwd, bwd, fused = (getattr(ops, f"{name}_{suffix}") for suffix in ("fwd", "bwd", "fwd_grad"))
    for shape in ISA_SHAPES + [(3, 2048 + 33)]:
        x, y = make_case(kind, shape, dtype, soft=True)
        if kind != "bce":  # infinite and NaN logits (the kernels' special-value branch) in a few lanes
            flat = x.view(-1)
            flat[: min(4, flat.numel())] = torch.tensor([INF, -INF, NAN, 30.0], dtype=dtype)[: min(4, flat.numel())]
        C = shape[-1]
        operands = [(None, None), (make_weight((C,), dtype), make_pos_weight((C,), dtype)),
                    (make_weight(shape, dtype), make_pos_weight((), dtype))]
        for w, pw in operands:
            options = (w, pw) if has_pos_weight else (w,)
            for reduction in (1, 2):
                for kwargs in ({}, ) if kind != "focal" else ({"alpha": 0.25, "gamma": 2.0},
                                                             {"alpha": -1.0, "gamma": 1.5}):
                    loss, grad = fused(x, y, *options, reduction=reduction, **kwargs)
                    expected_loss = fwd(x, y, *options, reduction=reduction, **kwargs)
                    expected_grad = bwd(torch.ones((), dtype=dtype), x, y, *options, reduction=reduction, **kwargs)
                    what = f"{isa} {kind} {dtype} {shape} weighted={w is not None} reduction={reduction} {kwargs}"
                    assert _same_values(loss, expected_loss), what
                    assert _same_values(grad, expected_grad), what


@pytest.mark.parametrize("bad", ["input", "target"])
def test_fused_bce_out_of_range_raises(bad):
    """The fused op checks the range as the forward op does (a bad value in a later block's tail)."""
    x = torch.full((3 * 2048 + 5,), 0.5, requires_grad=True)
    y = torch.full((3 * 2048 + 5,), 1.0)
    with torch.no_grad():
        (x if bad == "input" else y)[-2] = 1.5
    for reduction in ("mean", "sum"):
        with pytest.raises(RuntimeError, match=f"all elements of {bad} should be between 0 and 1"):
            xent.binary_cross_entropy(x, y, reduction=reduction)  # differentiated: the fused op
    with pytest.raises(RuntimeError, match="reduction must be mean"):
        torch.ops.xent.binary_cross_entropy_fwd_grad(x.detach(), y, reduction=0)


# ================================================================================================
# Modules.


def test_sigmoid_focal_loss_module():
    w, pw = make_weight((5,), F32), make_pos_weight((5,), F32)
    m = xent.nn.SigmoidFocalLoss(alpha=0.3, gamma=1.5, reduction="sum", weight=w, pos_weight=pw)
    assert set(dict(m.named_buffers())) == {"weight", "pos_weight"}
    assert "alpha=0.3, gamma=1.5, reduction=sum" in repr(m)
    x, y = make_case("focal", (6, 5), F32)
    torch.testing.assert_close(m(x, y), xent.sigmoid_focal_loss(x, y, 0.3, 1.5, "sum", weight=w, pos_weight=pw))
    m64 = m.double()
    assert m64.weight.dtype == F64 and m64.pos_weight.dtype == F64
    torch.testing.assert_close(m64(x.double(), y.double()),
                               torch_loss("focal", x.double(), y.double(), w.double(), pw.double(),
                                          reduction="sum", alpha=0.3, gamma=1.5), rtol=1e-12, atol=1e-12)
    plain = xent.nn.SigmoidFocalLoss()
    # float32 against torchvision's float32 composition (other formula, other rounding): the project's 1e-6.
    torch.testing.assert_close(plain(x, y), tv_ops.sigmoid_focal_loss(x, y), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="Invalid Value for arg 'reduction'"):
        xent.nn.SigmoidFocalLoss(reduction="avg")
    # Works inside a model, with its parameters' gradient.
    model = torch.nn.Linear(8, 5)
    loss = xent.nn.BCEWithLogitsLoss(pos_weight=pw)(model(torch.randn(3, 8)), torch.rand(3, 5))
    loss.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()


# ================================================================================================
# The benchmark script (benchmarks/bench_losses.py): its mechanics on a tiny configuration.


def test_benchmark_script_quick(tmp_path, restore_num_threads):
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_losses.py")
    spec = importlib.util.spec_from_file_location("bench_losses", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "losses"
    rc = bench.main(["--shapes", "64x80,3x1000", "--dtypes", "float32,bfloat16", "--impls", "xent,eager",
                     "--repeats", "2", "--warmup", "0", "--budget", "0", "--malloc", "default",
                     "--out", str(out)])  # --malloc default: leave this (pytest's) process's allocator alone
    assert rc == 0, "xent failed the benchmark's accuracy rules"
    data = json.loads((out / "results.json").read_text())
    assert len(data["correctness"]) == len(data["results"]) == len(bench.LOSSES) * 2 * 2
    for entry in data["results"]:
        assert set(entry["median_ms"]) == {"xent", "eager", bench.FLOOR} and not entry["errors"]
    assert "| loss | shape | dtype |" in (out / "results.md").read_text()
    assert "eager / floor" in (out / "results.md").read_text()
