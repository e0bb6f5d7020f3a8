"""The fused forward + gradient path (Note [Fused gradient] in xent/_fused.py) of every loss that has one.

The parity suites already run the fused path: their CPU cases differentiate mean/sum losses of inputs that
require grad. This file checks what is particular to it, per loss:

* the API takes the fused op exactly when it should (input requires grad, grad mode, mean/sum, CPU);
* its gradient equals the separate backward op's, for grad_loss = 1 and for other values (a GradScaler's
  power of two and 1/3), bitwise where the same kernels compute both (FUSED_CASES' ``bitwise``);
* a second backward through a retained graph and a double backward (create_graph) are right;
* torch.compile(fullgraph=True) gives eager's results; opcheck of the fused op and of scale_grad_.
"""

import contextlib

import pytest
import torch

import xent
from xent import _fused


def _index_case(dtype, n=37, c=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 3).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[::5] = -100
    w = torch.rand(c, generator=g).to(dtype) + 0.5
    return x, t, w


# One entry per fused op: name -> (build inputs, the public call, the fused op's name, bitwise).
# ``call(x, t, w, reduction)`` returns the loss; x is the differentiated input.
def _cross_entropy_call(x, t, w, reduction):
    return xent.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)


def _prob_case(dtype, n=37, c=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 3).to(dtype)
    t = torch.softmax(torch.randn(n, c, generator=g) * 2, 1).to(dtype)
    w = torch.rand(c, generator=g).to(dtype) + 0.5
    return x, t, w


def _kdim_case(dtype, seed=2):  # (N, C, d1): the lanes layout, class dimension strided
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 21, 50, generator=g) * 3).to(dtype)
    t = torch.randint(0, 21, (3, 50), generator=g)
    t[:, ::7] = -100
    w = torch.rand(21, generator=g).to(dtype) + 0.5
    return x, t, w


def _binary_case(probabilities):
    """Builder of a binary loss's inputs: x (37, 300) logits, or probabilities in [0.002, 0.998]; targets
    hard 0/1 in most rows (bce's one-log path) and soft in every fourth row; a per-class weight (300)."""

    def build(dtype, n=37, c=300, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, c, generator=g) * 3
        if probabilities:  # away from 0 and 1, whose gradients (~1e12) overflow float16
            x = torch.sigmoid(x).clamp(0.002, 0.998)
        t = (torch.rand(n, c, generator=g) < 0.3).float()
        t[::4] = torch.rand(c, generator=g)
        w = torch.rand(c, generator=g) + 0.5
        return x.to(dtype), t.to(dtype), w.to(dtype)

    return build


def _bce_call(x, t, w, reduction):
    return xent.binary_cross_entropy(x, t, w, reduction=reduction)


def _pos_weight(w):
    # One value per class (the last dimension), in [0.5, 1.5]: the weight reversed, an exact operation also
    # when torch.compile generates it (linspace there may round differently from eager).
    return w.flip(-1)


def _bce_with_logits_call(x, t, w, reduction):
    return xent.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=_pos_weight(w))


def _sigmoid_focal_call(x, t, w, reduction):
    return xent.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction=reduction, weight=w)


def _sigmoid_focal_real_gamma_call(x, t, w, reduction):
    # A non-integer gamma (the vpow path), no alpha weighting, with pos_weight.
    return xent.sigmoid_focal_loss(x, t, alpha=-1.0, gamma=1.5, reduction=reduction, weight=w,
                                   pos_weight=_pos_weight(w))


def _unweighted(call):
    # The kernels' other instance (no weight and no pos_weight, binary_loss_kernels_impl.h: kPlain).
    return lambda x, t, w, reduction: call(x, t, None, reduction)


def _bce_with_logits_plain_call(x, t, w, reduction):
    return xent.binary_cross_entropy_with_logits(x, t, reduction=reduction)


def _softmax_focal_call(x, t, w, reduction):
    # Label smoothing: every class' focal term enters (the kernels' dense path, forward and backward run
    # back to back per block).
    return xent.softmax_focal_loss(x, t, w, reduction=reduction, label_smoothing=0.1, gamma=2.0)


