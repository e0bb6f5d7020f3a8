"""Parity suite of xent.cross_entropy / xent.nn.CrossEntropyLoss against PyTorch.

Every parity check (tests/harness/parity.py) compares xent's loss and gradients with two float64
computations on the same input values: torch.nn.functional.cross_entropy in float64, and the independent
reference of tests/reference.py. Inputs are generated in the tested dtype first and then upcast, so the
float64 results are the exact answers for the values xent sees. The shared tests (opcheck, compile,
gradcheck, determinism, bad inputs, warp schedules) are ``TestCrossEntropy``'s, from
tests/harness/tester.py.

Error model (``CrossEntropy``, from the pieces of tests/harness/tolerance.py):
* float64: 1e-12 relative, float32: loss 1e-6 relative (the project's target), gradient 1e-5 of its
  largest entry; plus the cancellation of the terms the loss is a difference of (see ``loss_scale``).
* bfloat16 / float16: xent's error must be at most twice PyTorch's own error in that dtype, plus half
  an ulp of the dtype (the rounding of the result itself). Never a loose fixed tolerance.
"""

import gc
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn import _reduction as _Reduction

import xent
from harness.parity import LossSpec, check_parity, leaf
from harness.tester import BadInput, CompileCase, LossTester, ModuleCase
from harness.tolerance import (
    BF16, DTYPES, F16, F32, F64, LOW, Bound, accumulation_dtype, assert_within, dtype_id, max_finite,
    pytorch_parity_bound,
)
from inputs import (
    ALL_LAYOUTS, CLASS_LAYOUT_CASES, fixed_rng, keep_first_target, make_logits, make_prob_target, make_target,
    make_weight, positions_of, shape_id,
)
from reference import cross_entropy_reference

REDUCTIONS = ["none", "mean", "sum"]


# ================================================================================================
# The loss and its error model.


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


def loss_bound(dtype, scale, expected=None, torch_result=None):
    """The cross-entropy loss's Bound in `dtype` (tests/harness/tolerance.py, pytorch_parity_bound), plus
    the cancellation of terms of size `scale` (see loss_scale) rounded in the accumulation dtype (16-bit:
    its max, with the max-norm error)."""
    cancellation = Bound.cancellation(scale, accumulation_dtype(dtype))
    return pytorch_parity_bound(dtype, expected, torch_result, extra=cancellation, low_extra=cancellation.max_atol())


def grad_bound(dtype, expected, torch_result=None, term_scale=0.0):
    """A gradient's Bound: relative to the entry and to the gradient's largest entry, or to the magnitude
    of its terms (`term_scale` from grad_scale()) where those cancel to ~0; 16-bit, PyTorch's own error
    plus the float32 rounding of the cancelling terms."""
    magnitude = max(max_finite(expected.abs()), term_scale)
    return pytorch_parity_bound(dtype, expected, torch_result, grad=True, magnitude=magnitude,
                                low_extra=Bound.cancellation(term_scale, F32))


def _torch_target(t):
    """PyTorch takes int64 class indices (uint8 only in some paths: not K-dim, not with label smoothing;
    int32 never): it gets the same values as int64."""
    return t if t.is_floating_point() else t.long()


def _reference_options(options):
    """The reference's options: size_average / reduce turned into the reduction they stand for."""
    options = dict(options)
    size_average, reduce = options.pop("size_average", None), options.pop("reduce", None)
    if size_average is not None or reduce is not None:
        options["reduction"] = _Reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    return options


class CrossEntropy(LossSpec):
    name = "cross_entropy"
    api = staticmethod(xent.cross_entropy)
    torch_api = staticmethod(F.cross_entropy)

    def expected(self, x, target, weight=None, **options):
        return {"F.cross_entropy float64": F.cross_entropy(x, _torch_target(target), weight, **options),
                "reference": cross_entropy_reference(x, target, weight, **_reference_options(options))}

    def torch_in_dtype(self, x, target, weight=None, **options):
        return F.cross_entropy(x, _torch_target(target), weight, **options)

    @staticmethod
    def _scales(p):
        o = _reference_options(p.options)
        return dict(ignore_index=o.get("ignore_index", -100), label_smoothing=o.get("label_smoothing", 0.0),
                    reduction=o.get("reduction", "mean"))

    def loss_bound(self, p, against):
        w64 = None if p.operands[0] is None else p.operands[0].double()
        scale = p.memo("scale", lambda: loss_scale(p.input.double(), p.target, w64, **self._scales(p)))
        return loss_bound(p.dtype, scale, p.expected[against], p.torch_loss)

    def grad_bound(self, p, i, against, grad_output, grads):
        term_scale = 0.0
        if i == 0:
            w64 = None if p.operands[0] is None else p.operands[0].double()
            term_scale = grad_scale(p.input.double(), p.target, w64, grad_output.double(), **self._scales(p))
        torch_grad = None if p.torch_grads is None else p.torch_grads[i]
        return grad_bound(p.dtype, grads[against][i], torch_grad, term_scale)


