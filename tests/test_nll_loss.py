"""Parity suite of xent.nll_loss (ops nll_loss_fwd / nll_loss_bwd) against torch.nn.functional.nll_loss.

Every parity check runs on each backend of tests/conftest.py (the CPU kernels, the CUDA kernels under the
SIMT emulator with four warp schedules, and the real CUDA kernels when a GPU exists) and compares xent's
loss and gradient with F.nll_loss computed in float64 on the same input values (inputs are generated in
the tested dtype first and then upcast, so the float64 results are the exact answers for what xent sees).

Tolerances. A per-position loss is -w_t * x_t and a gradient entry -w_t * s_p: one product in the
accumulation dtype, rounded to the output dtype, so both are exact up to those two roundings (relative
``ROUNDINGS`` units of roundoff). Reduced losses add the rounding of each summed term to the accumulation
dtype and the roundings of the double sum over P terms (worst case P units), both relative to the sum of
the terms' magnitudes. The mean's gradient also divides by total_weight as saved in the input's dtype (as
PyTorch does), one more rounding. No loose fixed tolerance anywhere.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import xent
from conftest import EMULATED_SCHEDULES, make_backend
from bitwise import assert_bitwise
from inputs import fixed_rng, keep_first_target, layouts, make_target, make_weight

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [F32, F64, BF16, F16]
REDUCTIONS = ["none", "mean", "sum"]
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}
UNIT_ROUNDOFF = {F64: 2.0**-53, F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11}


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def shape_id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def acc_roundoff(dtype):
    return UNIT_ROUNDOFF[F64] if dtype == F64 else UNIT_ROUNDOFF[F32]


def ops_of(backend):
    return torch.ops.xent_emulated if backend.emulated else torch.ops.xent


# ================================================================================================
# Inputs.


def make_input(shape, dtype, scale=3.0):
    """Log-probabilities in `dtype`: log_softmax over the class dim of scaled normal logits."""
    z = torch.randn(shape, dtype=F64) * scale
    return torch.log_softmax(z, dim=1 if len(shape) > 1 else 0).to(dtype)


def positions_of(shape):
    return (shape[0],) + tuple(shape[2:]) if len(shape) > 1 else ()


LAYOUTS = layouts(
    "contiguous",
    "transposed",
    "class_sliced",
    "batch_sliced",
    "spatial_sliced",
    "channels_last",
    "permuted",
    "spatial_reversed",
    "misaligned",
    "expanded",
)


# ================================================================================================
# Comparison.

# Roundings of a per-position value: the product in the accumulation dtype and the output's own.
ROUNDINGS = 2.0


def assert_within(actual, expected, *, rtol, atol=0.0, what):
    """|actual - expected| <= rtol |expected| + atol elementwise, NaN and infinities at the same places."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN pattern differs: xent {a}, expected {e}"
    inf = torch.isinf(e)
    assert torch.equal(a[inf], e[inf]), f"{what}: infinities differ: xent {a[inf]}, expected {e[inf]}"
    finite = torch.isfinite(e)
    err = (a - e).abs()
    tol = rtol * e.abs() + atol
    bad = finite & ~(err <= tol)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {int(finite.sum())} entries out of tolerance; first at {list(i)}: "
            f"xent {a[i].item()!r} expected {e[i].item()!r} |err| {err[i].item():.3e} > tol {tol[i].item():.3e}"
        )


def reference(x, target, weight, *, reduction, ignore_index, grad_output):
    """F.nll_loss in float64 on x's values: (loss, gradient w.r.t. x, sum of |w_t x_t| over kept targets,
    sum of w_t over kept targets)."""
    x64 = x.detach().double().cpu().contiguous().requires_grad_(True)
    t = target.cpu().long()
    w64 = None if weight is None else weight.double().cpu()
    loss = F.nll_loss(x64, t, w64, ignore_index=ignore_index, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, x64, grad_output.double().cpu())
    terms = F.nll_loss(x64.detach(), t, w64, ignore_index=ignore_index, reduction="none")
    C = x64.shape[1] if x64.dim() > 1 else x64.shape[0]
    keep = t != ignore_index
    w_t = (torch.ones(C, dtype=F64) if w64 is None else w64)[torch.where(keep, t, torch.zeros_like(t))]
    return loss.detach(), grad, terms.abs().sum(), (w_t * keep.double()).sum()


