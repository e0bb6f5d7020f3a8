"""Tests of xent.softmax_focal_loss and xent.nn.SoftmaxFocalLoss.

Loss and gradients (logits, and probability targets) are compared with the float64 reference of
tests/reference_focal.py (PyTorch ops: log_softmax, expm1, pow, gather; float64 autograd for the
gradients). Inputs are generated in the tested dtype and upcast, so the float64 results are the exact
answers for the values xent sees. gamma = 0 must equal xent.cross_entropy bit for bit.

Tolerances (see ``Tol``) follow an error model rather than a fixed relative bound: xent computes
log p_c = x_c - lse with lse rounded to the accumulation dtype, as cross-entropy does, so every log p
carries an absolute error of a few units of roundoff of |lse| + |x_c| (the cancellation that no
implementation in that precision avoids; PyTorch's float32 cross-entropy has it too). A term
a_c f(p_c) moves by a_c |h_c| times that error (h = df/dlog p), plus a relative error of a few ulp from
exp, expm1, log and pow.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import xent
from inputs import fixed_rng, keep_first_target
from reference_focal import softmax_focal_loss_reference

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [F32, F64, BF16, F16]
REDUCTIONS = ["none", "mean", "sum"]
UNIT_ROUNDOFF = {F64: 2.0**-53, F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11}
ALL_OPS = [
    "softmax_focal_loss_fwd",
    "softmax_focal_loss_bwd",
    "softmax_focal_loss_prob_fwd",
    "softmax_focal_loss_prob_bwd",
]


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def require_kernels(backend):
    if backend.name == "cpu":
        return
    ns = "xent_emulated" if backend.emulated else "xent"
    key = "CUDA" if backend.device.type == "cuda" else "CPU"
    missing = [op for op in ALL_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{op}", key)]
    if missing:
        pytest.skip(f"{backend.name} backend: torch.ops.{ns} has no {key} kernel for {', '.join(missing)} yet")


@pytest.fixture
def bk(backend):
    """Every backend of conftest.py, skipped where the softmax focal loss kernels do not exist yet."""
    require_kernels(backend)
    return backend


# ================================================================================================
# Inputs.


def make_logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=F64) * scale).to(dtype)


def make_index_target(shape, C, ignore_index=None, ignore_fraction=0.25):
    N = shape[0]
    pos_shape = (N,) + tuple(shape[2:])
    t = torch.randint(0, max(C, 1), pos_shape)
    if ignore_index is not None and t.numel() > 0:
        t = torch.where(torch.rand(pos_shape) < ignore_fraction, torch.full_like(t, ignore_index), t)
    return t


def make_prob_target(shape, dtype):
    return torch.softmax(torch.randn(shape, dtype=F64) * 2, dim=1 if len(shape) > 1 else 0).to(dtype)


def make_weight(C, dtype):
    return (torch.rand(C, dtype=F64) * 1.5 + 0.25).to(dtype)


# ================================================================================================
# Comparison.


class Tol:
    # Roundoff units of log p = x - lse, of |lse| + |x| + 1: lse costs ~2 (exp, sum, log; the exps'
    # relative errors become an absolute error of log(sum), hence the + 1), its rounding to the
    # accumulation dtype 1, the subtraction 1 (as the cross-entropy suite's CANCELLATION_ULPS).
    LOG_P_ULPS = 4.0
    # Relative error of a term a_c f(p_c) from exp / expm1 / log / pow in the accumulation dtype: about 1
    # ulp each, pow's scaled by |gamma log(1 - p)| (<= 20 for the gammas and logit ranges here), plus the
    # products; 32 ulp leaves a 2x margin while any formula error is O(1).
    TERM_ULPS = 32.0
    # Gradient: the same model applied to h and p (see grad_tolerance).
    # Low precision outputs: one rounding of the float32 result to the output dtype (half an ulp = 1 unit).
    LOW_ROUNDING_UNITS = 1.0


def _acc_u(dtype):
    return UNIT_ROUNDOFF[F64] if dtype == F64 else UNIT_ROUNDOFF[F32]


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
    u = _acc_u(dtype)
    x64 = x.double()
    a, f, h, _, _, keep = _terms64(x64, target, weight, ignore_index, eps, gamma)
    lse = torch.logsumexp(x64, 1, keepdim=True)
    dlogp = Tol.LOG_P_ULPS * u * (lse.abs() + x64.abs() + 1)
    C = x.shape[1]
    # Each term's error, plus the sum over the classes (C u sum |terms|, the recursive sum bound).
    per_position = (a * (h * dlogp + Tol.TERM_ULPS * u * f)).sum(1) + C * u * (a * f).sum(1)
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


def _assert_close(actual, expected, atol, what, low_dtype=None):
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_e = torch.isnan(e)
    assert torch.equal(torch.isnan(a), nan_e), f"{what}: NaN pattern differs"
    if low_dtype is not None:  # one rounding of the result to the output dtype (subnormal spacing included)
        finfo = torch.finfo(low_dtype)
        half_subnormal = finfo.smallest_normal * finfo.eps / 2
        atol = atol + Tol.LOW_ROUNDING_UNITS * (UNIT_ROUNDOFF[low_dtype] * e.abs() + half_subnormal)
    atol = torch.as_tensor(atol, dtype=F64)
    err = (a - e).abs()
    ok = (err <= atol) | nan_e | (a == e)
    if not bool(ok.all()):
        i = (~ok).nonzero()[0].tolist() if ok.dim() else []
        ratio = (err / atol.clamp_min(1e-300))[~ok].max().item()
        raise AssertionError(f"{what}: error exceeds tolerance by {ratio:.3g}x at {i}: got "
                             f"{a[tuple(i)].item() if ok.dim() else a.item()!r}, expected "
                             f"{e[tuple(i)].item() if ok.dim() else e.item()!r}")


def grad_tolerance(x, target, weight, ignore_index, eps, gamma, reduction, dtype, grad_out, expected_grad):
    """Tolerance of d loss / d logits, from the same model: each gradient entry s (a_j h_j - p_j H) moves
    by s times the errors of h (|dh/dlog p| times the log p error, plus the term roundoff) and of p (the
    log p error and its own roundoff)."""
    u = _acc_u(dtype)
    x64 = x.double()
    a, f, h, dh_dlogp, p, keep = _terms64(x64, target, weight, ignore_index, eps, gamma)
    lse = torch.logsumexp(x64, 1, keepdim=True)
    logp = torch.log_softmax(x64, 1)
    dlogp = Tol.LOG_P_ULPS * u * (lse.abs() + x64.abs() + 1)
    dh = dh_dlogp * dlogp + Tol.TERM_ULPS * u * h
    dp = p * (dlogp + Tol.TERM_ULPS * u * (1 + logp.abs()))
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
    scale_ulps = Tol.TERM_ULPS + (keep.numel() if reduction == "mean" else 0)
    return s * per_entry + scale_ulps * u * expected_grad.detach().abs()


def check(backend, x, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, gamma=2.0,
          target_grad=False):
    """xent's loss and gradients on `backend` against the float64 reference."""
    dtype = x.dtype
    low = dtype if dtype in (BF16, F16) else None
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, gamma=gamma)
    xr = x.detach().double().requires_grad_()
    prob = target.is_floating_point()
    tr = target.detach().double().requires_grad_(target_grad) if prob else target
    expected = softmax_focal_loss_reference(xr, tr, None if weight is None else weight.double(), **kw)

    xd = backend.put(x.detach()).requires_grad_()
    td = backend.put(target.detach())
    if target_grad:
        td.requires_grad_()
    wd = backend.put(weight)
    with backend.active():
        loss = xent.softmax_focal_loss(xd, td, wd, **kw)
    assert loss.dtype == dtype and loss.shape == expected.shape
    tol = loss_tolerance(x, target, weight, ignore_index, label_smoothing, gamma, reduction, dtype)
    _assert_close(loss.cpu(), expected, tol, f"loss ({reduction})", low)

    if x.numel() == 0:
        return
    if low is not None and not prob and reduction != "none" and backend.name == "cpu":
        # A differentiated CPU loss takes the fused forward + gradient (Note [Fused gradient],
        # xent/_fused.py): its first backward returns the unit gradient, rounded to the dtype, times
        # grad_out, rounded again; for 16-bit dtypes one rounding more than this error model has. So the
        # fused gradient is checked here for grad_out = 1 (one rounding), its scaling is checked exact in
        # tests/test_fused_grad.py, and the backward below (a second one through the retained graph) takes
        # the separate backward op, checked for a random grad_out as everywhere else.
        with backend.active():
            (unit,) = torch.autograd.grad(loss, [xd], torch.ones_like(loss), retain_graph=True)
        (expected_unit,) = torch.autograd.grad(expected, [xr], torch.ones_like(expected), retain_graph=True)
        utol = grad_tolerance(x, target, weight, ignore_index, label_smoothing, gamma, reduction, dtype,
                              torch.ones(loss.shape, dtype=dtype), expected_unit)
        _assert_close(unit.cpu(), expected_unit, utol, "fused unit grad logits", low)
    grad_out = torch.randn(loss.shape, dtype=F64)
    inputs_x = [xd] + ([td] if target_grad else [])
    with backend.active():
        grads = torch.autograd.grad(loss, inputs_x, grad_out.to(dtype).to(loss.device))
    inputs_r = [xr] + ([tr] if target_grad else [])
    expected_grads = torch.autograd.grad(expected, inputs_r, grad_out.to(dtype).double(), allow_unused=True)
    gtol = grad_tolerance(x, target, weight, ignore_index, label_smoothing, gamma, reduction, dtype,
                          grad_out.to(dtype), expected_grads[0])
    assert grads[0].dtype == dtype and grads[0].shape == x.shape
    _assert_close(grads[0].cpu(), expected_grads[0], gtol, "grad logits", low)
    if target_grad:
        # dL/dt_c = s (1 - eps) w_c f(p_c): the loss terms' model with a = s (1 - eps) w.
        _, f, h, _, _, _ = _terms64(x, target, weight, ignore_index, label_smoothing, gamma)
        x64 = x.double()
        dlogp = Tol.LOG_P_ULPS * _acc_u(dtype) * (torch.logsumexp(x64, 1, keepdim=True).abs() + x64.abs() + 1)
        scale = expected_grads[1].abs() / f.clamp_min(1e-300)  # s (1 - eps) w_c
        ttol = scale * (h * dlogp + Tol.TERM_ULPS * _acc_u(dtype) * f)
        _assert_close(grads[1].cpu(), expected_grads[1], ttol, "grad target", low)


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


