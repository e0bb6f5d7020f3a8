"""More than 2**31 elements through the CPU kernels of every loss, the separate and the fused forward +
gradient ops.

A kernel that computes an element offset in 32 bits reads or writes the wrong element past 2**31, which
only an input that large shows. Each test fills its tensors by repeating a random block whose length
(2**24 + 13) divides neither the row length nor 2**32, so that

* the exact answer follows from the block alone: a sum over the whole tensor is (full repeats) x (the
  block's sum) + (the partial block's sum), computed in float64 from the block, with no float64 copy of
  the huge tensor;
* an elementwise result is periodic, so the gradient's elements past 2**31 must be bitwise equal to the
  same elements of the first period: a wrapped offset writes them elsewhere and leaves them wrong.

bfloat16 keeps the inputs at 4 GiB each (peak ~12 GiB with the gradient). Tolerance: one bfloat16 ulp
(2**-8 relative) bounds rounding the float32-accumulated result (half an ulp) with room for the
accumulation, which is orders of magnitude smaller.
"""

import gc

import pytest
import torch
import torch.nn.functional as F

import xent
from inputs import make_logits, make_target
from reference import cross_entropy_reference_chunked
from reference_binary import (
    binary_cross_entropy_with_logits_reference,
    sigmoid_focal_loss_reference,
)

BF16 = torch.bfloat16
NUMEL = 2**31 + 64
BLOCK = 2**24 + 13
ULP = 2.0**-8

pytestmark = pytest.mark.huge


def periodic_fill(out, block):
    """Fills `out` (any shape) with `block` repeated; returns `out`."""
    flat = out.view(-1)
    for i in range(0, flat.numel(), block.numel()):
        n = min(block.numel(), flat.numel() - i)
        flat[i : i + n].copy_(block[:n])
    return out


def periodic_sum(per_element_block, numel):
    """The sum over `numel` elements of the periodic extension of a float64 per-element block."""
    repeats, rest = divmod(numel, per_element_block.numel())
    return repeats * per_element_block.sum() + per_element_block[:rest].sum()


@pytest.fixture(scope="module")
def huge_pair():
    """(input, target) buffers of NUMEL bfloat16 elements, shared by the binary-loss tests (refilled by each)."""
    x = torch.empty(NUMEL, dtype=BF16)
    y = torch.empty(NUMEL, dtype=BF16)
    yield x, y
    del x, y
    gc.collect()


# kind -> (op prefix, float64 loss with reduction='none', input block from randn, op kwargs). The float64
# autograd of the loss is the gradient's reference; for binary_cross_entropy that is PyTorch's own op,
# whose gradient at clamped logs (inputs of exactly 0 or 1, which bfloat16 sigmoids reach) is defined by its
# epsilon rather than the NaN of differentiating the clamp.
BINARY = {
    "bce": (
        "binary_cross_entropy",
        lambda x, y: F.binary_cross_entropy(x, y.double(), reduction="none"),
        lambda z: torch.sigmoid(z),  # probabilities
        {},
    ),
    "bce_with_logits": (
        "binary_cross_entropy_with_logits",
        lambda x, y: binary_cross_entropy_with_logits_reference(x, y, reduction="none"),
        lambda z: z,
        {},
    ),
    "sigmoid_focal": (
        "sigmoid_focal_loss",
        lambda x, y: sigmoid_focal_loss_reference(x, y, alpha=0.25, gamma=2.0, reduction="none"),
        lambda z: z,
        {"alpha": 0.25, "gamma": 2.0},
    ),
}