def check_nll(backend, x, target, weight=None, *, reduction="mean", ignore_index=-100, layout="contiguous",
              grad_output="random"):
    """xent.nll_loss on `backend` against the float64 reference: loss (value, dtype, shape), gradient
    (value and the strides the fake kernel promises). x, target, weight: contiguous CPU tensors."""
    dtype = x.dtype
    u, ua = UNIT_ROUNDOFF[dtype], acc_roundoff(dtype)
    # Rounding into the subnormal range is absolute: half the subnormal spacing (float16 reaches it at 6e-5).
    sub = ROUNDINGS * torch.finfo(dtype).smallest_normal * u
    xd = LAYOUTS[layout](backend.put(x)).requires_grad_(True)
    xv = xd.detach().cpu()  # the values xent sees (an expanded layout repeats a row)
    td, wd = backend.put(target), backend.put(weight)
    with backend.active():
        loss = xent.nll_loss(xd, td, wd, reduction=reduction, ignore_index=ignore_index)
    if grad_output == "random" and reduction == "none":
        go = torch.randn(loss.shape, dtype=F64).to(dtype)
    elif grad_output == "random":
        go = (torch.rand((), dtype=F64) + 0.5).to(dtype)
    elif grad_output == "expanded":
        go = torch.randn((), dtype=F64).to(dtype).expand(loss.shape)
    elif grad_output == "transposed":
        go = torch.randn(tuple(reversed(loss.shape)), dtype=F64).to(dtype).permute(*reversed(range(loss.dim())))
    else:
        raise ValueError(grad_output)
    god = go.to(loss.device)
    with backend.active():
        (grad,) = torch.autograd.grad(loss, xd, god)
    e_loss, e_grad, abs_sum, total_weight = reference(
        xv, target, weight, reduction=reduction, ignore_index=ignore_index, grad_output=go
    )
    what = f"[{backend.name}, {tuple(x.shape)}, {dtype_id(dtype)}, {layout}, reduction={reduction}]"
    assert loss.dtype == dtype and loss.device == xd.device, f"loss{what}: {loss.dtype} on {loss.device}"
    if reduction == "none":
        assert_within(loss, e_loss, rtol=ROUNDINGS * u, atol=sub, what=f"loss{what}")
    else:
        # Each term rounded to the accumulation dtype (ua) and up to P roundings of the double sum.
        den = total_weight.item() if reduction == "mean" else 1.0
        P = target.numel()
        atol = (ua + P * UNIT_ROUNDOFF[F64]) * abs_sum.item() / den if den else 0.0
        assert_within(loss, e_loss, rtol=ROUNDINGS * u, atol=atol + sub, what=f"loss{what}")
    expected_strides = torch.empty_like(xd, memory_format=torch.preserve_format).stride()
    if xd.numel():
        assert grad.stride() == expected_strides, f"grad{what}: strides {grad.stride()} != {expected_strides}"
    assert grad.dtype == dtype
    # Mean: grad_loss / total_weight, total_weight a double sum of P weights (up to P roundings, relative:
    # the weights are positive) saved in the input's dtype (one more rounding).
    rtol = ROUNDINGS * u + ((u + target.numel() * UNIT_ROUNDOFF[F64]) if reduction == "mean" else 0.0)
    assert_within(grad, e_grad, rtol=rtol, atol=sub, what=f"grad{what}")
    return loss, grad


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
    loss, total_weight = ops_of(backend).nll_loss_fwd(backend.put(x), backend.put(t), reduction=REDUCTION_CODE[reduction])
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


