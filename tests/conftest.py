"""Shared fixtures of the xent test suite.

The ``backend`` fixture runs a parity test on every way xent's kernels can execute:

* ``cpu``: the CPU kernels, always available.
* ``emulated_cuda-<schedule>-<seed>``: the CUDA kernels run by the SIMT emulator on CPU tensors
  (``xent.testing.emulated_cuda``). The full grid runs under the forward warp schedule; the
  ``schedule_backend`` fixture runs a subset under the forward, reverse and two seeded random
  schedules. Needs the test-only build (XENT_BUILD_EMULATOR=1); skipped otherwise.
* ``cuda``: the real CUDA kernels, tensors moved to the GPU; skipped without a GPU.

A test body stays backend-agnostic through two members of the fixture: ``backend.put(t)`` moves a
tensor to the backend's device, and ``with backend.active():`` routes xent's functional API (and the
backward of what it records) to the backend's kernels. Build layouts (transposes, slices, offsets)
after ``put`` so they survive the move.
"""

import contextlib
import gc

import pytest
import torch

import xent


def pytest_configure(config):
    # Also registered in pytest.ini; repeated here so the marker exists when the ini file is not used.
    config.addinivalue_line(
        "markers",
        "huge: an input of more than 2**31 elements (a few GB of memory; runs by default, "
        "deselect with -m 'not huge')",
    )


def pytest_collection_modifyitems(session, config, items):
    """Runs the backends of one parametrized test one after the other (cpu, emulated..., cuda), so the
    float64 references, identical for every backend, are computed once (tests/harness/parity.py caches
    the last few). Otherwise the collection order is kept."""
    first = {}
    keyed = []
    for i, item in enumerate(items):
        callspec = getattr(item, "callspec", None)
        name = "backend" if callspec is not None and "backend" in callspec.params else "schedule_backend"
        if callspec is not None and name in callspec.params:
            others = tuple(sorted((k, repr(v)) for k, v in callspec.params.items() if k != name))
            key = (item.nodeid.split("[", 1)[0], others)
        else:
            key = ("", i)
        first.setdefault(key, i)
        keyed.append((first[key], i, item))
    keyed.sort(key=lambda e: (e[0], e[1]))
    items[:] = [item for _, _, item in keyed]


def pytest_generate_tests(metafunc):
    """The shared tests of a loss (tests/harness/tester.py, LossTester) take their cases from the loss's
    subclass."""
    parametrize_cases = getattr(metafunc.cls, "parametrize_cases", None)
    if parametrize_cases is not None:
        parametrize_cases(metafunc)


class Backend:
    """Where xent's ops run: a device for the tensors and a context that selects the kernels."""

    def __init__(self, name, device, schedule=None, seed=0):
        self.name = name
        self.device = torch.device(device)
        self.schedule = schedule
        self.seed = seed

    @property
    def emulated(self):
        return self.schedule is not None

    @property
    def ops(self):
        """The op namespace of the backend's kernels: torch.ops.xent, or the emulated torch.ops.xent_emulated."""
        return torch.ops.xent_emulated if self.emulated else torch.ops.xent

    def put(self, t):
        """``t`` on the backend's device (None stays None). Keeps ``requires_grad`` as a fresh leaf."""
        if t is None:
            return None
        moved = t.detach().to(self.device)
        return moved.requires_grad_(t.requires_grad)

    @contextlib.contextmanager
    def active(self):
        if self.emulated:
            with xent.testing.emulated_cuda(self.schedule, self.seed):
                yield
        else:
            yield

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) with the backend's kernels selected."""
        with self.active():
            return fn(*args, **kwargs)

    def __repr__(self):
        return f"Backend({self.name})"


EMULATED_SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]
EMULATED_PARAMS = [f"emulated_cuda-{schedule}-{seed}" for schedule, seed in EMULATED_SCHEDULES]

# The full parity grid runs on the CPU, the emulated CUDA kernels under the forward warp schedule, and
# CUDA. The other schedules (reverse, seeded random) run a subset that reaches every kernel path
# (``schedule_backend`` below), which keeps the suite's runtime in minutes.
BACKEND_PARAMS = ["cpu", EMULATED_PARAMS[0], "cuda"]


def make_backend(name):
    """The Backend called ``name``, or pytest.skip with the reason it is unavailable."""
    if name == "cpu":
        return Backend("cpu", "cpu")
    if name.startswith("emulated_cuda"):
        if not xent.testing.emulated_cuda_available():
            pytest.skip(
                "emulated CUDA backend unavailable: xent was built without the test-only SIMT emulator "
                "(rebuild with XENT_BUILD_EMULATOR=1 to run the CUDA kernels on the CPU)"
            )
        _, schedule, seed = name.split("-")
        return Backend(name, "cpu", schedule=schedule, seed=int(seed))
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("cuda backend unavailable: torch.cuda.is_available() is False (no GPU)")
        return Backend("cuda", "cuda")
    raise ValueError(name)


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """cpu, emulated CUDA (forward schedule) and cuda (see the module docstring); unavailable ones skip
    with the reason."""
    return make_backend(request.param)


@pytest.fixture(params=EMULATED_PARAMS)
def schedule_backend(request):
    """The emulated CUDA kernels under every warp schedule: forward, reverse, random (two seeds)."""
    return make_backend(request.param)


def simt_traffic(fn):
    """(fn(), bytes read, bytes written): the global-memory traffic of the emulated CUDA kernels that fn
    runs (the SIMT emulator counts every access through xent::cuda::load_global/store_global)."""
    ops = torch.ops.xent_emulated
    ops._simt_traffic()  # reset
    out = fn()
    read, written = ops._simt_traffic()
    return out, read, written


@pytest.fixture
def cpu_backend():
    return make_backend("cpu")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so failures reproduce when run alone."""
    torch.manual_seed(0)


@pytest.fixture
def restore_isa():
    """Restores the CPU kernels' instruction set after a test that selects others."""
    original = torch.ops.xent._cpu_isa()
    try:
        yield original
    finally:
        torch.ops.xent._cpu_isa(original)


def cpu_has_flag(flag):
    """Whether /proc/cpuinfo lists the CPU feature `flag` (e.g. "avx512_bf16"); False where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def available_isas():
    """The instruction sets the CPU supports: selecting one it lacks raises ValueError."""
    original = torch.ops.xent._cpu_isa()
    found = []
    try:
        for isa in ("avx512", "avx2", "generic"):
            try:
                torch.ops.xent._cpu_isa(isa)
            except ValueError:
                continue
            found.append(isa)
    finally:
        torch.ops.xent._cpu_isa(original)
    return found


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request, restore_isa):
    """Selects each CPU instruction set in turn (restored afterwards); skips those the CPU lacks."""
    try:
        torch.ops.xent._cpu_isa(request.param)
    except ValueError as e:
        pytest.skip(f"CPU instruction set {request.param} not supported by this CPU: {e}")
    assert torch.ops.xent._cpu_isa() == request.param
    return request.param


@pytest.fixture
def restore_num_threads():
    n = torch.get_num_threads()
    try:
        yield n
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def restore_grad_cache():
    capacity, _ = torch.ops.xent._cpu_grad_cache()
    try:
        yield capacity
    finally:
        torch.ops.xent._cpu_grad_cache(capacity)


@pytest.fixture
def free_memory():
    """Collects garbage before and after a memory-hungry test."""
    gc.collect()
    yield
    gc.collect()