@pytest.mark.parametrize("kind", list(BINARY))
def test_binary_loss_huge(huge_pair, kind):
    name, reference, make_input, kwargs = BINARY[kind]
    ops = torch.ops.xent
    fwd, bwd = getattr(ops, name + "_fwd"), getattr(ops, name + "_bwd")
    extra = () if kind == "bce" else (None,)  # pos_weight, absent from binary_cross_entropy
    x, y = huge_pair
    gen = torch.Generator().manual_seed(0)
    x_block = make_input(torch.randn(BLOCK, generator=gen, dtype=torch.float64) * 2).to(BF16)
    y_block = torch.randint(0, 2, (BLOCK,), generator=gen).to(BF16)  # hard labels, as in detection
    periodic_fill(x, x_block)
    periodic_fill(y, y_block)

    # Forward: sum and mean over all NUMEL elements.
    loss_block = reference(x_block.double(), y_block)  # float64, (BLOCK,)
    expected_sum = periodic_sum(loss_block, NUMEL)
    for reduction, code, expected in (("sum", 2, expected_sum), ("mean", 1, expected_sum / NUMEL)):
        loss = fwd(x, y, None, *extra, reduction=code, **kwargs)
        assert loss.dtype == BF16 and loss.dim() == 0
        err = abs(loss.double().item() - expected.item())
        assert err <= ULP * abs(expected.item()), f"{reduction}: xent {loss.item()} expected {expected.item()}"

    # Backward of the sum: every element's gradient, a periodic function of its index.
    grad = bwd(torch.ones((), dtype=BF16), x, y, None, *extra, reduction=2, **kwargs)
    assert grad.shape == x.shape and grad.dtype == BF16
    xb = x_block.double().requires_grad_()
    (grad_block,) = torch.autograd.grad(reference(xb, y_block).sum(), xb)
    # The first period against the float64 reference ...
    err = (grad[:BLOCK].double() - grad_block).abs()
    assert bool((err <= ULP * grad_block.abs() + 1e-30).all()), f"first period: max error {err.max().item():.3e}"
    # ... and the elements around and past 2**31 bitwise equal to their counterparts in the first period.
    assert_periodic(grad)
    first_period = grad[:BLOCK].clone()
    sum_loss = fwd(x, y, None, *extra, reduction=2, **kwargs)
    del grad, loss
    gc.collect()

    # The fused forward + gradient (what a differentiated mean / sum takes): the forward's loss and the
    # separate backward's gradient, bitwise, past 2**31 too.
    fused_loss, fused_grad = getattr(ops, name + "_fwd_grad")(x, y, None, *extra, reduction=2, **kwargs)
    assert torch.equal(fused_loss, sum_loss)
    assert torch.equal(fused_grad[:BLOCK], first_period)
    assert_periodic(fused_grad)
    del fused_grad
    gc.collect()


def assert_periodic(grad):
    """The elements around and past 2**31 equal, bitwise, their counterparts in the first period."""
    for start in (2**31 - 1000, NUMEL - BLOCK // 2):
        stop = min(start + BLOCK // 2, NUMEL)
        phase = start % BLOCK
        twin = torch.cat([grad[phase:BLOCK], grad[:BLOCK]])[: stop - start]
        assert torch.equal(grad[start:stop], twin), f"gradient elements [{start}, {stop}) differ from the first period"


@pytest.mark.parametrize("shape", [(1, 2**31 + 64), (2**16 + 1, 2**15)], ids=["one_row", "many_rows"])
def test_nll_loss_huge(free_memory, shape):
    """nll_loss reads one element per position: the target's column past 2**31 (one row) or rows whose
    offset is past 2**31 (many rows); its backward writes the whole gradient, zeros included."""
    N, C = shape
    ops = torch.ops.xent
    gen = torch.Generator().manual_seed(1)
    log_probs = periodic_fill(torch.empty(shape, dtype=BF16), -torch.rand(BLOCK, generator=gen, dtype=torch.float64).to(BF16) * 5)
    target = torch.randint(0, C, (N,), generator=gen)
    target[-1] = C - 7  # an element past 2**31 in both shapes
    picked = log_probs.gather(1, target[:, None])[:, 0].double()  # (N,): the elements the loss reads
    for reduction, code, expected in (
        ("sum", 2, -picked.sum()),
        ("mean", 1, -picked.mean()),
    ):
        loss, total_weight = ops.nll_loss_fwd(log_probs, target, None, reduction=code)
        assert torch.equal(total_weight, torch.tensor(float(N), dtype=BF16))
        err = abs(loss.double().item() - expected.item())
        assert err <= ULP * abs(expected.item()), f"{reduction}: xent {loss.item()} expected {expected.item()}"
    loss, _ = ops.nll_loss_fwd(log_probs, target, None, reduction=0)
    assert torch.equal(loss, -picked.to(BF16))

    grad = ops.nll_loss_bwd(
        torch.ones((), dtype=BF16), log_probs, target, None, torch.tensor(float(N), dtype=BF16), reduction=2
    )
    assert grad.shape == log_probs.shape
    assert bool((grad.gather(1, target[:, None]) == -1).all()), "the target elements' gradient is -1"
    # Every other element is 0: the gradient holds exactly N nonzeros, all of them at the targets.
    assert int(torch.count_nonzero(grad)) == N
    del grad, log_probs


@pytest.mark.parametrize("shape", [(1, 2**31 + 64), (2**16 + 1, 2**15)], ids=["one_row", "many_rows"])
def test_cross_entropy_huge(free_memory, restore_num_threads, shape):
    """bfloat16 logits with more than 2**31 elements (4.3 GB): 64-bit indexing of classes (one row of
    2**31 + 64) and of rows (offsets past 2**31 elements). The forward is compared with a chunked float64
    reference that never holds a float64 copy of more than 2**20 logits (peak ~4.5 GB); the fused forward +
    gradient's gradient (4.3 GB more) on its last 2**20 elements."""
    N, C = shape
    x = periodic_fill(torch.empty(shape, dtype=BF16), make_logits((BLOCK,), BF16, scale=1.5))
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