LAYOUT_CASES = [
    ((7, 5), "transposed"),
    ((300, 37), "transposed"),
    ((7, 5), "class_sliced"),
    ((7, 5), "batch_sliced"),
    ((7, 5), "misaligned"),
    ((301, 33), "misaligned"),
    ((7, 5), "expanded"),
    ((3, 5, 4), "channels_last"),
    ((2, 5, 3, 4), "channels_last"),
    ((2, 5, 3, 4), "permuted"),
    ((3, 5, 4), "spatial_sliced"),
    ((2, 5, 3, 4), "spatial_sliced"),
    ((2, 5, 3, 37), "misaligned"),
    ((2, 5, 3, 4), "spatial_reversed"),
    ((2, 3, 2, 3, 2, 3), "spatial_reversed"),  # 5 position dims that do not merge: the kernels' fallback
    ((2, 3, 2, 3, 2, 3), "class_sliced"),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("shape,layout", LAYOUT_CASES, ids=shape_id)
def test_layouts(backend, shape, layout, dtype, reduction):
    """Non-contiguous, dense-permuted, broadcast and misaligned inputs; the gradient has the strides the
    fake kernel promises (checked in check_nll)."""
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
    ops = ops_of(backend)
    shape = (2000, 9)
    x = make_input(shape, dtype)
    t = make_target((shape[0],), shape[1], ignored=0.25)
    w = make_weight(shape[1], dtype)
    loss, total_weight = ops.nll_loss_fwd(backend.put(x), backend.put(t), backend.put(w), reduction=REDUCTION_CODE[reduction])
    assert total_weight.dtype == dtype and total_weight.dim() == 0 and total_weight.device == backend.device
    keep = t != -100
    expected = (w.double()[torch.where(keep, t, 0)] * keep.double()).sum()
    assert_within(total_weight, expected, rtol=UNIT_ROUNDOFF[dtype] + 64 * acc_roundoff(dtype), what="total_weight")
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
    ops, cpu = ops_of(backend), torch.ops.xent
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
        assert_within(loss, loss_c, rtol=rtol, what="reduced loss vs the CPU op")
    assert_within(tw, tw_c, rtol=rtol, what="total_weight vs the CPU op")
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
    ops, cpu = ops_of(backend), torch.ops.xent
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


# ================================================================================================
# Bad inputs.


def _bad_input_cases():
    x = make_input((4, 5), F32)
    t = make_target((4,), 5)
    meta = torch.device("meta")
    return {
        "batch_mismatch": ((x, make_target((3,), 5)), {}, ["batch_size"]),
        "kdim_target_shape": ((make_input((2, 5, 3), F32), make_target((2, 4), 5)), {}, ["size", "shape"]),
        "float_target": ((x, t.float()), {}, ["dtype", "type", "float"]),
        "weight_wrong_size": ((x, t), {"weight": torch.ones(4)}, ["weight"]),
        "weight_2d": ((x, t), {"weight": torch.ones(5, 1)}, ["weight"]),
        "invalid_reduction": ((x, t), {"reduction": "avg"}, ["reduction", "avg"]),
        "zero_dim_input": ((torch.tensor(1.0), torch.tensor(0)), {}, ["dim"]),
        "unbatched_with_batched_target": ((make_input((5,), F32), make_target((3,), 5)), {}, ["batch", "size", "dim"]),
        "integer_input": ((torch.zeros(4, 5, dtype=torch.long), t), {}, ["long", "dtype", "implemented"]),
        "target_on_other_device": ((x, t.to(meta)), {}, ["device"]),
        "weight_on_other_device": ((x, t), {"weight": torch.ones(5, device=meta)}, ["device"]),
        "negative_ignore_index_match": ((x, torch.tensor([0, -1, 3, 2])), {"ignore_index": -1}, []),
        "zero_classes_all_ignored": ((torch.zeros(3, 0), torch.full((3,), -100)), {"reduction": "sum"}, []),
    }


BAD_INPUT_CASES = _bad_input_cases()


# Known differences from PyTorch: strict xfails, so that a fix shows up as XPASS and the mark is removed.
KNOWN_DIFFERENCES = {}


@pytest.mark.parametrize("backend_name", ["cpu", "emulated_cuda-forward-0"])
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(reason=KNOWN_DIFFERENCES[c], strict=True)) if c in KNOWN_DIFFERENCES else c
        for c in BAD_INPUT_CASES
    ],
)
def test_bad_inputs(case, backend_name):
    """Whatever PyTorch raises, xent raises the same exception type (or a subclass) with a message naming
    the problem; where PyTorch does not raise, xent returns PyTorch's value."""
    backend = make_backend(backend_name)
    args, kwargs, words = BAD_INPUT_CASES[case]
    try:
        expected = F.nll_loss(*args, **kwargs)
        torch_error = None
    except Exception as e:  # noqa: BLE001
        torch_error = e
    if torch_error is None:
        with backend.active():
            got = xent.nll_loss(*args, **kwargs)
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.device == expected.device
        # Same dtype (float32) on both sides: this checks behaviour (no error, same value), not accuracy.
        torch.testing.assert_close(got, expected, equal_nan=True)
        return
    with pytest.raises(Exception) as info:
        with backend.active():
            xent.nll_loss(*args, **kwargs)
    err = info.value
    assert isinstance(err, type(torch_error)), (
        f"{case}: PyTorch raises {type(torch_error).__name__}({torch_error}); xent raises {type(err).__name__}({err})"
    )
    message = str(err).lower()
    assert any(w in message for w in words), f"{case}: xent's message {str(err)!r} names none of {words}"


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
    ops = ops_of(backend)
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
        ops_of(backend).nll_loss_fwd(x, t)
    with pytest.raises(expected):
        ops_of(backend).nll_loss_bwd(torch.tensor(1.0), x, t, None, torch.tensor(3.0))


