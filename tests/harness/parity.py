"""The parity check every loss's suite runs: xent on a backend against float64 computations of the same
input values, loss and gradients.

A loss plugs in through a ``LossSpec`` (in its test file): how to call xent, the float64 results to
compare with (PyTorch's own loss in float64 where PyTorch has it, the independent reference of
tests/reference*.py), PyTorch in the tested dtype where the loss's error model measures xent against
PyTorch's own error, and the error model itself (``loss_bound`` / ``grad_bound``, built from the pieces of
tests/harness/tolerance.py). ``check_parity`` does the rest:

* lays the inputs out on the backend's device (tests/inputs.py layouts, after ``backend.put``);
* runs xent's loss and checks its dtype, shape and device, and its values against every float64 result;
* differentiates it for an upstream gradient in a given layout and checks each gradient's dtype, shape,
  the strides the fake kernel promises (torch.compile relies on eager returning those), and its values.

Its float64 results depend only on the input values and options, not on the backend: conftest.py runs a
test's backends one after the other, and a small cache computes them once per group.
"""

import collections
import hashlib
import warnings

import torch

from harness.tolerance import LOW, assert_within
from inputs import ALL_LAYOUTS, grad_output_values, lay_out_grad_output


def leaf(t, requires_grad):
    """A fresh contiguous leaf copy of `t` (the float64 computations need no layout; some PyTorch backward
    kernels refuse others)."""
    return t.detach().clone(memory_format=torch.contiguous_format).requires_grad_(requires_grad)


class LossSpec:
    """One loss as the harness sees it: ``loss(input, target, *operands, **options)``, the operands being
    tensors that are not differentiated (weight, pos_weight; None where absent). Subclassed per loss."""

    #: The functional API's name (messages).
    name = None
    #: xent's functional API and PyTorch's counterpart, with the same arguments (the bad inputs of
    #: tests/harness/tester.py call them).
    api = None
    torch_api = None

    def xent(self, input, target, *operands, **options):
        """xent's loss (on whatever backend is active)."""
        return self.api(input, target, *operands, **options)

    def expected(self, input, target, *operands, **options):
        """{name: float64 loss} on float64 arguments, differentiable w.r.t. input (and a floating target):
        every computation xent must agree with."""
        raise NotImplementedError

    def torch_in_dtype(self, input, target, *operands, **options):
        """PyTorch's loss in the arguments' (16-bit) dtype, for ``Bound.no_worse_than_torch``; None when
        the loss's error model does not measure PyTorch's error."""
        return None

    def loss_bound(self, p, against):
        """The Bound of the loss against p.expected[against]."""
        raise NotImplementedError

    def grad_bound(self, p, i, against, grad_output, grads):
        """The Bound of gradient `i` (0: input, 1: target) against grads[against][i], the float64
        gradients for the upstream gradient `grad_output` (its values, in the dtype, on the CPU)."""
        raise NotImplementedError

    def promised_grad_strides(self, input):
        """The strides the fake kernel promises for the gradient of `input` (xent/_common.py: fake_grad_like)."""
        return torch.empty_like(input, memory_format=torch.preserve_format).stride()

    def unit_gradient_first(self, p, backend):
        """Whether a 16-bit gradient of the fused forward + gradient (Note [Fused gradient],
        xent/_fused.py: a differentiated mean/sum on the CPU) needs checking for grad_output = 1 first: its
        first backward rounds the unit gradient to the dtype and scales it, one rounding more than an error
        model built from the kernels' arithmetic has. The harness then checks that first backward with
        ones and a second one (the separate backward op, through the retained graph) with the random
        upstream gradient. (Models measured against PyTorch's own error absorb the extra rounding.)"""
        return False