def run_options(backend, shape, dtype, name, gamma=None, reductions=REDUCTIONS, layout=None):
    opts = OPTIONS[name]
    C = shape[1]
    x = make_logits(shape, dtype)
    if opts.get("prob"):
        target = make_prob_target(shape, dtype)
    else:
        target = make_index_target(shape, C, opts.get("ignore_index"))
    weight = make_weight(C, dtype) if opts.get("weight") else None
    if layout is not None:
        x, target = layout(x), (layout(target) if target.is_floating_point() else target)
    for reduction in reductions:
        check(backend, x, target, weight, ignore_index=opts.get("ignore_index", -100), reduction=reduction,
              label_smoothing=opts.get("label_smoothing", 0.0), gamma=GAMMA_OF[name] if gamma is None else gamma,
              target_grad=bool(opts.get("prob")) and dtype == F64)


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity(bk, shape, dtype, options):
    if shape[0] * shape[1] >= 1_000_000 and options not in ("plain", "weight_ignore_smooth", "prob"):
        pytest.skip("large shapes run the three main paths (index, index with every option, probabilities)")
    run_options(bk, shape, dtype, options)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0, 0.25, 3.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("options", ["plain", "weight_ignore_smooth", "prob_weight_smooth"])
def test_gammas(bk, gamma, dtype, options):
    for shape in [(37, 80), (5, 3, 9)]:
        run_options(bk, shape, dtype, options, gamma=gamma)


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
def test_gamma_zero_is_cross_entropy_bitwise(bk, dtype, options):
    opts = OPTIONS[options]
    for shape in [(9, 7), (3, 6, 4)]:
        C = shape[1]
        x = make_logits(shape, dtype)
        if opts.get("prob"):
            target = make_prob_target(shape, dtype)
        else:
            target = make_index_target(shape, C, opts.get("ignore_index"))
        weight = make_weight(C, dtype) if opts.get("weight") else None
        kw = dict(ignore_index=opts.get("ignore_index", -100), label_smoothing=opts.get("label_smoothing", 0.0))
        for reduction in REDUCTIONS:
            outs = []
            for fn, extra in ((xent.softmax_focal_loss, {"gamma": 0.0}), (xent.cross_entropy, {})):
                xl = bk.put(x).requires_grad_()
                with bk.active():
                    loss = fn(xl, bk.put(target), bk.put(weight), reduction=reduction, **kw, **extra)
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
# Layouts: non-contiguous, storage offset 1, transposed, channels-last; unbatched input.