def _softmax_focal_one_hot_call(x, t, w, reduction):
    # No smoothing: only the target's focal term enters (the one-pass kernel, the gradient from the
    # forward's exponentials).
    return xent.softmax_focal_loss(x, t, w, reduction=reduction, gamma=2.0)


FUSED_CASES = {
    "cross_entropy": (_index_case, _cross_entropy_call, "cross_entropy_fwd_grad", True),
    "cross_entropy_kdim": (_kdim_case, _cross_entropy_call, "cross_entropy_fwd_grad", True),
    "cross_entropy_prob": (_prob_case, _cross_entropy_call, "cross_entropy_prob_fwd_grad", True),
    "binary_cross_entropy": (_binary_case(True), _bce_call, "binary_cross_entropy_fwd_grad", True),
    "binary_cross_entropy_with_logits": (
        _binary_case(False),
        _bce_with_logits_call,
        "binary_cross_entropy_with_logits_fwd_grad",
        True,
    ),
    "sigmoid_focal_loss": (_binary_case(False), _sigmoid_focal_call, "sigmoid_focal_loss_fwd_grad", True),
    "sigmoid_focal_loss_real_gamma": (
        _binary_case(False),
        _sigmoid_focal_real_gamma_call,
        "sigmoid_focal_loss_fwd_grad",
        True,
    ),
    "binary_cross_entropy_unweighted": (
        _binary_case(True),
        _unweighted(_bce_call),
        "binary_cross_entropy_fwd_grad",
        True,
    ),
    "binary_cross_entropy_with_logits_unweighted": (
        _binary_case(False),
        _bce_with_logits_plain_call,
        "binary_cross_entropy_with_logits_fwd_grad",
        True,
    ),
    "sigmoid_focal_loss_unweighted": (
        _binary_case(False),
        _unweighted(_sigmoid_focal_call),
        "sigmoid_focal_loss_fwd_grad",
        True,
    ),
    "softmax_focal_loss": (_index_case, _softmax_focal_call, "softmax_focal_loss_fwd_grad", True),
    "softmax_focal_loss_one_hot": (_index_case, _softmax_focal_one_hot_call, "softmax_focal_loss_fwd_grad", True),
    "softmax_focal_loss_kdim": (_kdim_case, _softmax_focal_one_hot_call, "softmax_focal_loss_fwd_grad", True),
}
CASE_IDS = list(FUSED_CASES)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _dtype_id(d):
    return str(d).replace("torch.", "")


@contextlib.contextmanager
def _fused_enabled(enabled):
    old = _fused.ENABLED
    _fused.ENABLED = enabled
    try:
        yield
    finally:
        _fused.ENABLED = old


def _grad(case, dtype, reduction, grad_loss, fused, **kw):
    build, call, _, _ = FUSED_CASES[case]
    x, t, w = build(dtype)
    x = x.clone().requires_grad_(True)
    with _fused_enabled(fused):
        loss = call(x, t, w, reduction)
        (g,) = torch.autograd.grad(loss, x, torch.tensor(grad_loss, dtype=loss.dtype), **kw)
    return loss.detach(), g


