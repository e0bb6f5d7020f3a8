"""The C allocator's state during timing, shared by both benchmark scripts.

Why: eager PyTorch and torch.compile allocate their temporaries and gradients with the C allocator (glibc
malloc on Linux). glibc returns freed memory to the OS (every block above its mmap threshold, which adapts
up to 32 MiB; and the heap's top once it exceeds the trim threshold), and whether it does for a given
tensor depends on the heap's history: what else ran since, down to the order of small frees. A returned
block is faulted back in, page by page, on its next use (about 90 ms per GiB here). Measured on
2026-12-04 at 65536 x 80 fp32, eager's softmax-focal forward + backward took 7.1 ms with 620 page faults
per call when timed between xent's raw op calls, and 12-14.6 ms with 4600-6000 faults between calls of
xent's Python API: the same work, slower only because of the interleaving. xent's own gradient buffers
never take that cost (they are cached, csrc/cpu/grad_buffer.h), so the noise favoured xent.

``keep_freed_memory()`` tells glibc to serve every allocation from its heap (M_MMAP_MAX = 0) and never
trim it (M_TRIM_THRESHOLD at its maximum): memory freed by one iteration is reused, resident, by the
next, as a caching allocator (tcmalloc, jemalloc, PyTorch's CUDA allocator) would. That is the baselines'
best and steadiest case for tensors of tens of MiB. The scripts apply it after their correctness phase,
to the timing only (peak memory is measured in fresh processes with the allocator's defaults).

bench_losses.py (tensors up to 21 MiB) times with it by default. bench_cross_entropy.py does not
(``--malloc default``): with its 250 MiB to 1 GiB tensors, after its correctness phase, the warm setting
made eager slower, not faster (4096 x 32000 fp32: 1200 ms against 445 ms with the defaults, with much
system time), while with the defaults every tensor above 32 MiB is mmapped and faulted in on each call,
a cost that does not depend on the heap's history. ``--malloc warm`` there remains for experiments.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_MAX_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int

MODES = ("warm", "default")


def keep_freed_memory() -> str:
    """Applies the warm setting (see the module docstring); returns a description for the results."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (no glibc mallopt here)"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _MAX_TRIM_THRESHOLD) == 1
    if not ok:
        return "default (mallopt refused)"
    return "warm (glibc: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"


def apply(mode: str) -> str:
    """Sets the allocator state for timing from a ``--malloc`` value; returns what was set."""
    if mode == "warm":
        return keep_freed_memory()
    if mode == "default":
        return "default"
    raise ValueError(f"unknown malloc mode {mode!r}; expected one of {MODES}")