# ================================================================================================
# torch.library.opcheck, torch.compile.


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


def _opcheck_params():
    params = []
    for ns in ("xent", "xent_emulated"):
        if ns == "xent_emulated" and not xent.testing.emulated_cuda_available():
            continue
        with fixed_rng(0):  # built at collection, before the per-test seed
            samples = _opcheck_samples(ns)
        for j, (op, args, kwargs) in enumerate(samples):
            params.append(pytest.param(op, args, kwargs, id=f"{ns}-{op._qualified_op_name.split('::')[-1]}-{j}"))
    return params


@pytest.mark.parametrize("op,args,kwargs", _opcheck_params())
def test_opcheck(op, args, kwargs):
    torch.library.opcheck(op, args, kwargs)


def test_opcheck_covers_both_ops():
    names = {op._qualified_op_name for op, _, _ in (p.values for p in _opcheck_params())}
    assert {"xent::nll_loss_fwd", "xent::nll_loss_bwd"} <= names


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("kind", ["2d", "kdim_none"])
def test_compile_fullgraph(compiler, kind):
    """fullgraph=True (no graph break), forward and backward, dynamic=True over two batch sizes compiled
    once; equal to eager xent bitwise (x * 2 and its backward are exact)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)

    def f(x, t, w):
        if kind == "2d":
            return xent.nll_loss(x * 2.0, t, w, ignore_index=1)
        return xent.nll_loss(x * 2.0, t, w, reduction="none")

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    w = make_weight(6, F32)
    frames = []
    for N in (5, 11):
        shape = (N, 6) if kind == "2d" else (N, 6, 3)
        x = make_input(shape, F32)
        t = make_target(positions_of(shape), 6, ignored=0.2, ignore_index=1 if kind == "2d" else -100)
        out = []
        for fn in (compiled, f):
            xl = x.clone().requires_grad_()
            loss = fn(xl, t, w)
            go = torch.linspace(-1.0, 1.0, loss.numel()).view(loss.shape)
            (g,) = torch.autograd.grad(loss, xl, go)
            out.append((loss.detach(), g))
        frames.append(counter.frame_count)
        assert torch.equal(out[0][0], out[1][0]), (out[0][0], out[1][0])
        assert torch.equal(out[0][1], out[1][1])
    assert frames[0] >= 1 and frames[1] == frames[0], f"dynamic=True recompiled for a new batch size: {frames}"


# ================================================================================================
# gradcheck / gradgradcheck in float64.

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


@pytest.mark.parametrize("shape,opts", GRADCHECK_CASES, ids=lambda v: str(v))
def test_gradcheck(backend, shape, opts):
    x, t, w, kw = _gradcheck_inputs(shape, opts)
    xd = backend.put(x).requires_grad_()
    td, wd = backend.put(t), backend.put(w)
    with backend.active():
        assert torch.autograd.gradcheck(lambda x: xent.nll_loss(x, td, wd, **kw), (xd,))
        assert torch.autograd.gradgradcheck(lambda x: xent.nll_loss(x, td, wd, **kw), (xd,))


@pytest.mark.parametrize("shape,opts", GRADCHECK_CASES, ids=lambda v: str(v))
def test_gradgradcheck_through_grad_output(backend, shape, opts):
    """Double backward w.r.t. the upstream gradient as well (grad_loss is an input of the backward op)."""
    x, t, w, kw = _gradcheck_inputs(shape, opts)
    xd = backend.put(x).requires_grad_()
    td, wd = backend.put(t), backend.put(w)
    with backend.active():
        loss = xent.nll_loss(xd.detach(), td, wd, **kw)
    go = torch.randn(loss.shape, dtype=F64).to(xd.device).requires_grad_()

    def first_grad(x, go):
        with backend.active():
            loss = xent.nll_loss(x, td, wd, **kw)
            (g,) = torch.autograd.grad(loss, x, go, create_graph=True)
        return g

    with backend.active():
        assert torch.autograd.gradcheck(first_grad, (xd, go))


# ================================================================================================
# Determinism.

DETERMINISM_CASES = {
    "rows_3000x7_f32": ((3000, 7), F32),
    "rows_5000x3_f64": ((5000, 3), F64),
    "kdim_4x7x33x17_f32": ((4, 7, 33, 17), F32),
    "kdim_2x5x40x30_bf16": ((2, 5, 40, 30), BF16),
}


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


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_deterministic_repeated_runs(backend, case):
    shape, dtype = DETERMINISM_CASES[case]
    first = _determinism_run(backend, shape, dtype)
    for _ in range(2):
        assert_bitwise(first, _determinism_run(backend, shape, dtype), f"{case}: repeated run")


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_deterministic_across_warp_schedules(case):
    """The CUDA kernels (under the emulator) give bitwise identical results under every warp schedule."""
    shape, dtype = DETERMINISM_CASES[case]
    runs = [(f"{s}-{seed}", _determinism_run(make_backend(f"emulated_cuda-{s}-{seed}"), shape, dtype))
            for s, seed in EMULATED_SCHEDULES]
    for name, out in runs[1:]:
        assert_bitwise(runs[0][1], out, f"{case}: schedule {runs[0][0]} vs {name}")


# ================================================================================================
# Memory traffic of the CUDA kernels (SIMT emulator counts).


def _traffic(fn):
    ops = torch.ops.xent_emulated
    ops._simt_traffic()  # reset
    out = fn()
    read, written = ops._simt_traffic()
    return out, read, written


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

    (loss, tw), read, written = _traffic(lambda: ops.nll_loss_fwd(x, t, w, reduction=reduction))
    # Exactly: targets, then per kept position its weight and input element; 2 double partials per block,
    # read back by the finish kernel.
    assert read == P * t.element_size() + kept * (elt + (acc if weighted else 0)) + 16 * blocks, read
    assert written == (P * elt if reduction == 0 else elt) + 16 * blocks + elt, written
    assert read <= PER_POSITION_BYTES * P

    go = torch.randn(loss.shape, dtype=F64).to(dtype)
    grad, read, written = _traffic(lambda: ops.nll_loss_bwd(go, x, t, w, tw, reduction=reduction))
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
        grad, read, written = _traffic(lambda: ops.nll_loss_bwd(torch.tensor(1.0, dtype=dtype), x, t, None,
                                                                  torch.tensor(0.0, dtype=dtype)))
        assert written == x.numel() * x.element_size(), (shape, dtype, written)
        assert (grad == 0).all() and not torch.signbit(grad).any()
