"""The registrar: fake kernels and autograd of every loss op, from one table (xent/_ops.py).

Every loss's ops follow one convention (csrc/ops.cpp, Note [xent op conventions]):

    {name}_fwd(input, target, *options, **kw)                  -> loss, or (loss, *saved)
    {name}_bwd(grad_loss, input, target, *options, *saved, **kw) -> grad_input
    {name}_fwd_grad(input, target, *options, **kw)             -> (loss, *saved, grad_input)

``options`` are tensors that get no gradient (weight, pos_weight); ``saved`` are forward outputs that the
backward op reuses (lse, total_weight), not differentiable; ``kw`` the keyword-only arguments (reduction,
ignore_index, label_smoothing, gamma...). ``{name}_fwd_grad``, the fused forward + gradient, exists for the
entries marked ``fused`` (Note [Fused gradient] in xent/_fused.py). How many options and saved outputs an
op has, and the defaults of its arguments, are read from its schema.

A ``LossOps`` entry names one such set of ops (a loss and a target kind: ``cross_entropy`` and
``cross_entropy_prob`` are two entries) and gives what differs between them: the fake kernels' checks and
outputs, and the formulas written with PyTorch ops (the target's gradient, the backward op's own gradient
for double backward). ``register(table)`` registers every entry in every op namespace (NAMESPACES: the
real kernels and, in the test build, the emulated CUDA ones); the functional API of the softmax losses
picks its ops from their entries. Each argument is checked once per layer: the functional API raises
PyTorch's exception types, the fake kernels (``check``) refuse from metadata alone what the kernels refuse
(``torch._check``), and the C++ kernels check what they rely on.

What the coming changes add, each in one place:

* A keyword argument (z_loss, softcap, logit_scale): appended to the schemas in csrc/ops.cpp. The fakes
  receive it with its schema default and autograd hands it to the formulas in ``kw``, with no change here;
  its fake check is one more function in the entry's ``check`` (as softmax focal's gamma check), and the
  functional API passes it on.
* An output (return_lse, entropy, accuracy): appended to the schema's returns and to the entry's
  ``fake_outputs``. The convention above saves every output after the loss for the backward op; with
  outputs the backward op does not take, a field of the entry says which it takes (``_arity`` and the
  setup functions read it), and a differentiable output (lse for return_lse) a field with its gradient
  formula, which ``_register_autograd``'s forward backward adds to grad_input.
* A forward-mode AD (jvp) rule: a field ``jvp`` of the entry. ``torch.library.register_autograd`` has no
  forward-mode hook, so ``_register_autograd`` then registers, at the Autograd key, an
  ``autograd.Function`` with the same setup, backward and that jvp.
* A vmap batching rule or an autocast policy: a field of the entry, registered in ``register`` with
  ``torch.library.register_vmap`` or ``torch.library.register_autocast`` for each of its ops.
"""

import dataclasses
from typing import Callable, Optional

import torch

from . import _fused
from ._library import NAMESPACES, REDUCTION_MEAN, REDUCTION_SUM


@dataclasses.dataclass
class LossOps:
    """One entry of the table: the ops ``{name}_fwd``, ``{name}_bwd`` and, if ``fused``, ``{name}_fwd_grad``.

    Fake kernels (all of them get the op's arguments split as input, target, options (tuple), kw (dict,
    with the schema's defaults), tensors: every tensor argument but the input, in the op's order):

    * ``check(input, target, options, kw, tensors)``: the checks that need only metadata, raising what the
      kernels raise.
    * ``fake_outputs(input, kw)``: the forward op's outputs, a tuple (loss, *saved).
    * ``fake_grad(input)``: grad_input, with the strides the kernels give it.

    Autograd (formulas with PyTorch ops, differentiable; ``options`` and ``saved`` are tuples of tensors):

    * ``double_backward(grad_loss, input, target, options, saved, kw, v, needs_input_grad)``: the backward
      op's gradients (grad_grad_loss, grad_input, grad_target) for the incoming gradient v of its output;
      ``needs_input_grad`` is the backward op's.
    * ``target_grad(grad_loss, input, target, options, saved, kw)``: d loss / d target in the target's
      dtype, for the losses whose target is differentiable (None: the target never requires grad).
    """

    name: str
    check: Callable
    fake_outputs: Callable
    fake_grad: Callable
    double_backward: Callable
    target_grad: Optional[Callable] = None
    fused: bool = False
    # The op names, for the functional API (fwd_grad: None without a fused op).
    fwd: str = dataclasses.field(init=False)
    bwd: str = dataclasses.field(init=False)
    fwd_grad: Optional[str] = dataclasses.field(init=False)

    def __post_init__(self):
        self.fwd = f"{self.name}_fwd"
        self.bwd = f"{self.name}_bwd"
        self.fwd_grad = f"{self.name}_fwd_grad" if self.fused else None


