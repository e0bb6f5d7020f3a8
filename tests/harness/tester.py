"""The tests every loss passes, written once: ``LossTester``. A loss's test file subclasses it, sets its
``spec`` (tests/harness/parity.py) and fills the case tables; conftest.py parametrizes each shared test by
its class's table (``LossTester.parametrize_cases``):

* ``test_opcheck``: torch.library.opcheck of every sample of ``opcheck_samples`` in every op namespace
  (the CPU ops and, in the test-only build, the emulated CUDA ops), and ``test_opcheck_covers_every_op``:
  the samples reach each op of ``OPS`` in each namespace;
* ``test_compile_fullgraph``: torch.compile(fullgraph=True, dynamic=True) of ``COMPILE_CASES``, forward and
  backward, compiled once for two batch sizes, equal to eager xent;
* ``test_gradcheck`` / ``test_gradgradcheck_through_grad_output``: float64 gradcheck and gradgradcheck of
  ``GRADCHECK_CASES`` on every backend, the second also w.r.t. the upstream gradient;
* ``test_deterministic_*``: ``DETERMINISM_CASES`` bitwise the same on repeated runs (every backend), for
  any CPU thread count and under every warp schedule of the emulated CUDA kernels;
* ``test_bad_inputs``: ``BAD_INPUTS`` raise what PyTorch raises (or return its value);
* ``test_emulated_schedules``: ``SCHEDULE_CASES``, parity checks reaching every CUDA kernel path, under
  every warp schedule;
* ``test_empty_strided_input``: an empty input whose strides fit no kernel layout, with each target of
  ``EMPTY_TARGETS``, for every reduction: PyTorch's loss and an empty gradient;
* ``test_module_matches_torch``: ``MODULE_CASES``, xent.nn's module against torch.nn's counterpart.
"""

import dataclasses
import functools
import warnings
from typing import Callable, Optional

import pytest
import torch

import xent
from bitwise import assert_bitwise
from conftest import EMULATED_SCHEDULES, make_backend
from inputs import fixed_rng


def op_namespaces():
    """The CPU ops and, in the test-only build, the emulated CUDA ops."""
    return ["xent"] + (["xent_emulated"] if xent.testing.emulated_cuda_available() else [])


def op_name(op):
    return op._qualified_op_name.split("::")[-1]


@dataclasses.dataclass
class CompileCase:
    """fn(*make_args(N)) compiled with `compiler` for each batch size N in `sizes`. The arguments at
    `differentiate` are differentiated (upstream gradient linspace(-1, 1)). Compiled and eager run the
    same kernels on the same values: bitwise equal, unless a tolerance (rtol, atol) for the loss or the
    gradients says that torch.compile may reorder PyTorch ops around them."""

    compiler: str
    fn: Callable
    make_args: Callable
    differentiate: tuple = (0,)
    sizes: tuple = (5, 9)
    loss_tolerance: Optional[tuple] = None
    grad_tolerance: Optional[tuple] = None


@dataclasses.dataclass
class BadInput:
    """The public API called with `args` / `kwargs`. xent raises what PyTorch's counterpart raises (the
    same exception type or a subclass) with a message naming the problem (one of `words`, lower case), or
    returns its value where it returns one. `intended`: why xent raises RuntimeError where PyTorch accepts
    (README, "Where xent deliberately differs")."""

    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    words: tuple = ()
    intended: Optional[str] = None


@dataclasses.dataclass
class ModuleCase:
    """xent.nn.`name`(**kwargs, **xent_kwargs) against torch.nn.`torch_name` (default: `name`)(**kwargs) on
    float64 `inputs`() = (input, target)."""

    name: str
    kwargs: dict
    inputs: Callable
    torch_name: Optional[str] = None
    xent_kwargs: dict = dataclasses.field(default_factory=dict)


# torch.testing.assert_close's default (rtol, atol) per dtype.
_ASSERT_CLOSE_DEFAULTS = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
                          torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7)}


def _least_precise(tensors):
    dtypes = [t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.dtype in _ASSERT_CLOSE_DEFAULTS]
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


