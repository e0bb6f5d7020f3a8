"""Tests of xent.softmax_focal_loss and xent.nn.SoftmaxFocalLoss.

Loss and gradients (logits, and probability targets) are compared by the parity check of
tests/harness/parity.py with the float64 reference of tests/reference_focal.py (PyTorch ops: log_softmax,
expm1, pow, gather; float64 autograd for the gradients). Inputs are generated in the tested dtype and
upcast, so the float64 results are the exact answers for the values xent sees. gamma = 0 must equal
xent.cross_entropy bit for bit. The shared tests (opcheck, compile, gradcheck, determinism, bad inputs,
warp schedules) are ``TestSoftmaxFocalLoss``'s, from tests/harness/tester.py.

Error model (``SoftmaxFocalLoss``): xent computes log p_c = x_c - lse with lse rounded to the
accumulation dtype, as cross-entropy does, so every log p carries an absolute error of a few units of
roundoff of |lse| + |x_c| (``Tolerance.CANCELLATION_ULPS``: the cancellation that no implementation in
that precision avoids; PyTorch's float32 cross-entropy has it too). A term a_c f(p_c) moves by a_c |h_c|
times that error (h = df/dlog p), plus a relative error of a few ulp from exp, expm1, log and pow
(``Tolerance.FOCAL_TERM_ULPS``); 16-bit results add their rounding to the dtype.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import xent
from harness.parity import LossSpec, check_parity
from harness.tester import BadInput, CompileCase, LossTester, ModuleCase
from harness.tolerance import (
    BF16, DTYPES, F16, F32, F64, LOW, Bound, Tolerance, acc_roundoff, dtype_id,
)
from inputs import (
    fixed_rng, keep_first_target, make_logits, make_prob_target, make_target, make_weight, positions_of, shape_id,
)
from reference_focal import softmax_focal_loss_reference

REDUCTIONS = ["none", "mean", "sum"]


def make_index_target(shape, C, ignore_index=None):
    """Class indices for logits of `shape`; a quarter of them ignore_index when one is given."""
    if ignore_index is None:
        return make_target(positions_of(shape), C)
    return make_target(positions_of(shape), C, ignore_index=ignore_index, ignored=0.25)


# ================================================================================================
# The error model.


def _h_of_logp(logp, gamma):
    """h = p f'(p) = (1 - p)^(gamma - 1) (gamma p log p - (1 - p)) as a function of log p, float64; its
    limit at p == 1 (0 for gamma > 0, -1 for gamma == 0)."""
    p = logp.exp()
    om = -torch.expm1(logp)
    if gamma == 0:
        return -torch.ones_like(logp) + 0 * logp
    at_one = om == 0
    safe = torch.where(at_one, torch.ones_like(om), om)
    h = safe ** (gamma - 1) * (gamma * p * logp - om)
    return torch.where(at_one, torch.zeros_like(h), h)


def _terms64(x, target, weight, ignore_index, eps, gamma):
    """Per-class a_c, f_c, |h_c|, |dh_c / dlog p_c|, p_c in float64 (N, C, *) and the keep mask (N, *),
    for the tolerances."""
    x = x.double()
    C = x.shape[1]
    logp = torch.log_softmax(x, 1).detach().requires_grad_()
    with torch.enable_grad():
        h = _h_of_logp(logp, gamma)
        (dh,) = torch.autograd.grad(h.sum(), logp)
    logp = logp.detach()
    h = h.detach()
    p = logp.exp()
    om = -torch.expm1(logp)
    dh = torch.where(om == 0, torch.zeros_like(dh), dh)  # exactly the limit there (checked tightly)
    w = torch.ones(C, dtype=F64) if weight is None else weight.double()
    wc = w.reshape([1, C] + [1] * (x.dim() - 2))
    if target.is_floating_point():
        q = (1 - eps) * target.double() + eps / C
        keep = torch.ones(x.shape[:1] + x.shape[2:], dtype=torch.bool)
    else:
        keep = target != ignore_index
        safe = torch.where(keep, target, torch.zeros_like(target)).long()
        q = (1 - eps) * F.one_hot(safe, C).double().movedim(-1, 1) + eps / C
        q = q * keep.unsqueeze(1)
    a = wc * q
    f = torch.where(om == 0, torch.zeros_like(om), om**gamma) * (-logp) if gamma != 0 else -logp
    return a, f, h.abs(), dh.abs(), p, keep


def loss_tolerance(x, target, weight, ignore_index, eps, gamma, reduction, dtype):
    """Absolute tolerance per loss entry (reduction 'none') or of the reduced loss."""
    u = acc_roundoff(dtype)
    x64 = x.double()
    a, f, h, _, _, keep = _terms64(x64, target, weight, ignore_index, eps, gamma)
    lse = torch.logsumexp(x64, 1, keepdim=True)
    dlogp = Tolerance.CANCELLATION_ULPS * u * (lse.abs() + x64.abs() + 1)
    C = x.shape[1]
    # Each term's error, plus the sum over the classes (C u sum |terms|, the recursive sum bound).
    per_position = (a * (h * dlogp + Tolerance.FOCAL_TERM_ULPS * u * f)).sum(1) + C * u * (a * f).sum(1)
    if reduction == "none":
        return per_position
    # Summation over the positions (xent's and the reference's, in different orders): the classic bound
    # n u sum |loss_p| of a recursive sum, in the accumulation dtype.
    losses = softmax_focal_loss_reference(x64, target, weight, ignore_index, "none", eps, gamma).detach().abs()
    total = per_position.sum() + per_position.numel() * u * losses.sum()
    if reduction == "mean":
        if target.is_floating_point():
            total = total / max(per_position.numel(), 1)
        else:
            w = torch.ones(x.shape[1], dtype=F64) if weight is None else weight.double()
            safe = torch.where(keep, target, torch.zeros_like(target)).long()
            total = total / (w[safe] * keep).sum().clamp_min(1e-300)
    return total


def grad_tolerance(x, target, weight, ignore_index, eps, gamma, reduction, dtype, grad_out, expected_grad):
    """Tolerance of d loss / d logits, from the same model: each gradient entry s (a_j h_j - p_j H) moves
    by s times the errors of h (|dh/dlog p| times the log p error, plus the term roundoff) and of p (the
    log p error and its own roundoff)."""
    u = acc_roundoff(dtype)
    x64 = x.double()
    a, f, h, dh_dlogp, p, keep = _terms64(x64, target, weight, ignore_index, eps, gamma)
    lse = torch.logsumexp(x64, 1, keepdim=True)
    logp = torch.log_softmax(x64, 1)
    dlogp = Tolerance.CANCELLATION_ULPS * u * (lse.abs() + x64.abs() + 1)
    dh = dh_dlogp * dlogp + Tolerance.FOCAL_TERM_ULPS * u * h
    dp = p * (dlogp + Tolerance.FOCAL_TERM_ULPS * u * (1 + logp.abs()))
    H = (a * h).sum(1, keepdim=True)
    dH = (a * dh).sum(1, keepdim=True) + x.shape[1] * u * (a * h).sum(1, keepdim=True)
    per_entry = a * dh + dp * H + p * dH
    # The upstream scale of every position.
    if reduction == "none":
        s = grad_out.double().abs().unsqueeze(1)
    else:
        s = torch.as_tensor(abs(float(grad_out)), dtype=F64)
        if reduction == "mean":
            if target.is_floating_point():
                s = s / max(x.numel() // max(x.shape[1], 1), 1)
            else:
                w = torch.ones(x.shape[1], dtype=F64) if weight is None else weight.double()
                safe = torch.where(keep, target, torch.zeros_like(target)).long()
                s = s / (w[safe] * keep).sum().clamp_min(1e-300)
    # The scale s itself: the mean's denominator is a sum over the positions (n u relative, the recursive
    # sum bound), and s and the entry are products of a few rounded factors.
    scale_ulps = Tolerance.FOCAL_TERM_ULPS + (keep.numel() if reduction == "mean" else 0)
    return s * per_entry + scale_ulps * u * expected_grad.detach().abs()


def _cross_entropy_ignoring_gamma(*args, gamma=None, **kwargs):
    """F.cross_entropy with softmax_focal_loss's arguments: PyTorch's errors are those xent raises."""
    return F.cross_entropy(*args, **kwargs)


class SoftmaxFocalLoss(LossSpec):
    name = "softmax_focal_loss"
    api = staticmethod(xent.softmax_focal_loss)
    torch_api = staticmethod(_cross_entropy_ignoring_gamma)

    def expected(self, x, target, weight=None, **options):
        return {"reference": softmax_focal_loss_reference(x, target, weight, **options)}

    @staticmethod
    def _args(p):
        o = p.options
        return (p.input, p.target, p.operands[0], o.get("ignore_index", -100), o.get("label_smoothing", 0.0),
                o.get("gamma", 2.0), o.get("reduction", "mean"), p.dtype)

    @staticmethod
    def _rounding(dtype):
        """16-bit results: one rounding of the float32 result to the output dtype."""
        return Bound.rounding(dtype, Tolerance.LOW_ROUNDING_UNITS) if dtype in LOW else Bound()

    def loss_bound(self, p, against):
        atol = p.memo("loss tolerance", lambda: loss_tolerance(*self._args(p)))
        return Bound(0.0, atol) + self._rounding(p.dtype)

    def grad_bound(self, p, i, against, grad_output, grads):
        x, target, weight, ignore_index, eps, gamma, reduction, dtype = self._args(p)
        if i == 0:
            atol = grad_tolerance(x, target, weight, ignore_index, eps, gamma, reduction, dtype, grad_output,
                                  grads[against][0])
        else:
            # dL/dt_c = s (1 - eps) w_c f(p_c): the loss terms' model with a = s (1 - eps) w.
            _, f, h, _, _, _ = _terms64(x, target, weight, ignore_index, eps, gamma)
            x64 = x.double()
            dlogp = Tolerance.CANCELLATION_ULPS * acc_roundoff(dtype) * (
                torch.logsumexp(x64, 1, keepdim=True).abs() + x64.abs() + 1)
            scale = grads[against][1].abs() / f.clamp_min(1e-300)  # s (1 - eps) w_c
            atol = scale * (h * dlogp + Tolerance.FOCAL_TERM_ULPS * acc_roundoff(dtype) * f)
        return Bound(0.0, atol) + self._rounding(dtype)

    def unit_gradient_first(self, p, backend):
        # The fused path: a class-index mean/sum differentiated on the CPU (probability targets have none).
        return (p.dtype in LOW and not p.target.is_floating_point() and p.options.get("reduction") != "none"
                and backend.name == "cpu")


FOCAL = SoftmaxFocalLoss()


def check(backend, x, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, gamma=2.0,
          target_grad=False, layout="contiguous"):
    """The parity check of xent.softmax_focal_loss (tests/harness/parity.py); a probability target takes
    the logits' layout."""
    return check_parity(FOCAL, backend, x, target, weight, layout=layout, target_layout=layout,
                        target_grad=target_grad, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, gamma=gamma)


