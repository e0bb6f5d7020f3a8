"""Parity suite of xent.nll_loss (ops nll_loss_fwd / nll_loss_bwd) against torch.nn.functional.nll_loss.

Every parity check (tests/harness/parity.py) runs on each backend of tests/conftest.py and compares xent's
loss and gradient with F.nll_loss in float64 and the reference of tests/reference.py on the same input
values. The shared tests (opcheck, compile, gradcheck, determinism, bad inputs, warp schedules) are
``TestNllLoss``'s, from tests/harness/tester.py.

Error model (``NllLoss``). A per-position loss is -w_t * x_t and a gradient entry -w_t * s_p: one product
in the accumulation dtype, rounded to the output dtype, so both are exact up to those two roundings
(``Tolerance.NLL_ROUNDINGS``). Reduced losses add the rounding of each summed term to the accumulation
dtype and the roundings of the double sum over P terms (worst case P units), both relative to the sum of
the terms' magnitudes. The mean's gradient also divides by total_weight as saved in the input's dtype (as
PyTorch does), one more rounding. No loose fixed tolerance anywhere.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import xent
from conftest import simt_traffic
from harness.parity import LossSpec, check_parity
from harness.tester import BadInput, CompileCase, LossTester, ModuleCase
from harness.tolerance import (
    BF16, DTYPES, F16, F32, F64, UNIT_ROUNDOFF, Bound, Tolerance, acc_roundoff, assert_within, dtype_id,
)
from inputs import (
    CLASS_LAYOUT_CASES, fixed_rng, keep_first_target, make_log_probs, make_target, make_weight, positions_of,
    shape_id,
)
from reference import nll_loss_reference

REDUCTIONS = ["none", "mean", "sum"]
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}


# ================================================================================================
# The loss and its error model.


class NllLoss(LossSpec):
    name = "nll_loss"
    api = staticmethod(xent.nll_loss)
    torch_api = staticmethod(F.nll_loss)

    def expected(self, x, target, weight=None, *, reduction="mean", ignore_index=-100):
        return {
            "F.nll_loss float64": F.nll_loss(x, target.long(), weight, ignore_index=ignore_index, reduction=reduction),
            "reference": nll_loss_reference(x, target, weight, ignore_index=ignore_index, reduction=reduction),
        }

    @staticmethod
    def _sums(p):
        """(sum of |w_t x_t|, sum of w_t) over the kept targets: the reduced loss's terms, the mean's
        denominator."""
        x, t = p.input.double(), p.target.long()
        w = None if p.operands[0] is None else p.operands[0].double()
        ignore_index = p.options.get("ignore_index", -100)
        terms = F.nll_loss(x, t, w, ignore_index=ignore_index, reduction="none")
        C = x.shape[1] if x.dim() > 1 else x.shape[0]
        keep = t != ignore_index
        w_t = (torch.ones(C, dtype=F64) if w is None else w)[torch.where(keep, t, torch.zeros_like(t))]
        return terms.abs().sum().item(), (w_t * keep.double()).sum().item()

    def loss_bound(self, p, against):
        bound = Bound.rounding(p.dtype, Tolerance.NLL_ROUNDINGS)
        reduction = p.options.get("reduction", "mean")
        if reduction == "none":
            return bound
        abs_sum, total_weight = p.memo("sums", lambda: self._sums(p))
        den = total_weight if reduction == "mean" else 1.0
        if not den:
            return bound
        # Each term rounded to the accumulation dtype, and up to P roundings of the double sum.
        return (bound + Bound(0.0, acc_roundoff(p.dtype) * abs_sum / den)
                + Bound.summation(p.target.numel(), abs_sum / den, F64))

    def grad_bound(self, p, i, against, grad_output, grads):
        bound = Bound.rounding(p.dtype, Tolerance.NLL_ROUNDINGS)
        if p.options.get("reduction", "mean") == "mean":
            # grad_loss / total_weight, total_weight a double sum of P weights (up to P roundings, relative:
            # the weights are positive) saved in the input's dtype (one more rounding).
            bound = bound + Bound(UNIT_ROUNDOFF[p.dtype] + p.target.numel() * UNIT_ROUNDOFF[F64])
        return bound


NLL = NllLoss()


def check_nll(backend, x, target, weight=None, *, layout="contiguous", grad_output="random", reduction="mean",
              ignore_index=-100):
    """The parity check of xent.nll_loss (tests/harness/parity.py); returns (loss, gradient)."""
    r = check_parity(NLL, backend, x, target, weight, layout=layout, grad_output=grad_output, reduction=reduction,
                     ignore_index=ignore_index)
    return r.loss, r.grads[0]


def make_input(shape, dtype, scale=3.0):
    return make_log_probs(shape, dtype, scale)


def test_reference_matches_pytorch():
    """tests/reference.py's nll_loss_reference agrees with F.nll_loss in float64 (loss and gradient), so the
    parity checks' two float64 results are interchangeable."""
    for shape in [(7, 5), (3, 5, 4), (5,)]:
        C = shape[1] if len(shape) > 1 else shape[0]
        x = make_input(shape, F64)
        t = make_target(positions_of(shape), C, ignore_index=1, ignored=0.3 if len(shape) > 1 else 0.0)
        for w in (None, make_weight(C, F64)):
            for reduction in REDUCTIONS:
                x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
                a = nll_loss_reference(x1, t, w, ignore_index=1, reduction=reduction)
                b = F.nll_loss(x2, t, w, ignore_index=1, reduction=reduction)
                # Both are float64 with different summation orders: 1e-13 relative.
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, equal_nan=True)
                go = torch.randn(a.shape, dtype=F64)
                torch.testing.assert_close(torch.autograd.grad(a, x1, go)[0], torch.autograd.grad(b, x2, go)[0],
                                           rtol=1e-13, atol=1e-13)