def register(table) -> None:
    """Registers the fake kernels and autograd of every entry of `table` in every op namespace."""
    for ns in NAMESPACES:
        for entry in table:
            _register_fakes(ns, entry)
            _register_autograd(ns, entry)


def _schema(ns, op_name):
    return getattr(getattr(torch.ops, ns), op_name).default._schema


def _arity(ns, entry):
    """(number of options, number of saved outputs) of the entry's forward op."""
    schema = _schema(ns, entry.fwd)
    positional = [a for a in schema.arguments if not a.kwarg_only]
    return len(positional) - 2, len(schema.returns) - 1


def _argument_binder(schema):
    """A function turning a fake kernel's (args, kwargs) into the full positional arguments and keyword
    arguments: the dispatcher leaves out trailing positional and keyword-only arguments equal to their
    defaults."""
    positional_defaults = [a.default_value for a in schema.arguments if not a.kwarg_only]
    keyword_defaults = {a.name: a.default_value for a in schema.arguments if a.kwarg_only}

    def bind(args, kwargs):
        return tuple(args) + tuple(positional_defaults[len(args) :]), {**keyword_defaults, **kwargs}

    return bind


def _register_fakes(ns, entry):
    n_options, _ = _arity(ns, entry)
    # Each op bound with its own schema: defaults may differ (sigmoid_focal_loss_fwd_grad's reduction).
    bind_fwd, bind_bwd = (_argument_binder(_schema(ns, op)) for op in (entry.fwd, entry.bwd))

    def check_forward(bind, args, kwargs):
        """A forward op's (input, kw) from its fake's arguments, after the entry's checks."""
        (input, target, *options), kw = bind(args, kwargs)
        entry.check(input, target, tuple(options), kw, (target, *options))
        return input, kw

    @torch.library.register_fake(f"{ns}::{entry.fwd}")
    def _(*args, **kwargs):
        input, kw = check_forward(bind_fwd, args, kwargs)
        outputs = entry.fake_outputs(input, kw)
        return outputs if len(outputs) > 1 else outputs[0]

    @torch.library.register_fake(f"{ns}::{entry.bwd}")
    def _(*args, **kwargs):
        (grad_loss, input, target, *rest), kw = bind_bwd(args, kwargs)
        entry.check(input, target, tuple(rest[:n_options]), kw, (grad_loss, target, *rest))
        return entry.fake_grad(input)

    if entry.fused:
        bind_fwd_grad = _argument_binder(_schema(ns, entry.fwd_grad))

        @torch.library.register_fake(f"{ns}::{entry.fwd_grad}")
        def _(*args, **kwargs):
            input, kw = check_forward(bind_fwd_grad, args, kwargs)
            reduction = kw["reduction"]
            torch._check(
                reduction in (REDUCTION_MEAN, REDUCTION_SUM),
                lambda: f"{entry.fwd_grad}: reduction must be mean (1) or sum (2), got {reduction}",
            )
            return (*entry.fake_outputs(input, kw), entry.fake_grad(input))


def _save_inputs(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.kw = keyword_only_inputs


def _save_inputs_and_outputs(ctx, inputs, keyword_only_inputs, output):
    saved = output[1:]
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(*inputs, *saved)
    ctx.kw = keyword_only_inputs


def _register_autograd(ns, entry):
    n_options, n_saved = _arity(ns, entry)
    bwd_op = getattr(getattr(torch.ops, ns), entry.bwd)
    target_grad = entry.target_grad
    no_option_grads = (None,) * n_options
    no_option_or_saved_grads = (None,) * (n_options + n_saved)

    def options_and_saved(rest):
        return tuple(rest[:n_options]), tuple(rest[n_options:])

    def backward(ctx, grad_loss, *_saved_grads):
        # What the forward saved, its inputs and saved outputs, are the backward op's arguments after grad_loss.
        arguments = ctx.saved_tensors
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_input = bwd_op(grad_loss, *arguments, **ctx.kw)
        if target_grad is not None and ctx.needs_input_grad[1]:
            input, target, *rest = arguments
            grad_target = target_grad(grad_loss, input, target, *options_and_saved(rest), ctx.kw)
        return (grad_input, grad_target, *no_option_grads)

    setup = _save_inputs_and_outputs if n_saved else _save_inputs
    torch.library.register_autograd(f"{ns}::{entry.fwd}", backward, setup_context=setup)

    if entry.fused:
        _fused.register_fused_autograd(ns, entry.fwd_grad, bwd_op)

    def double_backward(ctx, v):
        grad_loss, input, target, *rest = ctx.saved_tensors
        options, saved = options_and_saved(rest)
        grads = entry.double_backward(grad_loss, input, target, options, saved, ctx.kw, v, ctx.needs_input_grad)
        return (*grads, *no_option_or_saved_grads)

    torch.library.register_autograd(f"{ns}::{entry.bwd}", double_backward, setup_context=_save_inputs)