# ================================================================================================
# Parity grid.

SHAPES = [
    (0, 5),
    (1, 1),
    (7, 2),
    (7, 3),
    (1000, 3),
    (7, 1000),
    (1000, 1000),
    (1, 32000),
    (3, 32000),
    (4, 3, 5),  # K-dim: lanes layout
    (2, 1000, 3),
    (3, 5, 2, 7),
    (0, 4, 3),
]
OPTIONS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "ignore": dict(ignore_index=1),
    "weight_ignore_smooth": dict(weight=True, ignore_index=0, label_smoothing=0.1),
    "smooth": dict(label_smoothing=0.2),
    "prob": dict(prob=True),
    "prob_weight_smooth": dict(prob=True, weight=True, label_smoothing=0.15),
}
GAMMA_OF = {"plain": 2.0, "weight": 0.5, "ignore": 5.0, "weight_ignore_smooth": 1.0, "smooth": 2.0, "prob": 1.5,
            "prob_weight_smooth": 2.0}


def options_inputs(shape, dtype, name):
    """(logits, target, weight, options) of the OPTIONS entry `name` (options without gamma)."""
    opts = OPTIONS[name]
    C = shape[1]
    x = make_logits(shape, dtype)
    if opts.get("prob"):
        target = make_prob_target(shape, dtype)
    else:
        target = make_index_target(shape, C, opts.get("ignore_index"))
    weight = make_weight(C, dtype) if opts.get("weight") else None
    return x, target, weight, dict(ignore_index=opts.get("ignore_index", -100),
                                   label_smoothing=opts.get("label_smoothing", 0.0))