CE = CrossEntropy()


def check_cross_entropy(backend, x, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                        size_average=None, reduce=None, layout="contiguous", target_layout="contiguous",
                        grad_output="random", target_grad=False):
    """The parity check of xent.cross_entropy (tests/harness/parity.py): loss, gradient(s), dtype, shape
    and strides against PyTorch in float64 and the float64 reference. size_average / reduce, where given,
    are passed instead of `reduction` (they override it, as in PyTorch)."""
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing)
    if size_average is not None or reduce is not None:
        options.update(size_average=size_average, reduce=reduce)
    else:
        options.update(reduction=reduction)
    return check_parity(CE, backend, x, target, weight, layout=layout, target_layout=target_layout,
                        grad_output=grad_output, target_grad=target_grad, **options)


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
        x1, x2 = leaf(x, True), leaf(x, True)
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
@pytest.mark.parametrize("shape", SHAPES_2D, ids=shape_id)
def test_shapes(backend, shape, dtype, reduction):
    N, C = shape
    x = make_logits(shape, dtype)
    check_cross_entropy(backend, x, make_target((N,), C), reduction=reduction)


KDIM_SHAPES = [(3, 5, 4), (2, 7, 3, 4), (2, 3, 1), (1, 4, 1, 1), (2, 5, 0), (0, 5, 3, 2), (2, 1000, 9), (4, 3, 33, 17)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", KDIM_SHAPES, ids=shape_id)
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
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4)], ids=shape_id)
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
@pytest.mark.parametrize("shape", [(7, 32000), (2, 50257)], ids=shape_id)
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
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (5, 200)], ids=shape_id)
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
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (2, 3, 2, 3)], ids=shape_id)
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
    "shape", [(0, 5), (1, 1), (1000, 3), (2, 50257), (7, 1000), (0, 4, 3)], ids=shape_id
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

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=dtype_id)
@pytest.mark.parametrize("shape,layout", CLASS_LAYOUT_CASES, ids=shape_id)
def test_layouts(backend, shape, layout, dtype, reduction):
    """Non-contiguous, dense-permuted, broadcast and misaligned logits (tests/inputs.py), with every option
    on; the gradient has the strides the fake kernel promises (checked by the parity check)."""
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
        ((2, 5, 3, 4), "permuted", "last_dim_sliced"),
        ((3, 5, 4), "channels_last", "channels_last"),
    ],
    ids=shape_id,
)
def test_prob_target_layouts(backend, shape, layout, target_layout, dtype, reduction):
    x = make_logits(shape, dtype)
    target = make_prob_target(shape, dtype)
    check_cross_entropy(backend, x, target, make_weight(shape[1], dtype), reduction=reduction,
                        label_smoothing=0.1, layout=layout, target_layout=target_layout, target_grad=True)


@pytest.mark.parametrize("grad_output", ["expanded", "expanded_row", "ones"])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (2, 5, 3, 4)], ids=shape_id)
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
        x64 = leaf(x.double(), True)
        ref = F.cross_entropy(x64, target, reduction="sum", label_smoothing=0.1)
        (g64,) = torch.autograd.grad(ref, x64)
        scale = loss_scale(x64, target, None, ignore_index=-100, label_smoothing=0.1, reduction="sum")
        assert_within(loss, ref, loss_bound(dtype, scale), what="expanded logits loss")
        assert_within(g, g64, grad_bound(dtype, g64), what="expanded logits grad")
        assert g.is_contiguous(), f"gradient of expanded logits should be contiguous, strides {g.stride()}"


# ================================================================================================
# The project's float32 accuracy target, without the cancellation allowance.


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(7, 3), (1000, 1000), (7, 32000), (2, 50257), (4, 16, 9, 9)],
                         ids=shape_id)
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