def _offset1(t):
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    flat[1:] = t.reshape(-1)
    return flat[1:].view(t.shape)


LAYOUTS = {
    "offset1": _offset1,
    "every_other_class": lambda t: torch.cat([t, t], dim=1)[:, ::2] if t.dim() == 2 else t,
    "transposed": lambda t: t.t().contiguous().t() if t.dim() == 2 else t.movedim(1, -1).contiguous().movedim(-1, 1),
    "sliced_rows": lambda t: torch.cat([t, t], dim=0)[::2],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("options", ["plain", "weight_ignore_smooth", "prob_weight_smooth"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
def test_layouts(bk, layout, options, dtype):
    for shape in [(9, 37), (3, 5, 4), (2, 7, 3, 2)]:
        run_options(bk, shape, dtype, options, reductions=["none", "mean"], layout=LAYOUTS[layout])


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


def test_all_ignored_mean_is_nan(bk):
    x = bk.put(make_logits((4, 5), F32)).requires_grad_()
    t = bk.put(torch.full((4,), -100))
    with bk.active():
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


BAD_CASES = {
    # name: (callable, exception type, message pattern) -- errors as F.cross_entropy raises them
    "target_out_of_range": (lambda: xent.softmax_focal_loss(torch.randn(3, 4), torch.tensor([0, 4, 1])), IndexError,
                            "out of bounds"),
    "negative_target": (lambda: xent.softmax_focal_loss(torch.randn(3, 4), torch.tensor([0, -1, 1])), IndexError,
                        "out of bounds"),
    "batch_mismatch": (lambda: xent.softmax_focal_loss(torch.randn(3, 4), torch.tensor([0, 1])), ValueError,
                       "batch_size"),
    "weight_size": (lambda: xent.softmax_focal_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.ones(3)),
                    RuntimeError, "weight tensor should be defined"),
    "smoothing": (lambda: xent.softmax_focal_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), label_smoothing=1.5),
                  RuntimeError, "label_smoothing"),
    "reduction": (lambda: xent.softmax_focal_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), reduction="avg"),
                  ValueError, "not a valid value for reduction"),
    "float_target_wrong_shape": (lambda: xent.softmax_focal_loss(torch.randn(3, 4), torch.rand(3, 5)), RuntimeError,
                                 "class-index targets"),
    "int_prob_target": (lambda: xent.softmax_focal_loss(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long)),
                        RuntimeError, "floating point"),
    "prob_ignore_index": (lambda: xent.softmax_focal_loss(torch.randn(3, 4), torch.rand(3, 4), ignore_index=1),
                          RuntimeError, "ignore_index is not supported"),
    "int_logits": (lambda: xent.softmax_focal_loss(torch.ones(3, 4, dtype=torch.long), torch.tensor([0, 1, 2])),
                   NotImplementedError, "logits"),
    "zero_dim": (lambda: xent.softmax_focal_loss(torch.tensor(1.0), torch.tensor(0)), RuntimeError, "dimensions"),
    "weight_requires_grad": (lambda: xent.softmax_focal_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]),
                                                             torch.ones(4, requires_grad=True)), RuntimeError,
                             "class weight"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_inputs(case):
    fn, exc, pattern = BAD_CASES[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_bad_inputs_match_pytorch_types():
    """Where PyTorch's cross_entropy raises for the same arguments, xent raises the same type."""
    for case in ("target_out_of_range", "batch_mismatch", "weight_size", "smoothing", "prob_ignore_index"):
        fn, exc, _ = BAD_CASES[case]
        torch_fn = {
            "target_out_of_range": lambda: F.cross_entropy(torch.randn(3, 4), torch.tensor([0, 4, 1])),
            "batch_mismatch": lambda: F.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1])),
            "weight_size": lambda: F.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.ones(3)),
            "smoothing": lambda: F.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), label_smoothing=1.5),
            "prob_ignore_index": lambda: F.cross_entropy(torch.randn(3, 4), torch.rand(3, 4), ignore_index=1),
        }[case]
        with pytest.raises(exc):
            torch_fn()


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
# opcheck.