class Problem:
    """One parity check's inputs and everything computed from them on the CPU: the float64 results
    (``expected``), their gradients for the upstream gradient (``grads``), PyTorch's in the dtype
    (``torch_loss`` / ``torch_grads``, or None), and what the error model memoizes (``memo``)."""

    def __init__(self, spec, input, target, operands, options, grad_output, target_grad, seed):
        self.spec, self.input, self.target, self.operands, self.options = spec, input, target, operands, options
        self.dtype = input.dtype
        self.target_grad = target_grad
        self._memo = {}
        leaves = self._leaves()
        results = self._expected(leaves)
        self.shape = tuple(next(iter(results.values())).shape)
        # The upstream gradient: its values (in the dtype) and, laid out, the one the references take.
        self.grad_output = grad_output_values(self.shape, self.dtype, grad_output, torch.Generator().manual_seed(seed))
        go = lay_out_grad_output(self.grad_output, self.shape, grad_output)
        self.grads = self._grads(results, leaves, go)
        self.expected = {k: v.detach() for k, v in results.items()}
        self.torch_loss = self.torch_grads = None
        if self.dtype in LOW:
            leaves = self._leaves(low=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # size_average/reduce deprecation
                loss = spec.torch_in_dtype(*leaves, *operands, **options)
            if loss is not None:
                self.torch_grads = torch.autograd.grad(loss, self._differentiated(leaves), go)
                self.torch_loss = loss.detach()

    @property
    def differentiates_target(self):
        return self.target_grad and self.target.is_floating_point()

    def _leaves(self, low=False):
        x, t = self.input, self.target
        if not low:
            x = x.double()
            t = t.double() if t.is_floating_point() else t
        return leaf(x, True), (leaf(t, self.differentiates_target) if t.is_floating_point() else t)

    def _differentiated(self, leaves):
        return list(leaves[:2] if self.differentiates_target else leaves[:1])

    def _expected(self, leaves):
        operands = [o.double() if o is not None and o.is_floating_point() else o for o in self.operands]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.spec.expected(*leaves, *operands, **self.options)

    def _grads(self, results, leaves, grad_output):
        go = grad_output.double()
        return {k: torch.autograd.grad(v, self._differentiated(leaves), go) for k, v in results.items()}

    def expected_grads(self, grad_output):
        """{name: [gradient w.r.t. input (, target)]} of every float64 result for `grad_output`."""
        leaves = self._leaves()
        return self._grads(self._expected(leaves), leaves, grad_output)

    def memo(self, key, compute):
        """compute(), once per problem: the bounds and what the error model computes for them (they
        depend on the values only, not on the backend)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


def fingerprint(*values):
    """A digest of tensors (dtype, shape and bytes) and plain values."""
    h = hashlib.blake2b(digest_size=16)
    for v in values:
        if isinstance(v, torch.Tensor):
            h.update(repr((v.dtype, tuple(v.shape))).encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


_PROBLEMS = collections.OrderedDict()
_PROBLEMS_KEPT = 8


def problem(spec, input, target, operands, options, grad_output, target_grad):
    """The Problem of these values (CPU tensors), from the cache when the previous backends computed it.
    The upstream gradient's values are drawn from a generator seeded by the values themselves."""
    key = fingerprint(spec.name, input, target, *operands, sorted(options.items()), grad_output, target_grad)
    if key in _PROBLEMS:
        _PROBLEMS.move_to_end(key)
        return _PROBLEMS[key]
    p = Problem(spec, input, target, operands, options, grad_output, target_grad, seed=int(key[:8], 16))
    _PROBLEMS[key] = p
    while len(_PROBLEMS) > _PROBLEMS_KEPT:
        _PROBLEMS.popitem(last=False)
    return p


class Result:
    """What check_parity ran: xent's loss and gradients (on the backend)."""

    def __init__(self, loss, grads):
        self.loss, self.grads = loss, grads


def check_parity(spec, backend, input, target, *operands, layout="contiguous", target_layout="contiguous",
                 grad_output="random", target_grad=False, **options):
    """Runs `spec`'s xent loss on `backend` and checks loss and gradients against every float64 result of
    the spec, with its error model. `input`, `target` and the operands are contiguous CPU tensors; `layout`
    / `target_layout` (a floating target's) re-lay them out on the backend's device; `grad_output` is the
    upstream gradient's layout (tests/inputs.py GRAD_OUTPUTS); `target_grad` differentiates a floating
    target as well. Returns a Result."""
    xd = ALL_LAYOUTS[layout](backend.put(input)).requires_grad_(True)
    td = backend.put(target)
    if target.is_floating_point():
        td = ALL_LAYOUTS[target_layout](td).requires_grad_(target_grad)
    ods = [backend.put(o) for o in operands]
    with backend.active():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = spec.xent(xd, td, *ods, **options)
    # The float64 results from the values xent sees (a layout may repeat values: "expanded").
    p = problem(spec, xd.detach().cpu(), td.detach().cpu(), operands, options, grad_output, target_grad)

    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    what = f"{spec.name} loss[{backend.name}, {tuple(input.shape)}, {layout}, {opts}]"
    assert loss.dtype == p.dtype, f"{what}: dtype {loss.dtype}, expected the input's {p.dtype}"
    assert tuple(loss.shape) == p.shape, f"{what}: shape {tuple(loss.shape)}, expected {p.shape}"
    assert loss.device.type == backend.device.type, f"{what}: on {loss.device}"
    for against in p.expected:
        bound = p.memo(("loss", against), lambda: spec.loss_bound(p, against))
        assert_within(loss, p.expected[against], bound, what=f"{what} vs {against}")

    inputs = [xd] + ([td] if p.differentiates_target else [])
    # (upstream gradient on the backend, its values, the float64 results' gradients for it)
    checks = [(lay_out_grad_output(backend.put(p.grad_output), p.shape, grad_output),
               lay_out_grad_output(p.grad_output, p.shape, grad_output), p.grads)]
    if spec.unit_gradient_first(p, backend):
        ones = torch.ones(p.shape, dtype=p.dtype)
        checks.insert(0, (backend.put(ones), ones, p.memo("unit grads", lambda: p.expected_grads(ones))))
    for n, (go, go_values, expected) in enumerate(checks):
        with backend.active():
            grads = torch.autograd.grad(loss, inputs, go, retain_graph=n + 1 < len(checks))
        for i, (g, inp) in enumerate(zip(grads, inputs)):
            gwhat = f"{spec.name} {['grad_input', 'grad_target'][i]}[{backend.name}, {tuple(input.shape)}, {layout}, {opts}]"
            if len(checks) > 1:
                gwhat += f" (grad_output {'ones' if n == 0 else grad_output})"
            assert g is not None, f"{gwhat}: no gradient"
            assert g.dtype == inp.dtype, f"{gwhat}: dtype {g.dtype} != input's {inp.dtype}"
            assert g.shape == inp.shape, f"{gwhat}: shape {tuple(g.shape)} != input's {tuple(inp.shape)}"
            if i == 0 and g.numel() > 1:
                promised = spec.promised_grad_strides(inp)
                assert g.stride() == promised, (
                    f"{gwhat}: strides {g.stride()} != {promised} promised by the fake kernel (input strides "
                    f"{inp.stride()})"
                )
            for against in expected:
                bound = p.memo(("grad", id(expected), i, against),
                               lambda: spec.grad_bound(p, i, against, go_values, expected))
                assert_within(g, expected[against][i], bound, what=f"{gwhat} vs {against}")
    return Result(loss, grads)
