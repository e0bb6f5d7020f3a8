"""The loss kernels' AVX512_BF16 tables against their plain AVX-512 tables.

On a CPU with AVX512_BF16 the kernels round bf16 outputs with vcvtneps2bf16 (csrc/cpu/simd/vec.h, VecF::store),
which treats subnormal inputs as zero and keeps NaN signs and payloads; vectors holding either must take
the integer rounding, so every output (losses with reduction='none', gradients of the separate and the
fused ops) has the same bits as with the plain table (XENT_CPU_AVX512_BF16=0). The inputs put subnormal
values and NaN into the outputs.
"""

import math

import pytest
import torch

import xent
from conftest import cpu_has_flag

BF16 = torch.bfloat16

# Without AVX512_BF16 the host never selects the tables under test (use_avx512_bf16 in isa.h), so there is
# no second table to compare with; the CI machine has it, so the test runs there.
pytestmark = pytest.mark.skipif(not cpu_has_flag("avx512_bf16"), reason="the CPU lacks AVX512_BF16: only one table exists")


def _outputs(fn, x, upstream):
    """fn's loss with reduction='none', its gradient for `upstream` (separate backward op) and the
    gradient of the mean (the fused op)."""
    xr = x.clone().requires_grad_()
    loss = fn(xr, "none")
    loss.backward(upstream)
    xm = x.clone().requires_grad_()
    fn(xm, "mean").backward()
    return loss.detach(), xr.grad, xm.grad


def _assert_same_bits(monkeypatch, fn, x, upstream):
    torch.ops.xent._cpu_isa("avx512")
    with_bf16 = _outputs(fn, x, upstream)
    monkeypatch.setenv("XENT_CPU_AVX512_BF16", "0")
    plain = _outputs(fn, x, upstream)
    tiny = torch.finfo(torch.float32).tiny
    grads = torch.cat([g.float().flatten() for g in plain[1:]])
    assert ((grads.abs() < tiny) & (grads != 0)).any(), "the inputs must give subnormal gradient elements"
    assert grads.isnan().any(), "the inputs must give NaN gradient elements"
    for name, a, b in zip(("loss", "gradient", "fused gradient"), with_bf16, plain):
        mismatch = (a.view(torch.int16) != b.view(torch.int16)).nonzero()
        assert mismatch.numel() == 0, f"{name}: {len(mismatch)} elements differ, first at {mismatch[0].tolist()}"


def _upstream(n, generator):
    # Small upstream gradients (down to 1e-8) times small per-element gradients give subnormal products.
    return torch.logspace(-1, -8, n)[torch.randperm(n, generator=generator)]


@pytest.mark.parametrize("shape", [(6, 1000), (2, 3, 40, 7)], ids=["rows", "lanes"])
def test_cross_entropy_bits(monkeypatch, restore_isa, shape):
    """Cross-entropy's rows and lanes layouts: subnormal gradient elements (softmax near exp(-80) times
    small upstream gradients), NaN at a counted position, -inf logits; vcvtne2ps2bf16 would flush the
    subnormals and change the NaNs, so their vectors must take the integer rounding."""
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
    upstream = _upstream(target.numel(), g).view(positions).to(BF16)
    _assert_same_bits(monkeypatch, lambda v, r: xent.cross_entropy(v, target, reduction=r), x, upstream)


@pytest.mark.parametrize("C", [80, 1000])
def test_softmax_focal_bits(monkeypatch, restore_isa, C):
    g = torch.Generator().manual_seed(3)
    N = 40
    x = torch.randn(N, C, generator=g) * 3
    x[:, 0] = 80.0  # softmax of the other classes near exp(-80): subnormal gradient elements
    x[:, 1] = torch.linspace(-50.0, 0.0, N)
    x[:, 2] = -math.inf
    x[5, 7] = math.nan  # a NaN row
    x = x.to(BF16)
    target = torch.randint(3, C, (N,), generator=g)
    target[::4] = -100
    upstream = _upstream(N, g).to(BF16)
    _assert_same_bits(monkeypatch, lambda v, r: xent.softmax_focal_loss(v, target, reduction=r, gamma=2.0), x,
                      upstream)


@pytest.mark.parametrize("loss", ["bce", "bce_with_logits", "sigmoid_focal"])
def test_binary_bits(monkeypatch, restore_isa, loss):
    g = torch.Generator().manual_seed(4)
    n = 5000  # two kernel blocks and a tail
    logits = torch.randn(n, generator=g) * 4
    # Negative targets with sigmoid(x) from e^-100 to e^-10: gradients ~ p (with logits) and ~ p^3 (focal,
    # gamma 2) times a small upstream cover the subnormal range.
    logits[:300] = torch.linspace(-100.0, -10.0, 300)
    logits[400] = math.nan
    target = (torch.rand(n, generator=g) < 0.1).float()
    target[:300] = 0.0
    upstream = _upstream(n, g).to(BF16)
    if loss == "bce":
        # BCE's gradient (x - y) / max(x (1 - x), 1e-12) is never subnormal by itself: a tiny weight on the
        # subnormal probabilities sigmoid(-80..-100) makes it so, and a NaN weight gives NaN gradients (a
        # NaN probability is an error, as in PyTorch).
        x = torch.sigmoid(logits)
        x[400] = 0.5
        weight = torch.ones(n)
        weight[:300] = 1e-15
        weight[400] = math.nan
        fn = lambda v, r: xent.binary_cross_entropy(v, target.to(BF16), weight.to(BF16), reduction=r)  # noqa: E731
    elif loss == "bce_with_logits":
        x = logits
        fn = lambda v, r: xent.binary_cross_entropy_with_logits(v, target.to(BF16), reduction=r)  # noqa: E731
    else:
        x = logits
        fn = lambda v, r: xent.sigmoid_focal_loss(v, target.to(BF16), alpha=0.25, gamma=2.0, reduction=r)  # noqa: E731
    _assert_same_bits(monkeypatch, fn, x.to(BF16), upstream)