@pytest.mark.parametrize("targets", ["uniform", "softmax"])
@pytest.mark.parametrize("shape", [(2, 5000, 64), (256, 5000)], ids=["lanes", "rows"])
def test_float32_probability_targets_over_many_classes(backend, targets, shape):
    """Probability targets over 5000 classes: each position's sums over the classes (sum w q, sum w q x,
    sum exp) must not drift. In the lanes layout ((N, C, S), spatial stride 1) as one running float sum of
    5000 equal-sized terms, cross-entropy's loss was off by 6e-4 (eager: 1e-7) on the CPU and in the CUDA
    kernels (emulated) (softmax focal's by 2e-5 on the CPU: tests/test_softmax_focal_loss.py); in the CPU
    rows layout each vector lane's sum of 5000 / 16 terms put it 1.3e-5 off (twelve ulps). The kernels add blocks of classes into doubles.
    Bound: four ulps of the float32 result (the CUDA kernels finish each position in float, lse = m +
    log(s) and then lse * sum(w q) - sum(w q x), and take the mean with a float tree: 2.5 ulps seen), or
    twice eager's error when that is larger."""
    with fixed_rng(7):
        x64 = torch.randn(*shape, dtype=torch.float64) * 2
        t64 = torch.full_like(x64, 1 / 5000) if targets == "uniform" else torch.softmax(torch.randn_like(x64) * 3, 1)
    x, t = x64.float(), t64.float()
    exact = F.cross_entropy(x.double(), t.double()).item()
    eager_err = abs(F.cross_entropy(x, t).item() - exact)
    with backend.active():
        ours = xent.cross_entropy(x.to(backend.device), t.to(backend.device)).item()
    bound = max(2 * eager_err, abs(exact) * 2**-21)
    assert abs(ours - exact) <= bound, f"loss error {abs(ours - exact):.3e} > {bound:.3e} (loss {exact:.4f})"


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
            assert_within(loss, exact, loss_bound(dtype, scale, exact, low),
                          what=f"special logits {values[:3]} target {t} pad {C_pad}")


@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
def test_neg_inf_non_target_gradient(backend, dtype):
    """-inf non-target logits (masked vocabularies) give finite gradients, 0 at the masked classes."""
    x = make_logits((6, 40), dtype)
    x[:, ::3] = -math.inf
    target = torch.tensor([1, 2, 4, 5, 7, 8])
    check_cross_entropy(backend, x, target, reduction="mean")
    check_cross_entropy(backend, x, target, reduction="none")


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
    with pytest.raises(ValueError, match="batch_size"):
        xent.cross_entropy(x, t)


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
# The shared tests (tests/harness/tester.py).

def _opcheck_samples(ns):
    ops = getattr(torch.ops, ns)
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



def _compile_case(case):
    """fn(x, t, w) and its inputs for a batch size; x * 2 and its backward (a multiply by 2) are exact, so
    compiled and eager feed the kernels identical values."""
    kw = {
        "index": dict(label_smoothing=0.1, ignore_index=1),
        "prob_kdim": dict(label_smoothing=0.1, reduction="sum"),
        "index_kdim_none": dict(reduction="none", label_smoothing=0.2),
        "index_sum_weight": dict(reduction="sum", ignore_index=-100),
        "prob_smoothing": dict(reduction="mean", label_smoothing=0.3),
        "prob_target_grad": dict(reduction="mean", label_smoothing=0.3),
        "unbatched": dict(reduction="none", label_smoothing=0.1),
    }[case]
    scale = 2.0 if case in ("index", "prob_kdim") else 1.0

    def fn(x, t, w):
        return xent.cross_entropy(x * scale, t, w, **kw)

    def make_args(N):
        if case == "index":
            return make_logits((N, 11), F32), make_target((N,), 11), make_weight(11, F32)
        if case == "prob_kdim":
            return make_logits((N, 11, 3, 2), F32), make_prob_target((N, 11, 3, 2), F32), make_weight(11, F32)
        if case == "index_kdim_none":
            return make_logits((N, 4, 3, 2), F32), make_target((N, 3, 2), 4, ignored=0.2), None
        if case == "index_sum_weight":
            return make_logits((N, 6), F64), make_target((N,), 6, ignored=0.2).to(torch.int32), make_weight(6, F64)
        if case in ("prob_smoothing", "prob_target_grad"):
            return make_logits((N, 6, 2), F32), make_prob_target((N, 6, 2), F32), make_weight(6, F32)
        return make_logits((N + 2,), F32), make_target((), N + 2), None

    compiler = "inductor" if case in ("index", "prob_kdim") else "aot_eager"
    sizes = (6, 13) if compiler == "inductor" else (5, 9)
    return f"{case}-{compiler}", CompileCase(compiler, fn, make_args, sizes=sizes,
                                             differentiate=(0, 1) if case == "prob_target_grad" else (0,))


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



