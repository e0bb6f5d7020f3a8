"""Memory-traffic model of the CUDA kernels, measured by the SIMT emulator (tests/simt).

The emulator counts every global-memory byte the device code reads and writes through
xent::cuda::load_global/store_global. The cross-entropy kernels are designed to be bandwidth-bound with
the minimum number of passes: the forward reads each logit once, the backward reads each logit once and
writes each gradient element once. Everything else (targets, lse, per-row partials, the reduction) is
O(positions), bounded here by a per-position allowance.
"""

import pytest
import torch

import xent
from conftest import simt_traffic

pytestmark = pytest.mark.skipif(
    not xent.testing.emulated_cuda_available(), reason="needs the test-only emulator build (XENT_BUILD_EMULATOR=1)"
)

# Bytes per position allowed on top of the logit passes: target (8), lse (4-8), x_t, loss, per-row
# partials of split rows and reduction partials. Generous for small C, negligible for LLM vocabularies.
PER_POSITION_ALLOWANCE = 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(64, 4096), (4, 50257), (3, 21, 8, 8)],
    ids=["rows", "split-rows", "lanes"],
)
@pytest.mark.parametrize("reduction", [0, 1])
def test_forward_reads_each_logit_once_backward_reads_and_writes_once(shape, dtype, reduction):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    target_shape = (shape[0],) + tuple(shape[2:])
    t = torch.randint(0, shape[1], target_shape)
    ops = torch.ops.xent_emulated
    logit_bytes = x.numel() * x.element_size()
    positions = x.numel() // shape[1]
    slack = PER_POSITION_ALLOWANCE * positions + 4096

    (loss, lse), read, written = simt_traffic(lambda: ops.cross_entropy_fwd(x, t, None, reduction=reduction))
    assert logit_bytes <= read <= logit_bytes + slack, (read, logit_bytes)
    assert written <= slack, written

    grad_loss = torch.ones_like(loss)
    grad, read, written = simt_traffic(lambda: ops.cross_entropy_bwd(grad_loss, x, t, None, lse, reduction=reduction))
    assert logit_bytes <= read <= logit_bytes + slack, (read, logit_bytes)
    assert logit_bytes <= written <= logit_bytes + slack, (written, logit_bytes)


def test_traffic_counter_resets():
    ops = torch.ops.xent_emulated
    x = torch.randn(8, 1000)
    t = torch.randint(0, 1000, (8,))
    ops.cross_entropy_fwd(x, t, None)
    first = ops._simt_traffic()
    assert first[0] > 0
    assert list(ops._simt_traffic()) == [0, 0]


# Softmax focal loss (Note [CUDA softmax focal kernels]): class-index targets without smoothing read each
# logit once in the forward and read/write each element once in the backward; label smoothing and
# probability targets add one pass over the row (L2-hot, still counted here) and read the target per pass.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 4096), (3, 21, 8, 8)], ids=["rows", "k-dim"])
@pytest.mark.parametrize("case", ["index", "smoothing", "prob"])
@pytest.mark.parametrize("reduction", [0, 1])
def test_softmax_focal_loss_passes(shape, dtype, case, reduction):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    ops = torch.ops.xent_emulated
    logit_bytes = x.numel() * x.element_size()
    positions = x.numel() // shape[1]
    slack = PER_POSITION_ALLOWANCE * positions + 4096
    if case == "prob":
        t = torch.softmax(torch.randn(shape), dim=1).to(dtype)
        fwd = lambda: ops.softmax_focal_loss_prob_fwd(x, t, None, gamma=2.0, reduction=reduction)
        bwd = lambda g, lse: ops.softmax_focal_loss_prob_bwd(g, x, t, None, lse, gamma=2.0, reduction=reduction)
    else:
        t = torch.randint(0, shape[1], (shape[0],) + tuple(shape[2:]))
        eps = 0.1 if case == "smoothing" else 0.0
        fwd = lambda: ops.softmax_focal_loss_fwd(x, t, None, gamma=2.0, reduction=reduction, label_smoothing=eps)
        bwd = lambda g, lse: ops.softmax_focal_loss_bwd(
            g, x, t, None, lse, gamma=2.0, reduction=reduction, label_smoothing=eps
        )
    passes = 1 if case == "index" else 2
    # Forward: the lse pass reads the logits only; the focal pass the logits and a probability target.
    # Backward: both passes (H, then the gradient) read the logits and a probability target.
    target_passes = {"index": (0, 0), "smoothing": (0, 0), "prob": (1, 2)}[case]

    (loss, lse), read, written = simt_traffic(fwd)
    expected = (passes + target_passes[0]) * logit_bytes
    assert expected <= read <= expected + slack, (read, expected)
    assert written <= slack, written

    grad, read, written = simt_traffic(lambda: bwd(torch.ones_like(loss), lse))
    expected = (passes + target_passes[1]) * logit_bytes
    assert expected <= read <= expected + slack, (read, expected)
    assert logit_bytes <= written <= logit_bytes + slack, (written, logit_bytes)