class LossTester:
    """Base class of a loss's shared tests (see the module docstring). A subclass sets the attributes
    below and implements the methods that build its tables' cases."""

    #: The loss (tests/harness/parity.py LossSpec); its ``api`` / ``torch_api`` serve the bad inputs.
    spec = None
    #: Every op of the loss, without namespace: the opcheck samples must reach each.
    OPS = ()
    COMPILE_CASES = {}
    GRADCHECK_CASES = {}
    DETERMINISM_CASES = {}
    BAD_INPUTS = {}
    #: The backends the bad inputs run on: the host checks of the CPU ops, and of the CUDA kernels'
    #: launch code where its errors are PyTorch's too.
    BAD_INPUT_BACKENDS = ("cpu",)
    SCHEDULE_CASES = {}
    #: {kind: fn(input) -> target} for test_empty_strided_input.
    EMPTY_TARGETS = {}
    MODULE_CASES = {}

    # ---- what a subclass implements for its tables ------------------------------------------------

    @classmethod
    def opcheck_samples(cls, ns):
        """[(op, args, kwargs)] of the ops in namespace `ns` (built under a fixed seed)."""
        raise NotImplementedError

    def gradcheck_problem(self, case, backend):
        """(fn, inputs) of GRADCHECK_CASES' `case`: fn(*inputs) is the loss, the inputs float64 tensors on
        the backend's device, those that require grad differentiated."""
        raise NotImplementedError

    def determinism_run(self, backend, case, kernels_only=False):
        """The outputs (losses, gradients) of DETERMINISM_CASES' `case`, fresh tensors of the same values
        on every call; `kernels_only`: only what xent's kernels compute (a gradient some loss computes
        with PyTorch ops rounds by how those split the elements among threads)."""
        raise NotImplementedError

    def run_schedule_case(self, backend, case):
        """The parity checks of SCHEDULE_CASES' `case` on `backend`."""
        raise NotImplementedError

    # ---- parametrization ----------------------------------------------------------------------------

    @classmethod
    @functools.cache
    def opcheck_params(cls):
        params = []
        for ns in op_namespaces():
            with fixed_rng(0):  # built at collection, before the per-test seed: the same samples every run
                samples = cls.opcheck_samples(ns)
            params += [pytest.param(s, id=f"{ns}-{op_name(s[0])}-{j}") for j, s in enumerate(samples)]
        return params

    @classmethod
    def parametrize_cases(cls, metafunc):
        """Called by conftest.py's pytest_generate_tests for the tests of a LossTester subclass."""
        tables = {
            "compile_case": cls.COMPILE_CASES,
            "gradcheck_case": cls.GRADCHECK_CASES,
            "determinism_case": cls.DETERMINISM_CASES,
            "schedule_case": cls.SCHEDULE_CASES,
            "module_case": cls.MODULE_CASES,
        }
        if "opcheck_sample" in metafunc.fixturenames:
            metafunc.parametrize("opcheck_sample", cls.opcheck_params())
        if "empty_case" in metafunc.fixturenames:
            metafunc.parametrize("empty_case", [pytest.param((r, k), id=f"{r}-{k}")
                                                for r in ("none", "mean", "sum") for k in cls.EMPTY_TARGETS])
        if "bad_input" in metafunc.fixturenames:
            metafunc.parametrize("bad_input", [
                pytest.param((name, backend), id=f"{name}-{backend}")
                for name in cls.BAD_INPUTS for backend in cls.BAD_INPUT_BACKENDS
            ])
        for arg, table in tables.items():
            if arg in metafunc.fixturenames:
                metafunc.parametrize(arg, list(table), ids=str)

    # ---- the shared tests ---------------------------------------------------------------------------

    def test_opcheck(self, opcheck_sample):
        op, args, kwargs = opcheck_sample
        torch.library.opcheck(op, args, kwargs)

    def test_opcheck_covers_every_op(self):
        covered = {p.values[0][0]._qualified_op_name for p in self.opcheck_params()}
        assert covered == {f"{ns}::{op}" for ns in op_namespaces() for op in self.OPS}

    def test_compile_fullgraph(self, compile_case):
        from torch._dynamo.testing import CompileCounterWithBackend

        case = self.COMPILE_CASES[compile_case]
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(case.compiler)
        compiled = torch.compile(case.fn, fullgraph=True, dynamic=True, backend=counter)
        frames = []
        for n in case.sizes:
            args = case.make_args(n)
            outs = []
            for fn in (compiled, case.fn):
                leaves = [a.detach().clone().requires_grad_() if i in case.differentiate else a
                          for i, a in enumerate(args)]
                loss = fn(*leaves)
                go = torch.linspace(-1.0, 1.0, loss.numel(), dtype=loss.dtype).view(loss.shape)
                grads = torch.autograd.grad(loss, [leaves[i] for i in case.differentiate], go)
                outs.append((loss.detach(), grads))
            (loss_c, grads_c), (loss_e, grads_e) = outs
            pairs = [(loss_c, loss_e, "loss", case.loss_tolerance)]
            pairs += [(a, b, "gradient", case.grad_tolerance) for a, b in zip(grads_c, grads_e)]
            for a, b, what, tolerance in pairs:
                assert a.dtype == b.dtype and a.shape == b.shape, f"{compile_case}: compiled {what}'s metadata"
                if tolerance is None:  # the same kernels on the same values
                    assert torch.equal(a, b), f"{compile_case}: compiled {what} differs from eager by " \
                                              f"{(a.double() - b.double()).abs().max().item()}"
                else:
                    torch.testing.assert_close(a, b, rtol=tolerance[0], atol=tolerance[1])
            frames.append(counter.frame_count)
        # (frame_count counts compiler calls: a restarted analysis of the first call may count twice.)
        assert frames[0] >= 1 and all(f == frames[0] for f in frames), (
            f"{compile_case}: dynamic=True recompiled for a new batch size: {frames}")

    def test_gradcheck(self, backend, gradcheck_case):
        fn, inputs = self.gradcheck_problem(self.GRADCHECK_CASES[gradcheck_case], backend)
        with backend.active():
            assert torch.autograd.gradcheck(fn, inputs)
            assert torch.autograd.gradgradcheck(fn, inputs)

    def test_gradgradcheck_through_grad_output(self, backend, gradcheck_case):
        """The input's gradient as a function of the inputs and the upstream gradient (grad_loss is an
        input of the backward ops): their own autograd."""
        fn, inputs = self.gradcheck_problem(self.GRADCHECK_CASES[gradcheck_case], backend)
        with backend.active():
            loss = fn(*[t.detach() for t in inputs])
        go = torch.randn(loss.shape, dtype=torch.float64).to(loss.device).requires_grad_()

        def first_grad(*args):
            *ins, go = args
            with backend.active():
                return torch.autograd.grad(fn(*ins), ins[0], go, create_graph=True)[0]

        with backend.active():
            assert torch.autograd.gradcheck(first_grad, (*inputs, go))

    def test_deterministic_repeated_runs(self, backend, determinism_case):
        case = self.DETERMINISM_CASES[determinism_case]
        first = self.determinism_run(backend, case)
        for _ in range(2):
            assert_bitwise(first, self.determinism_run(backend, case), f"{determinism_case}: repeated run")

    def test_deterministic_across_thread_counts(self, cpu_backend, restore_num_threads, determinism_case):
        case = self.DETERMINISM_CASES[determinism_case]
        torch.set_num_threads(1)
        one = self.determinism_run(cpu_backend, case, kernels_only=True)
        for n in sorted({2, 3, restore_num_threads}):
            torch.set_num_threads(n)
            for run in ("a run", "a repeated run"):
                assert_bitwise(one, self.determinism_run(cpu_backend, case, kernels_only=True),
                               f"{determinism_case}: 1 thread vs {run} on {n}")

    def test_deterministic_across_warp_schedules(self, determinism_case):
        """The CUDA kernels (under the emulator) give bitwise identical results under every warp schedule:
        their reductions' order does not depend on timing."""
        case = self.DETERMINISM_CASES[determinism_case]
        runs = [(f"{s}-{seed}", self.determinism_run(make_backend(f"emulated_cuda-{s}-{seed}"), case))
                for s, seed in EMULATED_SCHEDULES]
        for name, out in runs[1:]:
            assert_bitwise(runs[0][1], out, f"{determinism_case}: schedule {runs[0][0]} vs {name}")

    def test_bad_inputs(self, bad_input):
        """Whatever PyTorch raises for the case, xent raises the same exception type (or a subclass) with
        a message naming the problem; where PyTorch does not raise, xent returns PyTorch's value."""
        name, backend_name = bad_input
        case = self.BAD_INPUTS[name]
        backend = make_backend(backend_name)
        warnings.simplefilter("ignore")  # deprecated arguments (reduction='elementwise_mean'); pytest restores

        def call_xent():
            with backend.active():
                return self.spec.api(*case.args, **case.kwargs)

        def check_message(err):
            message = str(err).lower()
            assert not case.words or any(w in message for w in case.words), (
                f"{name}: xent's message {str(err)!r} names none of {case.words}")

        if case.intended is not None:
            with pytest.raises(RuntimeError) as info:
                call_xent()
            check_message(info.value)
            return
        try:
            expected = self.spec.torch_api(*case.args, **case.kwargs)
            torch_error = None
        except Exception as e:  # noqa: BLE001
            torch_error = e
        if torch_error is None:
            got = call_xent()
            assert got.device == expected.device and got.dtype == expected.dtype and got.shape == expected.shape, (
                f"{name}: PyTorch returns {expected.dtype} {tuple(expected.shape)} on {expected.device}, xent "
                f"{got.dtype} {tuple(got.shape)} on {got.device}"
            )
            if got.device.type != "meta":
                # This checks behaviour (no error, PyTorch's value), not accuracy: assert_close's defaults
                # for the least precise argument (PyTorch may compute mixed dtypes partly in it).
                arguments = list(case.args) + list(case.kwargs.values()) + [expected]
                rtol, atol = _ASSERT_CLOSE_DEFAULTS[_least_precise(arguments)]
                torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, equal_nan=True)
            return
        with pytest.raises(Exception) as info:
            call_xent()
        assert isinstance(info.value, type(torch_error)), (
            f"{name}: PyTorch raises {type(torch_error).__name__}({torch_error}); xent raises "
            f"{type(info.value).__name__}({info.value})"
        )
        check_message(info.value)

    def test_emulated_schedules(self, schedule_backend, schedule_case):
        self.run_schedule_case(schedule_backend, self.SCHEDULE_CASES[schedule_case])

    def test_empty_strided_input(self, empty_case):
        """An empty input whose strides fit no kernel layout (found by a fuzzer: contiguous() returns an
        empty tensor unchanged, and cross-entropy's layout plan asserted; its fused path recursed without
        end): PyTorch's loss, and a gradient of the input's shape."""
        reduction, kind = empty_case
        x = torch.zeros(0, 3, 4)[..., ::2].requires_grad_()
        target = self.EMPTY_TARGETS[kind](x.detach())
        loss = self.spec.api(x, target, reduction=reduction)
        want = self.spec.torch_api(x, target, reduction=reduction)
        assert loss.shape == want.shape
        torch.testing.assert_close(loss, want, equal_nan=True)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert g.shape == x.shape

    def test_module_matches_torch(self, module_case):
        """The module's attributes, loss and gradient (float64: 1e-12 relative, summation order only), its
        buffers and state_dict, which load into the other class and back."""
        case = self.MODULE_CASES[module_case]
        ours_cls = functools.partial(getattr(xent.nn, case.name), **case.xent_kwargs)
        theirs_cls = getattr(torch.nn, case.torch_name or case.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # size_average / reduce
            ours, theirs = ours_cls(**case.kwargs), theirs_cls(**case.kwargs)
        assert isinstance(ours, torch.nn.Module)
        for attr in ("reduction", "ignore_index", "label_smoothing"):
            assert getattr(ours, attr, None) == getattr(theirs, attr, None), attr
        x, t = case.inputs()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = ours(xa, t), theirs(xb, t)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        go = torch.randn(a.shape, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(a, xa, go)[0], torch.autograd.grad(b, xb, go)[0],
                                   rtol=1e-12, atol=1e-12)
        assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()
        state = ours.state_dict()
        assert state.keys() == theirs.state_dict().keys()
        for k in state:
            assert torch.equal(state[k], theirs.state_dict()[k]), k
        # Each class loads the other's state_dict into a module built with other buffer values.
        tensors = {k: v for k, v in case.kwargs.items() if isinstance(v, torch.Tensor)}
        for source, cls in ((theirs, ours_cls), (ours, theirs_cls)):
            fresh = cls(**{k: torch.zeros_like(v) for k, v in tensors.items()})
            fresh.load_state_dict(source.state_dict())
            for k, v in tensors.items():
                assert torch.equal(getattr(fresh, k), v), k