@pytest.mark.parametrize("case", CASE_IDS)
def test_fused_op_is_taken_exactly_when_differentiated(case):
    build, call, op_name, _ = FUSED_CASES[case]
    x, t, w = build(torch.float32)
    # Counted through the profiler, which sees every dispatcher call of the op.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call(x.clone().requires_grad_(True), t, w, "mean")  # fused
        call(x.clone().requires_grad_(True), t, w, "sum")  # fused
        call(x.clone().requires_grad_(True), t, w, "none")  # reduction none: separate
        call(x.clone(), t, w, "mean")  # no grad wanted: separate
        with torch.no_grad():
            call(x.clone().requires_grad_(True), t, w, "mean")  # grad mode off: separate
        with _fused_enabled(False):
            call(x.clone().requires_grad_(True), t, w, "mean")  # XENT_FUSED_GRAD=0
    fused_calls = sum(e.count for e in prof.key_averages() if e.key == f"xent::{op_name}")
    assert fused_calls == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("grad_loss", [1.0, 4.0, 1.0 / 3.0], ids=["one", "pow2", "third"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_fused_gradient_equals_separate_backward(case, dtype, reduction, grad_loss):
    bitwise = FUSED_CASES[case][3]
    loss_f, g_f = _grad(case, dtype, reduction, grad_loss, fused=True)
    loss_s, g_s = _grad(case, dtype, reduction, grad_loss, fused=False)
    assert torch.equal(loss_f, loss_s)  # the same forward kernels
    if bitwise and grad_loss == 1.0:  # the same kernels with the same scale
        assert torch.equal(g_f, g_s)
    # The fused gradient is the unit gradient (rounded to the dtype) times grad_loss, rounded once more:
    # exactly that, computed in float32 (float64 for float64).
    _, g_unit = _grad(case, dtype, reduction, 1.0, fused=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(grad_loss, dtype=dtype).to(acc)  # grad_loss as the loss' dtype holds it
    assert torch.equal(g_f, (g_unit.to(acc) * scale).to(dtype))
    # Hence it differs from the separate op (which folds grad_loss into its scale before the kernel) by
    # the rounding of the extra product and of the reordered scale: two half-eps roundings, relative to the
    # largest gradient element (the elements are differences of terms of that size, so their rounding is
    # relative to it), plus half a subnormal ulp, scaled, for unit gradients too small to be normal.
    info = torch.finfo(dtype)
    diff = (g_f.double() - g_s.double()).abs().max()
    assert diff <= 2 * info.eps * g_s.double().abs().max() + grad_loss * info.smallest_normal * info.eps, diff


# Gradients large enough to be written with non-temporal stores (csrc/cpu/grad_buffer.h): short rows through
# a staging buffer from 8 MiB on (Note [Short rows' gradient] in csrc/cpu/cross_entropy_kernels_impl.h; softmax focal's
# from 4 MiB on), rows longer than the stage straight from the exp loop from 32 MiB on. The small cases
# above never stream.
STREAMED_SHAPES = {
    "short_rows_f32": ((32768, 80), torch.float32),  # 10 MiB, blocks of 16 rows
    "short_rows_bf16": ((8192, 513), torch.bfloat16),  # 8.02 MiB, a partial last vector per row
    "stage_sized_rows_f32": ((2100, 4096), torch.float32),  # 33 MiB, one 16 KiB row per block
    "long_rows_f32": ((2050, 4100), torch.float32),  # 32.06 MiB, streamed from the exp loop
    "focal_only_bf16": ((4096, 700), torch.bfloat16),  # 5.47 MiB: streamed by softmax focal only
}


# Softmax focal stages (and streams) its gradient only when it keeps a block's exponentials, rows of up to
# 1024 classes; its longer rows write the gradient directly, never streamed, as the small cases above do.
STREAMED_CASES = [
    (shape, call)
    for shape in STREAMED_SHAPES
    for call in ("cross_entropy", "cross_entropy_plain", "softmax_focal_loss_one_hot")
    if not (call.startswith("softmax_focal") and STREAMED_SHAPES[shape][0][1] > 1024)
    and not (call.startswith("cross_entropy") and shape.startswith("focal_only"))
]


@pytest.mark.parametrize("shape_dtype,call", STREAMED_CASES, ids=[f"{c}-{s}" for s, c in STREAMED_CASES])
def test_streamed_gradient_equals_separate_backward(shape_dtype, call):
    (n, c), dtype = STREAMED_SHAPES[shape_dtype]
    x, t, w = _index_case(dtype, n=n, c=c, seed=3)
    calls = {
        "cross_entropy": _cross_entropy_call,  # weight, ignore_index and smoothing
        "cross_entropy_plain": lambda x, t, w, r: xent.cross_entropy(x, t, reduction=r),
        "softmax_focal_loss_one_hot": _softmax_focal_one_hot_call,
    }
    results = []
    for fused in (True, False):
        leaf = x.clone().requires_grad_(True)
        with _fused_enabled(fused):
            loss = calls[call](leaf, t, w, "mean")
            (g,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach(), g))
    (loss_f, g_f), (loss_s, g_s) = results
    assert torch.equal(loss_f, loss_s)
    assert torch.equal(g_f, g_s)
    assert not g_f.isnan().any()
    assert torch.equal(g_f[::5], torch.zeros_like(g_f[::5]))  # the ignored rows


@pytest.mark.parametrize("case", CASE_IDS)
def test_second_backward_through_retained_graph(case):
    build, call, _, _ = FUSED_CASES[case]
    x, t, w = build(torch.float32)
    x.requires_grad_(True)
    loss = call(x, t, w, "mean")
    (g1,) = torch.autograd.grad(loss, x, torch.tensor(3.0), retain_graph=True)
    g1 = g1.clone()
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(3.0))
    _, fused = _grad(case, torch.float32, "mean", 3.0, fused=True)
    _, separate = _grad(case, torch.float32, "mean", 3.0, fused=False)
    assert torch.equal(g1, fused)  # the first backward scales the saved gradient
    assert torch.equal(g2, separate)  # later ones take the separate backward op: not scaled twice


@pytest.mark.parametrize("case", CASE_IDS)
def test_double_backward_takes_the_differentiable_path(case):
    build, call, _, _ = FUSED_CASES[case]
    results = []
    for fused in (True, False):
        x, t, w = build(torch.float64)
        x.requires_grad_(True)
        with _fused_enabled(fused):
            loss = call(x, t, w, "mean")
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            (gg,) = torch.autograd.grad((g * g).sum(), x)
        results.append((g.detach(), gg))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("case", CASE_IDS)
def test_compile_fullgraph_matches_eager(case):
    build, call, _, _ = FUSED_CASES[case]
    torch._dynamo.reset()
    x, t, w = build(torch.float32)
    compiled = torch.compile(lambda x, t, w: call(x, t, w, "mean") * 2, fullgraph=True)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    compiled(xs[0], t, w).backward()
    (call(xs[1], t, w, "mean") * 2).backward()
    assert torch.equal(xs[0].grad, xs[1].grad)


@pytest.mark.parametrize("case", CASE_IDS)
def test_opcheck(case):
    build, _, op_name, _ = FUSED_CASES[case]
    x, t, w = build(torch.float32)
    op = getattr(torch.ops.xent, op_name)
    kwargs = {"reduction": 1}
    torch.library.opcheck(op, (x, t, w), kwargs)
    loss, *_, grad = op(x, t, w, **kwargs)
    torch.library.opcheck(torch.ops.xent.scale_grad_, (grad.clone(), torch.tensor(0.5)))
    torch.library.opcheck(torch.ops.xent.scale_grad_, (grad.clone(), torch.tensor(1.0)))


@pytest.mark.parametrize("case", CASE_IDS)
def test_fused_op_refuses_reduction_none(case):
    build, _, op_name, _ = FUSED_CASES[case]
    x, t, w = build(torch.float32)
    with pytest.raises(RuntimeError, match="reduction must be mean"):
        getattr(torch.ops.xent, op_name)(x, t, w, reduction=0)


def test_scale_grad_bad_arguments():
    g = torch.ones(4, 3)
    with pytest.raises(RuntimeError, match="one element"):
        torch.ops.xent.scale_grad_(g, torch.ones(2))
    with pytest.raises(RuntimeError, match="dense"):
        torch.ops.xent.scale_grad_(g[:, ::2], torch.tensor(2.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_scale_grad_values(dtype):
    g = torch.randn(1000, 3).to(dtype)
    expected = (g.double() * 0.75).to(dtype) if dtype == torch.float64 else (g.float() * 0.75).to(dtype)
    out = g.clone()
    torch.ops.xent.scale_grad_(out, torch.tensor(0.75, dtype=dtype))
    assert torch.equal(out, expected)
    same = g.clone()
    torch.ops.xent.scale_grad_(same, torch.tensor(1.0, dtype=dtype))
    assert torch.equal(same, g)
    permuted = g.t().contiguous().t()  # dense, not contiguous
    torch.ops.xent.scale_grad_(permuted, torch.tensor(0.75, dtype=dtype))
    assert torch.equal(permuted, expected)