def _opcheck_samples():
    ops = torch.ops.xent
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


with fixed_rng(0):  # built at import, before the per-test seed: the same samples every run
    OPCHECK_SAMPLES = _opcheck_samples()


@pytest.mark.parametrize("i", range(len(OPCHECK_SAMPLES)),
                         ids=[f"{s[0]._qualified_op_name.split('::')[-1]}-{j}" for j, s in enumerate(OPCHECK_SAMPLES)])
def test_opcheck(i):
    op, args, kwargs = OPCHECK_SAMPLES[i]
    torch.library.opcheck(op, args, kwargs)


def test_opcheck_covers_every_op():
    assert {s[0]._qualified_op_name.split("::")[-1] for s in OPCHECK_SAMPLES} == set(ALL_OPS)


# ================================================================================================
# torch.compile.


@pytest.mark.parametrize("backend_name", ["aot_eager", "inductor"])
@pytest.mark.parametrize("options", ["weight_ignore_smooth", "prob_weight_smooth"])
def test_compile_fullgraph_dynamic(backend_name, options):
    """fullgraph=True (no graph break), dynamic=True: two batch sizes compiled once; equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend_name)
    opts = OPTIONS[options]
    prob = bool(opts.get("prob"))

    def f(x, t, w):
        return xent.softmax_focal_loss(x * 1.5, t, w, ignore_index=opts.get("ignore_index", -100),
                                       label_smoothing=opts.get("label_smoothing", 0.0), gamma=2.0)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for N in (6, 13):
        shape = (N, 11, 3)
        x = make_logits(shape, F32)
        t = make_prob_target(shape, F32) if prob else make_index_target(shape, 11, opts.get("ignore_index"))
        w = make_weight(11, F32)
        outs = []
        for fn in (compiled, f):
            xl = x.clone().requires_grad_()
            tl = t.clone().requires_grad_(prob)
            loss = fn(xl, tl, w)
            grads = torch.autograd.grad(loss, [xl, tl] if prob else [xl])
            outs.append((loss.detach(), grads))
        (lc, gc), (le, ge) = outs
        # Same xent kernels in both; the PyTorch ops around them (target gradient, scaling) may be fused by
        # inductor in another order: float32 ulps, far below 1e-6.
        torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], f"dynamic=True recompiled for a new batch size: {frames}"


# ================================================================================================
# gradcheck / gradgradcheck in float64.

GRADCHECK_CASES = [
    ((4, 5), dict(reduction="mean", gamma=2.0)),
    ((4, 5), dict(reduction="none", gamma=0.5, weight=True, label_smoothing=0.1, ignore_index=2)),
    ((3, 4, 2), dict(reduction="sum", gamma=1.0, weight=True)),
    ((3, 4, 2), dict(reduction="mean", gamma=3.0, label_smoothing=0.2)),
    ((4, 5), dict(reduction="mean", gamma=2.0, prob=True)),
    ((3, 4, 2), dict(reduction="none", gamma=1.5, prob=True, weight=True, label_smoothing=0.1)),
]


@pytest.mark.parametrize("shape,opts", GRADCHECK_CASES, ids=str)
def test_gradcheck(bk, shape, opts):
    opts = dict(opts)
    prob = opts.pop("prob", False)
    weighted = opts.pop("weight", False)
    x = bk.put(make_logits(shape, F64, scale=1.5)).requires_grad_()
    w = bk.put(make_weight(shape[1], F64)) if weighted else None
    if prob:
        t = bk.put(make_prob_target(shape, F64)).requires_grad_()
    else:
        t = bk.put(make_index_target(shape, shape[1], opts.get("ignore_index")))

    def fn(*args):
        xx = args[0]
        tt = args[1] if prob else t
        return xent.softmax_focal_loss(xx, tt, w, **opts)

    inputs = (x, t) if prob else (x,)
    with bk.active():
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


# ================================================================================================
# Determinism.

DETERMINISM_CASES = {
    "rows_f32": ((300, 1000), F32, "weight_ignore_smooth"),
    "rows_plain_bf16": ((4096, 80), BF16, "plain"),
    "rows_prob": ((200, 333), F32, "prob_weight_smooth"),
    "lanes_f32": ((8, 21, 500), F32, "weight_ignore_smooth"),
    "lanes_plain": ((8, 21, 500), F32, "plain"),
    "long_rows": ((3, 50000), F32, "smooth"),
}


def _determinism_run(shape, dtype, options):
    torch.manual_seed(1)
    opts = OPTIONS[options]
    x = make_logits(shape, dtype).requires_grad_()
    if opts.get("prob"):
        t = make_prob_target(shape, dtype)
    else:
        t = make_index_target(shape, shape[1], opts.get("ignore_index"))
    w = make_weight(shape[1], dtype) if opts.get("weight") else None
    outs = []
    for reduction in ("none", "mean"):
        loss = xent.softmax_focal_loss(x, t, w, reduction=reduction, ignore_index=opts.get("ignore_index", -100),
                                       label_smoothing=opts.get("label_smoothing", 0.0), gamma=2.0)
        (g,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
        outs += [loss.detach(), g]
    return outs


def _bits(t):
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_deterministic_across_thread_counts(cpu_backend, restore_num_threads, case):
    torch.set_num_threads(1)
    one = _determinism_run(*DETERMINISM_CASES[case])
    for n in sorted({2, 3, restore_num_threads}):
        torch.set_num_threads(n)
        other = _determinism_run(*DETERMINISM_CASES[case])
        for i, (a, b) in enumerate(zip(one, other)):
            assert torch.equal(_bits(a), _bits(b)), f"{case}: output {i} differs between 1 and {n} threads"
        again = _determinism_run(*DETERMINISM_CASES[case])
        for a, b in zip(other, again):
            assert torch.equal(_bits(a), _bits(b)), f"{case}: repeated run differs"


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
    # CrossEntropyLoss's state_dict, and gamma = 0 is CrossEntropyLoss.
    ce = torch.nn.CrossEntropyLoss(weight=w)
    assert m.state_dict().keys() == ce.state_dict().keys()
    m0 = xent.nn.SoftmaxFocalLoss(weight=w, gamma=0.0)
    torch.testing.assert_close(m0(x, t), ce(x, t))
    m64 = m.double()
    assert m64.weight.dtype == F64
    # Works inside a model, with its parameters' gradient.
    model = torch.nn.Linear(8, 5)
    loss = xent.nn.SoftmaxFocalLoss()(model(torch.randn(3, 8)), torch.tensor([0, 4, 2]))
    loss.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