# ================================================================================================
# Parity.

SHAPES = [
    (7, 5),
    (300, 37),
    (3000, 3),  # several forward blocks (1024 positions each)
    (6, 1),  # one class
    (3, 5, 4),
    (2, 5, 3, 4),
    (4, 7, 33, 17),  # several blocks, K-dim
    (5,),  # unbatched
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_shapes(backend, shape, dtype, reduction):
    C = shape[1] if len(shape) > 1 else shape[0]
    x = make_input(shape, dtype)
    t = make_target(positions_of(shape), C, ignored=0.2 if len(shape) > 1 else 0.0)
    check_nll(backend, x, t, make_weight(C, dtype), reduction=reduction)
    check_nll(backend, x, t, None, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
@pytest.mark.parametrize(
    "weight,ignore_index,ignored",
    [
        ("none", -100, 0.0),
        ("weighted", -100, 0.3),
        ("with_zero", -100, 0.3),
        ("weighted", 2, 0.0),  # a valid class as ignore_index: its targets are dropped
        ("weighted", -1, 0.3),
        ("none", 0, 0.0),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("shape", [(50, 6), (3, 6, 5)], ids=shape_id)
def test_options(backend, shape, dtype, weight, ignore_index, ignored, reduction):
    C = shape[1]
    x = make_input(shape, dtype)
    t = make_target(positions_of(shape), C, ignore_index=ignore_index, ignored=ignored)
    w = None if weight == "none" else make_weight(C, dtype, with_zero=weight == "with_zero")
    check_nll(backend, x, t, w, reduction=reduction, ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(6, 4), (2, 4, 3)], ids=shape_id)
def test_all_ignored(backend, shape, dtype, reduction):
    """Every target ignored: mean is 0 / 0 = NaN (as PyTorch), sum 0, per-position losses 0; zero gradient."""
    x = make_input(shape, dtype)
    t = make_target(positions_of(shape), shape[1], ignored=1.0)
    loss, grad = check_nll(backend, x, t, make_weight(shape[1], dtype), reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(loss).item()
    else:
        assert (loss == 0).all()
    assert (grad == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (2, 5, 0)], ids=shape_id)
def test_empty(backend, shape, dtype, reduction):
    """No positions: mean NaN, sum 0, an empty per-position loss and an empty gradient."""
    x = make_input(shape, dtype)
    t = make_target(positions_of(shape), shape[1])
    check_nll(backend, x, t, make_weight(shape[1], dtype), reduction=reduction)
    loss, total_weight = backend.ops.nll_loss_fwd(backend.put(x), backend.put(t), reduction=REDUCTION_CODE[reduction])
    assert total_weight.item() == 0 and total_weight.dtype == dtype and total_weight.dim() == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "target_dtype,ignore_index",
    [(torch.int64, -100), (torch.int32, -100), (torch.int32, 3), (torch.uint8, -100), (torch.uint8, 255)],
    ids=lambda v: str(v).replace("torch.", ""),
)
@pytest.mark.parametrize("shape", [(40, 7), (3, 7, 5, 2)], ids=shape_id)
def test_target_dtypes(backend, shape, target_dtype, ignore_index, reduction):
    C = shape[1]
    x = make_input(shape, F32)
    t = make_target(positions_of(shape), C, ignore_index=ignore_index, ignored=0.2).to(target_dtype)
    if ignore_index == -100:  # not representable in uint8: nothing is ignored
        t = make_target(positions_of(shape), C).to(target_dtype)
    check_nll(backend, x, t, make_weight(C, F32), reduction=reduction, ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("shape,layout", CLASS_LAYOUT_CASES, ids=shape_id)
def test_layouts(backend, shape, layout, dtype, reduction):
    """Non-contiguous, dense-permuted, broadcast and misaligned inputs (tests/inputs.py); the gradient has
    the strides the fake kernel promises (checked by the parity check)."""
    C = shape[1]
    x = make_input(shape, dtype)
    t = make_target(positions_of(shape), C, ignored=0.2)
    check_nll(backend, x, t, make_weight(C, dtype), reduction=reduction, layout=layout)


@pytest.mark.parametrize("grad_output", ["expanded", "transposed"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (2, 5, 3, 4)], ids=shape_id)
def test_grad_output_layouts(backend, shape, dtype, grad_output):
    """reduction='none' with a broadcast (stride-0) or transposed upstream gradient."""
    x = make_input(shape, dtype)
    t = make_target(positions_of(shape), shape[1], ignored=0.2)
    check_nll(backend, x, t, make_weight(shape[1], dtype), reduction="none", grad_output=grad_output)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_special_values(backend, dtype):
    """-inf log-probability at a target: an infinite loss (NaN with weight 0, as PyTorch); NaN or -inf
    at ignored positions or at classes that are not targets: never read."""
    C = 4
    x = make_input((6, C), dtype)
    t = torch.tensor([0, 1, 2, 3, -100, 1])
    x[0, 0] = -math.inf  # target -inf: loss +inf
    x[1, 1] = -math.inf  # weight 0 below: 0 * inf = NaN
    x[4, :] = math.nan  # ignored position
    x[5, 0] = math.nan  # not the target
    w = make_weight(C, dtype)
    w[1] = 0
    for reduction in REDUCTIONS:
        check_nll(backend, x, t, w, reduction=reduction)
        check_nll(backend, x[2:], t[2:], w, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_total_weight_output(backend, dtype, reduction):
    """The forward op's total_weight: a 0-d tensor in the input's dtype, the sum of w_t over kept targets
    (for every reduction, as the CPU op; ATen returns 0 for 'none', which F.nll_loss never exposes)."""
    ops = backend.ops
    shape = (2000, 9)
    x = make_input(shape, dtype)
    t = make_target((shape[0],), shape[1], ignored=0.25)
    w = make_weight(shape[1], dtype)
    loss, total_weight = ops.nll_loss_fwd(backend.put(x), backend.put(t), backend.put(w), reduction=REDUCTION_CODE[reduction])
    assert total_weight.dtype == dtype and total_weight.dim() == 0 and total_weight.device == backend.device
    keep = t != -100
    expected = (w.double()[torch.where(keep, t, 0)] * keep.double()).sum()
    assert_within(total_weight, expected, Bound(UNIT_ROUNDOFF[dtype] + 64 * acc_roundoff(dtype)), what="total_weight")
    unweighted = ops.nll_loss_fwd(backend.put(x), backend.put(t), None, reduction=REDUCTION_CODE[reduction])[1]
    assert unweighted.item() == torch.tensor(float(keep.sum())).to(dtype).item()  # the count, rounded once


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_cpu_op_bitwise(backend, dtype, reduction):
    """The CUDA kernels compute exactly the CPU op's arithmetic: per-position losses and every gradient
    entry are bitwise equal to the CPU op's; the sums (reduced loss, total_weight) run in double on both,
    in another order, so they agree up to the rounding of the result."""
    if backend.name == "cpu":
        pytest.skip("compares the CUDA kernels (emulated or real) with the CPU op")
    ops, cpu = backend.ops, torch.ops.xent
    code = REDUCTION_CODE[reduction]
    shape = (3, 11, 37, 5)
    x = make_input(shape, dtype)
    t = make_target(positions_of(shape), shape[1], ignored=0.2)
    w = make_weight(shape[1], dtype)
    loss, tw = ops.nll_loss_fwd(backend.put(x), backend.put(t), backend.put(w), reduction=code)
    loss_c, tw_c = cpu.nll_loss_fwd(x, t, w, reduction=code)
    if reduction == "none":
        assert torch.equal(loss.cpu(), loss_c)
    # The sums: double sums of P positive terms in two orders (up to P roundings each, relative), then the
    # rounding of the result to the output dtype.
    rtol = 2 * UNIT_ROUNDOFF[dtype] + 2 * t.numel() * UNIT_ROUNDOFF[F64]
    if reduction != "none":
        assert_within(loss, loss_c, Bound(rtol), what="reduced loss vs the CPU op")
    assert_within(tw, tw_c, Bound(rtol), what="total_weight vs the CPU op")
    go = torch.randn(loss_c.shape, dtype=F64).to(dtype)
    # Both backward ops get the CPU op's total_weight: any difference is the backward's own.
    g = ops.nll_loss_bwd(backend.put(go), backend.put(x), backend.put(t), backend.put(w), backend.put(tw_c), reduction=code)
    g_c = cpu.nll_loss_bwd(go, x, t, w, tw_c, reduction=code)
    assert torch.equal(g.cpu(), g_c)
    assert g.stride() == g_c.stride()


@pytest.mark.parametrize("grad_dtype", [F64, F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_op_other_grad_loss_dtype(backend, grad_dtype, reduction):
    """The backward op with grad_loss (and total_weight) in another dtype than the input: as the CPU op,
    which converts a per-position grad_loss to the accumulation dtype and reads the 0-d ones in double."""
    ops, cpu = backend.ops, torch.ops.xent
    code = REDUCTION_CODE[reduction]
    x = make_input((40, 6), F32)
    t = make_target((40,), 6, ignored=0.2)
    w = make_weight(6, F32)
    loss, tw = cpu.nll_loss_fwd(x, t, w, reduction=code)
    go = torch.randn(loss.shape, dtype=F64).to(grad_dtype)
    tw_other = tw.to(grad_dtype)
    g = ops.nll_loss_bwd(backend.put(go), backend.put(x), backend.put(t), backend.put(w), backend.put(tw_other), reduction=code)
    g_c = cpu.nll_loss_bwd(go, x, t, w, tw_other, reduction=code)
    assert torch.equal(g.cpu(), g_c)



OUT_OF_RANGE_CASES = {
    "too_large": (torch.tensor([0, 5, 1, 2]), torch.long, -100),
    "negative": (torch.tensor([0, 1, -3, 2]), torch.long, -100),
    "int32_too_large": (torch.tensor([0, 1, 2, 7]), torch.int32, -100),
    "uint8_too_large": (torch.tensor([0, 1, 200, 2]), torch.uint8, -100),
    "ignore_index_is_not_bounds_exempt": (torch.tensor([0, -100, 1, 2]), torch.long, -1),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE_CASES))
def test_out_of_range_target(backend, case):
    """A target outside [0, C) that is not ignore_index: IndexError from the CPU kernels (as PyTorch's),
    a device-side assert naming it from the CUDA kernels (RuntimeError under the emulator), in the forward
    op and in the backward op."""
    if backend.name == "cuda":
        pytest.skip("a device-side assert leaves the CUDA context unusable for the rest of the session")
    values, tdtype, ignore_index = OUT_OF_RANGE_CASES[case]
    x = backend.put(make_input((4, 5), F32))
    t = backend.put(values.to(tdtype))
    with pytest.raises(IndexError):
        F.nll_loss(x.cpu(), values.long(), ignore_index=ignore_index)
    ops = backend.ops
    expected = IndexError if backend.name == "cpu" else RuntimeError
    match = "out of bounds" if backend.name == "cpu" else "device-side assert.*nll_loss: target out of bounds"
    for reduction in REDUCTIONS:
        with pytest.raises(expected, match=match):
            with backend.active():
                xent.nll_loss(x, t, ignore_index=ignore_index, reduction=reduction)
        code = REDUCTION_CODE[reduction]
        go = torch.ones(4) if code == 0 else torch.tensor(1.0)
        with pytest.raises(expected, match=match):
            ops.nll_loss_bwd(go, x, t, None, torch.tensor(3.0), reduction=code, ignore_index=ignore_index)


def test_out_of_range_target_with_zero_classes(backend):
    """C = 0: every kept target is out of range (the backward checks them although its gradient is empty)."""
    if backend.name == "cuda":
        pytest.skip("a device-side assert leaves the CUDA context unusable for the rest of the session")
    x = backend.put(torch.zeros(3, 0))
    t = backend.put(torch.zeros(3, dtype=torch.long))
    expected = IndexError if backend.name == "cpu" else RuntimeError
    with pytest.raises(expected):
        backend.ops.nll_loss_fwd(x, t)
    with pytest.raises(expected):
        backend.ops.nll_loss_bwd(torch.tensor(1.0), x, t, None, torch.tensor(3.0))


# ================================================================================================
# The shared tests (tests/harness/tester.py).

GRADCHECK_CASES = [
    ((4, 5), dict(reduction="mean")),
    ((4, 5), dict(reduction="sum", weighted=True)),
    ((4, 5), dict(reduction="none", ignore_index=1)),
    ((4, 5), dict(reduction="mean", weighted=True, ignored=0.4)),
    ((3, 4, 2), dict(reduction="mean", weighted=True, ignored=0.3)),
    ((2, 3, 2, 2), dict(reduction="none", weighted=True)),
    ((2, 3, 2, 2), dict(reduction="sum", ignore_index=0)),
    ((5,), dict(reduction="none")),
    ((5,), dict(reduction="mean", weighted=True)),
]


def _gradcheck_inputs(shape, opts):
    opts = dict(opts)
    weighted = opts.pop("weighted", False)
    ignored = opts.pop("ignored", 0.0)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_input(shape, F64, scale=1.0)
    t = make_target(positions_of(shape), C, ignored=ignored, ignore_index=opts.get("ignore_index", -100))
    if ignored:
        t.view(-1)[0] = 0 if opts.get("ignore_index", -100) != 0 else 1  # at least one kept position
    w = make_weight(C, F64) if weighted else None
    return x, t, w, opts


def _compile_case(compiler, kind):
    def fn(x, t, w):
        # x * 2 and its backward are exact: compiled and eager feed the kernels the same values.
        if kind == "2d":
            return xent.nll_loss(x * 2.0, t, w, ignore_index=1)
        return xent.nll_loss(x * 2.0, t, w, reduction="none")

    def make_args(N):
        shape = (N, 6) if kind == "2d" else (N, 6, 3)
        x = make_input(shape, F32)
        t = make_target(positions_of(shape), 6, ignored=0.2, ignore_index=1 if kind == "2d" else -100)
        return x, t, make_weight(6, F32)

    return CompileCase(compiler, fn, make_args, sizes=(5, 11))


def _determinism_run(backend, shape, dtype):
    """Losses (none, mean, sum) and gradients, fresh tensors each call (same values: fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    C = shape[1]
    x = torch.log_softmax(torch.randn(shape, generator=g, dtype=F64) * 3, 1).to(dtype)
    w = (torch.rand(C, generator=g, dtype=F64) + 0.5).to(dtype)
    t = torch.randint(0, C, positions_of(shape), generator=g)
    t[torch.rand(positions_of(shape), generator=g) < 0.1] = -100
    xd = backend.put(x).requires_grad_(True)
    out = []
    with backend.active():
        for reduction in REDUCTIONS:
            loss = xent.nll_loss(xd, backend.put(t), backend.put(w), reduction=reduction)
            go = torch.linspace(-1, 1, loss.numel(), dtype=F64).view(loss.shape).to(dtype).to(loss.device)
            (grad,) = torch.autograd.grad(loss, xd, go)
            out += [loss.detach().cpu(), grad.cpu()]
    return out


def _bad_inputs():
    with fixed_rng(0):
        x = make_input((4, 5), F32)
        t = make_target((4,), 5)
        meta = torch.device("meta")
        return {
            "batch_mismatch": BadInput((x, make_target((3,), 5)), words=("batch_size",)),
            "kdim_target_shape": BadInput((make_input((2, 5, 3), F32), make_target((2, 4), 5)), words=("size", "shape")),
            "float_target": BadInput((x, t.float()), words=("dtype", "type", "float")),
            "weight_wrong_size": BadInput((x, t), {"weight": torch.ones(4)}, words=("weight",)),
            "weight_2d": BadInput((x, t), {"weight": torch.ones(5, 1)}, words=("weight",)),
            "invalid_reduction": BadInput((x, t), {"reduction": "avg"}, words=("reduction", "avg")),
            "zero_dim_input": BadInput((torch.tensor(1.0), torch.tensor(0)), words=("dim",)),
            "unbatched_with_batched_target": BadInput((make_input((5,), F32), make_target((3,), 5)),
                                                      words=("batch", "size", "dim")),
            "integer_input": BadInput((torch.zeros(4, 5, dtype=torch.long), t), words=("long", "dtype", "implemented")),
            "target_on_other_device": BadInput((x, t.to(meta)), words=("device",)),
            "weight_on_other_device": BadInput((x, t), {"weight": torch.ones(5, device=meta)}, words=("device",)),
            "negative_ignore_index_match": BadInput((x, torch.tensor([0, -1, 3, 2])), {"ignore_index": -1}),
            "zero_classes_all_ignored": BadInput((torch.zeros(3, 0), torch.full((3,), -100)), {"reduction": "sum"}),
        }


def _module_cases():
    """xent.nn.NLLLoss's arguments (the weight: "w")."""
    w = make_weight(5, F64)
    cases = {}
    for arg in ({}, {"weight": "w"}, {"ignore_index": 1}, {"reduction": "none"}, {"reduction": "sum"},
                {"weight": "w", "ignore_index": 0, "reduction": "mean"}, {"size_average": False}):
        kw = {k: (w if v == "w" else v) for k, v in arg.items()}

        def inputs(ignore_index=kw.get("ignore_index", -100)):
            return make_input((6, 5, 2), F64), make_target((6, 2), 5, ignored=0.3, ignore_index=ignore_index)

        cases[str(arg)] = ModuleCase("NLLLoss", kw, inputs)
    return cases


with fixed_rng(0):
    MODULE_CASES = _module_cases()


class TestNllLoss(LossTester):
    spec = NLL
    OPS = ("nll_loss_fwd", "nll_loss_bwd")
    COMPILE_CASES = {f"{kind}-{compiler}": _compile_case(compiler, kind)
                     for kind in ("2d", "kdim_none") for compiler in ("aot_eager", "inductor")}
    GRADCHECK_CASES = {f"{shape}-{opts}": (shape, opts) for shape, opts in GRADCHECK_CASES}
    DETERMINISM_CASES = {
        "rows_3000x7_f32": ((3000, 7), F32),
        "rows_5000x3_f64": ((5000, 3), F64),
        "kdim_4x7x33x17_f32": ((4, 7, 33, 17), F32),
        "kdim_2x5x40x30_bf16": ((2, 5, 40, 30), BF16),
    }
    BAD_INPUTS = _bad_inputs()
    EMPTY_TARGETS = {"index": lambda x: torch.zeros(0, 2, dtype=torch.long)}
    MODULE_CASES = MODULE_CASES
    # The CPU ops and the CUDA kernels' host code (emulated) check arguments alike.
    BAD_INPUT_BACKENDS = ("cpu", "emulated_cuda-forward-0")
    # Parity under every warp schedule: rows of several blocks, K-dim lanes, a strided and a fallback
    # layout, all targets ignored.
    SCHEDULE_CASES = {
        "rows_weighted_mean": ((3000, 7), F32, "contiguous", dict(reduction="mean", weighted=True, ignored=0.2)),
        "kdim_none_bf16": ((4, 7, 33, 17), BF16, "contiguous", dict(reduction="none", weighted=True, ignored=0.2)),
        "transposed_sum_f64": ((300, 37), F64, "transposed", dict(reduction="sum", ignored=0.2)),
        "spatial_reversed": ((2, 3, 2, 3, 2, 3), F32, "spatial_reversed", dict(reduction="mean", weighted=True)),
        "all_ignored": ((6, 4), F16, "contiguous", dict(reduction="mean", ignored=1.0)),
    }

    @classmethod
    def opcheck_samples(cls, ns):
        return _opcheck_samples(ns)

    def gradcheck_problem(self, case, backend):
        x, t, w, kw = _gradcheck_inputs(*case)
        td, wd = backend.put(t), backend.put(w)
        return (lambda x: xent.nll_loss(x, td, wd, **kw)), (backend.put(x).requires_grad_(),)

    def determinism_run(self, backend, case, kernels_only=False):
        return _determinism_run(backend, *case)

    def run_schedule_case(self, backend, case):
        shape, dtype, layout, opts = case
        opts = dict(opts)
        C = shape[1]
        x = make_input(shape, dtype)
        t = make_target(positions_of(shape), C, ignored=opts.pop("ignored", 0.0))
        w = make_weight(C, dtype) if opts.pop("weighted", False) else None
        check_nll(backend, x, t, w, layout=layout, **opts)


def _opcheck_samples(ns):
    ops = getattr(torch.ops, ns)
    samples = []

    def add(shape, dtype, weight, kw, tdtype=torch.long):
        C = shape[1]
        x = make_input(shape, dtype).requires_grad_()
        t = make_target(positions_of(shape), C, ignored=0.2, ignore_index=kw.get("ignore_index", -100))
        t = keep_first_target(t, kw.get("ignore_index", -100)).to(tdtype)
        w = make_weight(C, dtype) if weight else None
        samples.append((ops.nll_loss_fwd, (x, t, w), kw))
        loss, tw = ops.nll_loss_fwd(x.detach(), t, w, **kw)
        g = torch.randn(loss.shape, dtype=dtype).requires_grad_()
        samples.append((ops.nll_loss_bwd, (g, x, t, w, tw), kw))

    for dtype in (F32, F64):
        add((4, 5), dtype, False, {})
        add((4, 5), dtype, True, {"reduction": 0, "ignore_index": 2})
        add((2, 5, 3), dtype, True, {"reduction": 2}, torch.int32)
        add((2, 3, 2, 2), dtype, False, {"reduction": 0})
    add((3, 4, 2), BF16, True, {"reduction": 1})
    return samples


# ================================================================================================
# Memory traffic of the CUDA kernels (SIMT emulator counts).


# Bytes per position the kernels may move besides the gradient's zero fill: the target (up to 8), the
# weight w_t (up to 8), the gathered input (up to 8), the loss (reduction none, up to 8), grad_loss (up
# to 8), plus the per-block partials (16 bytes per 1024 positions).
PER_POSITION_BYTES = 40


@pytest.mark.parametrize("tdtype", [torch.int64, torch.uint8], ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=dtype_id)
@pytest.mark.parametrize("shape", [(64, 4096), (3, 257, 8, 8), (1000, 3)], ids=shape_id)
def test_traffic(shape, dtype, reduction, weighted, tdtype):
    """Forward: O(positions) bytes (one gathered element per position), never the N * C input. Backward:
    the gradient written exactly once (the zero fill) plus one element per kept position, and O(positions)
    reads."""
    if not xent.testing.emulated_cuda_available():
        pytest.skip("needs the test-only emulator build (XENT_BUILD_EMULATOR=1)")
    ops = torch.ops.xent_emulated
    C = shape[1]
    x = make_input(shape, dtype)
    t = make_target(positions_of(shape), C, ignored=0.2 if tdtype == torch.int64 else 0.0).to(tdtype)
    w = make_weight(C, dtype) if weighted else None
    P = t.numel()
    kept = int((t.long() != -100).sum())
    elt = x.element_size()
    acc = 8 if dtype == F64 else 4
    blocks = -(-P // 1024)

    (loss, tw), read, written = simt_traffic(lambda: ops.nll_loss_fwd(x, t, w, reduction=reduction))
    # Exactly: targets, then per kept position its weight and input element; 2 double partials per block,
    # read back by the finish kernel.
    assert read == P * t.element_size() + kept * (elt + (acc if weighted else 0)) + 16 * blocks, read
    assert written == (P * elt if reduction == 0 else elt) + 16 * blocks + elt, written
    assert read <= PER_POSITION_BYTES * P

    go = torch.randn(loss.shape, dtype=F64).to(dtype)
    grad, read, written = simt_traffic(lambda: ops.nll_loss_bwd(go, x, t, w, tw, reduction=reduction))
    grad_bytes = x.numel() * elt
    assert written == grad_bytes + kept * elt, (written, grad_bytes)
    assert read <= PER_POSITION_BYTES * P + 16 * blocks, read
    assert read >= P * t.element_size()


def test_traffic_zero_fill_tail():
    """Gradients whose byte size is not a multiple of 16: the zero fill's tail is written exactly once."""
    if not xent.testing.emulated_cuda_available():
        pytest.skip("needs the test-only emulator build (XENT_BUILD_EMULATOR=1)")
    ops = torch.ops.xent_emulated
    for shape, dtype in (((3, 5), BF16), ((1, 1), F16), ((7, 3), F32), ((5, 3), F64), ((1, 7), BF16)):
        x = make_input(shape, dtype)
        t = torch.full((shape[0],), -100)
        grad, read, written = simt_traffic(lambda: ops.nll_loss_bwd(torch.tensor(1.0, dtype=dtype), x, t, None,
                                                                  torch.tensor(0.0, dtype=dtype)))
        assert written == x.numel() * x.element_size(), (shape, dtype, written)
        assert (grad == 0).all() and not torch.signbit(grad).any()