GRADCHECK_PROB_CASES = [
    ((4, 5), dict(reduction="mean")),
    ((4, 5), dict(reduction="sum", label_smoothing=0.2, weighted=True)),
    ((4, 5), dict(reduction="none", label_smoothing=0.1)),
    ((3, 4, 2), dict(reduction="mean", weighted=True, label_smoothing=0.3)),
    ((2, 3, 2, 2), dict(reduction="none", weighted=True)),
    ((5,), dict(reduction="sum", label_smoothing=0.1)),
]



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
        xd = ALL_LAYOUTS["transposed"](xd)
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


def _bad_inputs():
    cases = _bad_input_cases()
    return {name: BadInput(args, kwargs, tuple(words), INTENDED_ERRORS.get(name)) for name, (args, kwargs, words)
            in cases.items()}


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


# Where xent deliberately refuses what PyTorch 2.14 accepts (README, "Where xent deliberately differs"):
# it raises RuntimeError naming the problem.
INTENDED_ERRORS = {
    "label_smoothing_negative": "label smoothing outside [0, 1] is an error (PyTorch treats a negative value as 0)",
    "weight_wrong_dtype_prob_target": "weight must have the logits' dtype (PyTorch promotes with probability targets)",
    "prob_target_wrong_dtype": "probability targets must have the logits' dtype (PyTorch promotes)",
}



def _module_cases():
    """xent.nn.CrossEntropyLoss's arguments (the weight: "w"), with class-index and probability targets."""
    w = make_weight(5, F64)
    arguments = [
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
    cases = {}
    for kind in ("index", "prob"):
        for arg in arguments:
            kw = {k: (w if v == "w" else v) for k, v in arg.items()}
            if kind == "prob" and kw.get("ignore_index", -100) >= 0:
                kw["ignore_index"] = -100  # PyTorch rejects ignore_index >= 0 with probability targets

            def inputs(kind=kind, ignore_index=kw.get("ignore_index", -100)):
                x = make_logits((6, 5, 2), F64)
                if kind == "prob":
                    return x, make_prob_target((6, 5, 2), F64)
                return x, make_target((6, 2), 5, ignored=0.3, ignore_index=ignore_index)

            cases[f"{kind}-{arg}"] = ModuleCase("CrossEntropyLoss", kw, inputs)
    return cases


with fixed_rng(0):  # built at import, before the per-test seed: the same values every run
    BAD_INPUTS = _bad_inputs()
    MODULE_CASES = _module_cases()


class TestCrossEntropy(LossTester):
    spec = CE
    OPS = ("cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_prob_fwd", "cross_entropy_prob_bwd")
    COMPILE_CASES = dict(_compile_case(case) for case in ("index", "prob_kdim", "index_kdim_none", "index_sum_weight",
                                                          "prob_smoothing", "prob_target_grad", "unbatched"))
    GRADCHECK_CASES = {f"{kind}-{shape}-{opts}": (kind, shape, opts)
                       for kind, cases in (("index", GRADCHECK_INDEX_CASES), ("prob", GRADCHECK_PROB_CASES))
                       for shape, opts in cases}
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
    BAD_INPUTS = BAD_INPUTS
    EMPTY_TARGETS = {"index": lambda x: torch.zeros(0, 2, dtype=torch.long),
                     "prob": lambda x: torch.zeros(0, 3, 4)[..., ::2]}
    MODULE_CASES = MODULE_CASES
    # A subset reaching every kernel path of the CUDA kernels.
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

    @classmethod
    def opcheck_samples(cls, ns):
        return _opcheck_samples(ns)

    def gradcheck_problem(self, case, backend):
        kind, shape, opts = case
        if kind == "index":
            x, t, w, kw = _gradcheck_index_inputs(shape, opts)
            td, wd = backend.put(t), backend.put(w)
            return (lambda x: xent.cross_entropy(x, td, wd, **kw)), (backend.put(x).requires_grad_(),)
        opts = dict(opts)
        weighted = opts.pop("weighted", False)
        C = shape[0] if len(shape) == 1 else shape[1]
        x = backend.put(make_logits(shape, F64, scale=1.0)).requires_grad_()
        t = backend.put(make_prob_target(shape, F64)).requires_grad_()
        w = backend.put(make_weight(C, F64)) if weighted else None
        return (lambda x, t: xent.cross_entropy(x, t, w, **opts)), (x, t)

    def determinism_run(self, backend, case, kernels_only=False):
        return _determinism_run(backend, *case)

    def run_schedule_case(self, backend, case):
        shape, dtype, kind, layout, opts = case
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
        check_cross_entropy(backend, x, target, w, layout=layout, target_grad=kind == "prob", **opts)


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
# xent.nn.CrossEntropyLoss.

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
