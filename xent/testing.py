"""Testing hooks. Not needed to use xent.

``emulated_cuda()`` routes xent's functional API through the CUDA kernels compiled for the CPU and run by
the SIMT emulator (tests/simt): CPU tensors in, the real CUDA host launch code and device code run. It
needs the test-only build (``XENT_BUILD_EMULATOR=1``); users' installs do not have it.
"""

import contextlib

import torch

from . import _library


def emulated_cuda_available() -> bool:
    return "xent_emulated" in _library.NAMESPACES


@contextlib.contextmanager
def emulated_cuda(schedule: str = "forward", seed: int = 0):
    """Run xent's ops on CPU tensors through the emulated CUDA kernels, with the given warp schedule
    ("forward", "reverse" or "random" with a seed)."""
    if not emulated_cuda_available():
        raise RuntimeError(
            "xent.testing.emulated_cuda() needs the test-only emulator build: "
            "XENT_BUILD_EMULATOR=1 pip install --no-build-isolation -e ."
        )
    torch.ops.xent_emulated._simt_schedule(schedule, seed)
    with _library.selected_ops("xent_emulated"):
        yield
