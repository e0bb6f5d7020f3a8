"""xent: fast, exact, torch.compile-ready loss kernels for CPU and CUDA.

    import xent
    loss = xent.cross_entropy(logits, target)            # same arguments and results as F.cross_entropy
    criterion = xent.nn.CrossEntropyLoss(label_smoothing=0.1)

The operators live in ``torch.ops.xent`` (see ``csrc/ops.cpp``); this package adds their fake kernels,
autograd formulas and the PyTorch-compatible functional and module APIs.
"""

from . import _ops  # noqa: F401  (loads the kernels, registers every op's fake kernel and autograd)
from . import nn, testing
from .functional import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    nll_loss,
    sigmoid_focal_loss,
    softmax_focal_loss,
)

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "nll_loss",
    "nn",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "testing",
]
__version__ = "0.1.0"