def run_options(backend, shape, dtype, name, gamma=None, reductions=REDUCTIONS, layout="contiguous"):
    x, target, weight, options = options_inputs(shape, dtype, name)
    for reduction in reductions:
        check(backend, x, target, weight, reduction=reduction, gamma=GAMMA_OF[name] if gamma is None else gamma,
              target_grad=target.is_floating_point() and dtype == F64, layout=layout, **options)


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_parity(backend, shape, dtype, options):
    if shape[0] * shape[1] >= 1_000_000 and options not in ("plain", "weight_ignore_smooth", "prob"):
        pytest.skip("large shapes run the three main paths (index, index with every option, probabilities)")
    run_options(backend, shape, dtype, options)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0, 0.25, 3.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("options", ["plain", "weight_ignore_smooth", "prob_weight_smooth"])
def test_gammas(backend, gamma, dtype, options):
    for shape in [(37, 80), (5, 3, 9)]:
        run_options(backend, shape, dtype, options, gamma=gamma)


def test_reference_matches_definition():
    """The reference against a direct, unfused transcription of the formula (one-hot q, pow, log)."""
    x = torch.randn(6, 5, dtype=F64) * 2
    t = torch.tensor([0, 4, 2, 2, 1, 3])
    w = make_weight(5, F64)
    for eps, gamma in [(0.0, 2.0), (0.1, 0.5), (0.3, 3.0)]:
        p = torch.softmax(x, 1)
        q = (1 - eps) * F.one_hot(t, 5).double() + eps / 5
        direct = -(w * q * (1 - p) ** gamma * torch.log(p)).sum(1)
        got = softmax_focal_loss_reference(x, t, w, reduction="none", label_smoothing=eps, gamma=gamma)
        torch.testing.assert_close(got, direct, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(softmax_focal_loss_reference(x, t, w, reduction="mean", label_smoothing=eps,
                                                                gamma=gamma), direct.sum() / w[t].sum())
    # gamma = 0 is PyTorch's cross-entropy, with weight, smoothing and probability targets.
    for eps in (0.0, 0.2):
        torch.testing.assert_close(softmax_focal_loss_reference(x, t, w, label_smoothing=eps, gamma=0.0),
                                   F.cross_entropy(x, t, w, label_smoothing=eps))
        tp = torch.softmax(torch.randn(6, 5, dtype=F64), 1)
        torch.testing.assert_close(softmax_focal_loss_reference(x, tp, w, label_smoothing=eps, gamma=0.0),
                                   F.cross_entropy(x, tp, w, label_smoothing=eps))


# ================================================================================================
# gamma = 0 is xent.cross_entropy, bit for bit.


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=dtype_id)
def test_gamma_zero_is_cross_entropy_bitwise(backend, dtype, options):
    for shape in [(9, 7), (3, 6, 4)]:
        x, target, weight, kw = options_inputs(shape, dtype, options)
        for reduction in REDUCTIONS:
            outs = []
            for fn, extra in ((xent.softmax_focal_loss, {"gamma": 0.0}), (xent.cross_entropy, {})):
                xl = backend.put(x).requires_grad_()
                with backend.active():
                    loss = fn(xl, backend.put(target), backend.put(weight), reduction=reduction, **kw, **extra)
                    (g,) = torch.autograd.grad(loss, xl, torch.ones_like(loss))
                outs.append((loss, g))
            (a, ga), (b, gb) = outs
            assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())
            assert torch.equal(ga, gb)
    # An integer 0 too.
    x = make_logits((4, 3), F32)
    t = make_index_target((4, 3), 3)
    assert torch.equal(xent.softmax_focal_loss(x, t, gamma=0), xent.cross_entropy(x, t))


