"""The compiled operator libraries and which of them the functional API calls.

``xent._C`` registers the ``xent`` library (the CPU and CUDA kernels; schemas in csrc/ops.cpp). The
test-only build (``XENT_BUILD_EMULATOR=1``) adds ``xent._C_emulated``: the same schemas as the library
``xent_emulated``, whose CPU kernels run the CUDA device code under the SIMT emulator (tests/simt). Fake
kernels and autograd are registered for every namespace in NAMESPACES (xent/_ops.py).

The functional API calls the ops of ``active_ops()``: ``torch.ops.xent``, or ``torch.ops.xent_emulated``
inside ``xent.testing.emulated_cuda()``, a per-thread choice.
"""

import contextlib
import threading

import torch

from . import _C  # noqa: F401  (registers the `xent` library and its CPU/CUDA kernels)

NAMESPACES = ["xent"]
try:  # the test-only emulated-CUDA library, present only in XENT_BUILD_EMULATOR builds
    from . import _C_emulated  # noqa: F401

    NAMESPACES.append("xent_emulated")
except ImportError:
    pass

# The ops' `reduction` argument: at::Reduction's codes.
REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2
REDUCTION_CODES = {"none": REDUCTION_NONE, "mean": REDUCTION_MEAN, "sum": REDUCTION_SUM}

_REAL_OPS = torch.ops.xent
_selection = threading.local()  # .ops: this thread's choice, absent for the real kernels


def active_ops():
    """The op namespace the functional API calls in this thread."""
    return getattr(_selection, "ops", _REAL_OPS)


@contextlib.contextmanager
def selected_ops(namespace: str):
    """Within the block, this thread's functional API calls the ops of ``torch.ops.<namespace>``."""
    previous = active_ops()
    _selection.ops = getattr(torch.ops, namespace)
    try:
        yield
    finally:
        _selection.ops = previous