# ================================================================================================
# Layouts (tests/inputs.py): storage offset 1, class stride 2, transposed / channels-last, rows 2 apart.

LAYOUT_CASES = [
    (shape, layout)
    for layouts in (("misaligned",) * 3, ("class_sliced",) * 3, ("transposed", "channels_last", "channels_last"),
                    ("batch_sliced",) * 3)
    for shape, layout in zip([(9, 37), (3, 5, 4), (2, 7, 3, 2)], layouts)
]


@pytest.mark.parametrize("options", ["plain", "weight_ignore_smooth", "prob_weight_smooth"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("shape,layout", LAYOUT_CASES, ids=shape_id)
def test_layouts(backend, shape, layout, options, dtype):
    """Logits (and probability targets) in each layout; the gradient has the strides the fake kernel
    promises (checked by the parity check)."""
    run_options(backend, shape, dtype, options, reductions=["none", "mean"], layout=layout)


def _empty_allocations(fn):
    """How many aten::empty* calls fn makes (the profiler records the aten ops an xent op calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.name.startswith("aten::empty") for event in prof.events())


@pytest.mark.parametrize("op", ["fwd", "fwd_grad"])
@pytest.mark.parametrize("reduction", [0, 1])
def test_no_spatial_positions_take_cross_entropys_plan(op, reduction):
    """Logits with no spatial positions, (N, C, 0) with a class stride other than 1, fit the lanes layout as
    they are. The CPU layout plan is one for both softmax losses, so softmax focal copies them no more than
    cross-entropy does (it used to make a contiguous copy: one more allocation)."""
    if op == "fwd_grad" and reduction == 0:
        pytest.skip("the fused op takes mean or sum")
    x = torch.randn(2, 7, 3)[..., :0]
    t = torch.zeros(2, 0, dtype=torch.long)
    ce = getattr(torch.ops.xent, f"cross_entropy_{op}")
    focal = getattr(torch.ops.xent, f"softmax_focal_loss_{op}")
    assert _empty_allocations(lambda: focal(x, t, None, gamma=2.0, reduction=reduction)) == _empty_allocations(
        lambda: ce(x, t, None, reduction=reduction)
    )


def test_unbatched_input(cpu_backend):
    x = make_logits((7,), F32)
    for t in (torch.tensor(3), torch.tensor([3])):
        loss = xent.softmax_focal_loss(x, t, reduction="none")
        expected = softmax_focal_loss_reference(x, t.reshape(()), reduction="none")
        assert loss.shape == ()
        # float32 against the float64 reference: the project's 1e-6 relative loss target.
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)
    tp = make_prob_target((7,), F32)
    torch.testing.assert_close(xent.softmax_focal_loss(x, tp, gamma=1.0).double(),
                               softmax_focal_loss_reference(x, tp, gamma=1.0), rtol=1e-6, atol=1e-7)


# ================================================================================================
# Numerics: confident predictions (p near 1), the p == 1 limit, extreme logits, all ignored.


@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_confident_predictions(cpu_backend, dtype, gamma):
    """Confident predictions, p_y near 1 (margins 2..40), where the loss is tiny, (1 - p)^(gamma + 1):
    within the error model of ``check``, i.e. limited only by the absolute error of log p = x - lse (the
    log-sum-exp shared with cross-entropy), not by 1 - p (computed as -expm1(log p))."""
    margins = torch.tensor([2.0, 5.0, 8.0, 12.0, 16.0, 20.0, 30.0, 40.0], dtype=F64)
    C = 4
    for target_logit in (0.0, 10.0):
        x = target_logit - margins.unsqueeze(1).repeat(1, C)
        x[:, 2] = target_logit
        t = torch.full((len(margins),), 2)
        for eps in (0.0, 0.05):
            check(cpu_backend, x.to(dtype), t, reduction="none", gamma=gamma, label_smoothing=eps)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_probability_one_limit(cpu_backend, gamma):
    """p_y rounds to exactly 1: loss 0 and a finite gradient (the h limit, not 0 * inf)."""
    x = torch.tensor([[0.0, 200.0, 0.0], [-300.0, 300.0, -300.0]])
    t = torch.tensor([1, 1])
    xl = x.clone().requires_grad_()
    for eps in (0.0, 0.1):
        loss = xent.softmax_focal_loss(xl, t, gamma=gamma, reduction="sum", label_smoothing=eps)
        (g,) = torch.autograd.grad(loss, xl)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        if eps == 0:
            assert loss.item() == 0 and torch.equal(g, torch.zeros_like(g))


def test_all_ignored_mean_is_nan(backend):
    x = backend.put(make_logits((4, 5), F32)).requires_grad_()
    t = backend.put(torch.full((4,), -100))
    with backend.active():
        loss = xent.softmax_focal_loss(x, t)
        assert torch.isnan(loss)
        (g,) = torch.autograd.grad(xent.softmax_focal_loss(x, t, reduction="sum"), x)
    assert torch.equal(g.cpu(), torch.zeros(4, 5))


def test_nan_logit_propagates(cpu_backend):
    x = make_logits((3, 5), F32)
    x[1, 2] = float("nan")
    t = torch.tensor([0, 1, 2])
    loss = xent.softmax_focal_loss(x, t, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


# ================================================================================================
# Instruction sets.


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_isa_parity(isa, cpu_backend, dtype):
    """Every instruction set's kernels: vector bodies, tails, both layouts, integer and fractional gamma."""
    for shape in [(37, 80), (3, 1001), (5, 3), (3, 7, 19)]:
        for options in ("plain", "weight_ignore_smooth", "prob_weight_smooth"):
            for gamma in (2.0, 0.7):
                run_options(cpu_backend, shape, dtype, options, gamma=gamma, reductions=["none", "sum"])


# ================================================================================================
# Probability targets over many classes; an unbatched input.


@pytest.mark.parametrize("targets", ["uniform", "softmax"])
@pytest.mark.parametrize("shape", [(2, 5000, 64), (256, 5000)], ids=["lanes", "rows"])
def test_float32_probability_targets_over_many_classes(backend, targets, shape):
    """Probability targets over 5000 classes: each position's sums over the classes must not drift (the
    lanes layout as one running float sum put the loss 2e-5 off on the CPU; the kernels add blocks of
    classes into doubles). Bound: four ulps of the float32 result, as cross-entropy's
    (tests/test_cross_entropy.py, test_float32_probability_targets_over_many_classes)."""
    with fixed_rng(7):
        x64 = torch.randn(*shape, dtype=torch.float64) * 2
        t64 = torch.full_like(x64, 1 / 5000) if targets == "uniform" else torch.softmax(torch.randn_like(x64) * 3, 1)
    x, t = x64.float(), t64.float()
    exact = softmax_focal_loss_reference(x.double(), t.double(), gamma=2.0).item()
    with backend.active():
        ours = xent.softmax_focal_loss(x.to(backend.device), t.to(backend.device), gamma=2.0).item()
    bound = abs(exact) * 2**-21
    assert abs(ours - exact) <= bound, f"loss error {abs(ours - exact):.3e} > {bound:.3e} (loss {exact:.4f})"


def test_unbatched_input_with_a_longer_target_raises_value_error():
    """A (C) input is one position: a (k) class target with k != 1 is a batch-size mismatch, ValueError as
    in F.cross_entropy (found by a fuzzer)."""
    with pytest.raises(ValueError, match="batch_size"):
        xent.softmax_focal_loss(torch.randn(5), torch.tensor([0, 1]))


# ================================================================================================
# Bad inputs.


def test_bad_gamma():
    x, t = make_logits((3, 4), F32), torch.tensor([0, 1, 2])
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gamma"):
            xent.softmax_focal_loss(x, t, gamma=bad)
        with pytest.raises(ValueError, match="gamma"):
            torch.ops.xent.softmax_focal_loss_fwd(x, t, gamma=bad)
    with pytest.raises(ValueError, match="gamma"):
        xent.nn.SoftmaxFocalLoss(gamma=-1.0)
    with pytest.raises(TypeError, match="gamma"):
        xent.softmax_focal_loss(x, t, gamma=torch.tensor(2.0))


def test_ops_check_their_arguments():
    ops = torch.ops.xent
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="reduction"):
        ops.softmax_focal_loss_fwd(x, t, reduction=3)
    with pytest.raises(RuntimeError, match="lse"):
        ops.softmax_focal_loss_bwd(torch.tensor(1.0), x, t, None, torch.zeros(2))
    with pytest.raises(RuntimeError, match="probability targets"):
        ops.softmax_focal_loss_prob_fwd(x, torch.rand(3, 5))
    with pytest.raises(RuntimeError, match="dtype"):
        ops.softmax_focal_loss_prob_fwd(x, torch.rand(3, 4, dtype=F64))


def test_deprecated_size_average_reduce():
    x, t = make_logits((5, 4), F32), make_index_target((5, 4), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(xent.softmax_focal_loss(x, t, size_average=False),
                                   xent.softmax_focal_loss(x, t, reduction="sum"))
        torch.testing.assert_close(xent.softmax_focal_loss(x, t, reduce=False),
                                   xent.softmax_focal_loss(x, t, reduction="none"))


# ================================================================================================
# The shared tests (tests/harness/tester.py).

def _opcheck_samples(ns):
    ops = getattr(torch.ops, ns)
    samples = []
    for dtype in (F64, F32):
        for shape, reduction, eps, weighted, gamma in [
            ((4, 5), 1, 0.0, False, 2.0),
            ((4, 5), 0, 0.1, True, 0.5),
            ((2, 3, 4), 2, 0.0, True, 3.0),
            ((2, 3, 4), 1, 0.2, False, 1.0),
        ]:
            x = make_logits(shape, dtype)
            if len(shape) == 2:
                x = x.t().contiguous().t()  # a transposed layout as well
            x.requires_grad_()
            w = make_weight(shape[1], dtype) if weighted else None
            t = keep_first_target(make_index_target(shape, shape[1], ignore_index=3), 3)
            kw = dict(gamma=gamma, reduction=reduction, ignore_index=3, label_smoothing=eps)
            samples.append((ops.softmax_focal_loss_fwd, (x, t, w), kw))
            loss, lse = ops.softmax_focal_loss_fwd(x.detach(), t, w, **kw)
            g = torch.randn(loss.shape, dtype=dtype).requires_grad_()
            samples.append((ops.softmax_focal_loss_bwd, (g, x, t, w, lse), kw))
            tp = make_prob_target(shape, dtype).requires_grad_()
            kwp = dict(gamma=gamma, reduction=reduction, label_smoothing=eps)
            samples.append((ops.softmax_focal_loss_prob_fwd, (x, tp, w), kwp))
            loss, lse = ops.softmax_focal_loss_prob_fwd(x.detach(), tp.detach(), w, **kwp)
            g = torch.randn(loss.shape, dtype=dtype).requires_grad_()
            samples.append((ops.softmax_focal_loss_prob_bwd, (g, x, tp, w, lse), kwp))
    return samples



def _compile_case(compiler, options):
    opts = OPTIONS[options]
    prob = bool(opts.get("prob"))

    def fn(x, t, w):
        return xent.softmax_focal_loss(x * 1.5, t, w, ignore_index=opts.get("ignore_index", -100),
                                       label_smoothing=opts.get("label_smoothing", 0.0), gamma=2.0)

    def make_args(N):
        shape = (N, 11, 3)
        x = make_logits(shape, F32)
        t = make_prob_target(shape, F32) if prob else make_index_target(shape, 11, opts.get("ignore_index"))
        return x, t, make_weight(11, F32)

    # Same xent kernels in both; the PyTorch ops around them (target gradient, scaling) may be fused by
    # inductor in another order: float32 ulps, far below 1e-6.
    return CompileCase(compiler, fn, make_args, differentiate=(0, 1) if prob else (0,), sizes=(6, 13),
                       loss_tolerance=(1e-6, 0.0), grad_tolerance=(1e-6, 1e-8))


GRADCHECK_CASES = [
    ((4, 5), dict(reduction="mean", gamma=2.0)),
    ((4, 5), dict(reduction="none", gamma=0.5, weight=True, label_smoothing=0.1, ignore_index=2)),
    ((3, 4, 2), dict(reduction="sum", gamma=1.0, weight=True)),
    ((3, 4, 2), dict(reduction="mean", gamma=3.0, label_smoothing=0.2)),
    ((4, 5), dict(reduction="mean", gamma=2.0, prob=True)),
    ((3, 4, 2), dict(reduction="none", gamma=1.5, prob=True, weight=True, label_smoothing=0.1)),
]


def _determinism_run(backend, shape, dtype, options):
    torch.manual_seed(1)
    x, t, w, kw = options_inputs(shape, dtype, options)
    x, t, w = backend.put(x).requires_grad_(), backend.put(t), backend.put(w)
    outs = []
    with backend.active():
        for reduction in ("none", "mean"):
            loss = xent.softmax_focal_loss(x, t, w, reduction=reduction, gamma=2.0, **kw)
            (g,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
            outs += [loss.detach().cpu(), g.cpu()]
    return outs


# softmax_focal_loss's errors are F.cross_entropy's for the same arguments, whose words they name.
def _module_cases():
    """xent.nn.SoftmaxFocalLoss with gamma = 0 is torch.nn.CrossEntropyLoss (the weight: "w")."""
    w = make_weight(5, F64)
    cases = {}
    for arg in ({}, {"weight": "w"}, {"weight": "w", "ignore_index": 1, "reduction": "sum", "label_smoothing": 0.1},
                {"reduction": "none", "label_smoothing": 0.2}):
        kw = {k: (w if v == "w" else v) for k, v in arg.items()}

        def inputs(ignore_index=kw.get("ignore_index")):
            return make_logits((6, 5, 2), F64), make_index_target((6, 5, 2), 5, ignore_index)

        cases[f"gamma0-{arg}"] = ModuleCase("SoftmaxFocalLoss", kw, inputs, torch_name="CrossEntropyLoss",
                                            xent_kwargs={"gamma": 0.0})
    return cases


with fixed_rng(0):
    MODULE_CASES = _module_cases()
    BAD_INPUTS = {
        "target_out_of_range": BadInput((torch.randn(3, 4), torch.tensor([0, 4, 1])), words=("out of bounds",)),
        "negative_target": BadInput((torch.randn(3, 4), torch.tensor([0, -1, 1])), words=("out of bounds",)),
        "batch_mismatch": BadInput((torch.randn(3, 4), torch.tensor([0, 1])), words=("batch_size",)),
        "weight_size": BadInput((torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.ones(3)),
                                words=("weight tensor should be defined",)),
        "smoothing": BadInput((torch.randn(3, 4), torch.tensor([0, 1, 2])), {"label_smoothing": 1.5},
                              words=("label_smoothing",)),
        "reduction": BadInput((torch.randn(3, 4), torch.tensor([0, 1, 2])), {"reduction": "avg"},
                              words=("not a valid value for reduction",)),
        "float_target_wrong_shape": BadInput((torch.randn(3, 4), torch.rand(3, 5)), words=("class-index targets",)),
        "int_prob_target": BadInput((torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long)), words=("floating point",)),
        "prob_ignore_index": BadInput((torch.randn(3, 4), torch.rand(3, 4)), {"ignore_index": 1},
                                      words=("ignore_index is not supported",)),
        "int_logits": BadInput((torch.ones(3, 4, dtype=torch.long), torch.tensor([0, 1, 2])), words=("logits",)),
        "zero_dim": BadInput((torch.tensor(1.0), torch.tensor(0)), words=("dimensions",)),
        "weight_requires_grad": BadInput((torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.ones(4, requires_grad=True)),
                                         words=("class weight",)),
    }


class TestSoftmaxFocalLoss(LossTester):
    spec = FOCAL
    OPS = ("softmax_focal_loss_fwd", "softmax_focal_loss_bwd", "softmax_focal_loss_prob_fwd",
           "softmax_focal_loss_prob_bwd")
    COMPILE_CASES = {f"{options}-{compiler}": _compile_case(compiler, options)
                     for options in ("weight_ignore_smooth", "prob_weight_smooth")
                     for compiler in ("aot_eager", "inductor")}
    GRADCHECK_CASES = {f"{shape}-{opts}": (shape, opts) for shape, opts in GRADCHECK_CASES}
    DETERMINISM_CASES = {
        "rows_f32": ((300, 1000), F32, "weight_ignore_smooth"),
        "rows_plain_bf16": ((4096, 80), BF16, "plain"),
        "rows_prob": ((200, 333), F32, "prob_weight_smooth"),
        "lanes_f32": ((8, 21, 500), F32, "weight_ignore_smooth"),
        "lanes_plain": ((8, 21, 500), F32, "plain"),
        "long_rows": ((3, 50000), F32, "smooth"),
    }
    BAD_INPUTS = BAD_INPUTS
    EMPTY_TARGETS = {"index": lambda x: torch.zeros(0, 2, dtype=torch.long),
                     "prob": lambda x: torch.zeros(0, 3, 4)[..., ::2]}
    MODULE_CASES = MODULE_CASES
    # Parity under every warp schedule: rows (one-pass and with smoothing), long rows, lanes, probabilities.
    SCHEDULE_CASES = {
        "rows_plain": ((1000, 80), F32, "plain"),
        "rows_options_bf16": ((37, 1000), BF16, "weight_ignore_smooth"),
        "long_rows": ((3, 32000), F32, "smooth"),
        "lanes": ((3, 17, 5, 7), F32, "weight_ignore_smooth"),
        "prob_rows": ((7, 1003), F32, "prob_weight_smooth"),
        "prob_lanes_f16": ((3, 17, 5, 7), F16, "prob"),
    }

    @classmethod
    def opcheck_samples(cls, ns):
        return _opcheck_samples(ns)

    def gradcheck_problem(self, case, backend):
        shape, opts = case
        opts = dict(opts)
        prob = opts.pop("prob", False)
        weighted = opts.pop("weight", False)
        x = backend.put(make_logits(shape, F64, scale=1.5)).requires_grad_()
        w = backend.put(make_weight(shape[1], F64)) if weighted else None
        if prob:
            t = backend.put(make_prob_target(shape, F64)).requires_grad_()
            return (lambda x, t: xent.softmax_focal_loss(x, t, w, **opts)), (x, t)
        t = backend.put(make_index_target(shape, shape[1], opts.get("ignore_index")))
        return (lambda x: xent.softmax_focal_loss(x, t, w, **opts)), (x,)

    def determinism_run(self, backend, case, kernels_only=False):
        return _determinism_run(backend, *case)

    def run_schedule_case(self, backend, case):
        shape, dtype, options = case
        run_options(backend, shape, dtype, options, reductions=["none", "mean"])


# ================================================================================================
# The module.


def test_module():
    w = make_weight(5, F32)
    m = xent.nn.SoftmaxFocalLoss(weight=w, ignore_index=1, reduction="sum", label_smoothing=0.1, gamma=1.5)
    assert set(dict(m.named_buffers())) == {"weight"}
    assert "gamma=1.5" in repr(m)
    x, t = make_logits((6, 5), F32), make_index_target((6, 5), 5, ignore_index=1)
    assert torch.equal(m(x, t), xent.softmax_focal_loss(x, t, w, ignore_index=1, reduction="sum",
                                                        label_smoothing=0.1, gamma=1.5))
    # (gamma = 0 is CrossEntropyLoss, state_dict included: TestSoftmaxFocalLoss.test_module_matches_torch.)
    m64 = m.double()
    assert m64.weight.dtype == F64
    # Works inside a model, with its parameters' gradient.
    model = torch.nn.Linear(8, 5)
    loss = xent.nn.SoftmaxFocalLoss()(model(torch.randn(3, 8)), torch.tensor([0, 4, 2]))
    loss.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
