"""Fused forward + gradient: the gradient computed in the forward's pass over the input.

Note [Fused gradient]
---------------------
Training computes a loss and at once its gradient. The separate backward op reads the whole input a
second time (and, for the softmax losses, recomputes every exp); when the forward already holds the input
in registers or cache it can write the gradient for grad_loss = 1 at little extra cost. So when a loss
call will be differentiated (its input requires grad, grad mode is on, no other argument requires grad,
reduction is 'mean' or 'sum', the input is on the CPU) the Python API calls the `*_fwd_grad` op instead
of `*_fwd`, and the backward is:

* the usual ``loss.backward()`` (grad_loss exactly 1): return the saved gradient. ``scale_grad_`` reads
  grad_loss in its kernel (a CPU scalar: no device synchronization, no Python branch on data) and does
  nothing. Autograd hands the tensor on without a copy (AccumulateGrad steals it into ``.grad``).
* any other grad_loss (a GradScaler's scale, 1 / accumulation steps): ``scale_grad_`` multiplies the saved
  gradient in place, one streaming pass. Rounding: the unit gradient is rounded to the input's dtype, then
  scaled and rounded again, so for 16-bit inputs the result may differ from the separate backward op by
  an ulp (not at all for powers of two, as GradScaler uses).
* ``create_graph=True`` (double backward) and any second backward through a retained graph take the
  separate, differentiable backward op on the saved inputs: the saved gradient is not differentiable, and
  the first backward may have scaled it in place. (Under torch.compile, PyTorch refuses a second backward
  through a compiled graph whose backward reuses saved buffers, with its own clear error.)

What it costs: the gradient is allocated in the forward instead of the backward, so it lives between the
two (for a loss, computed just before its backward, the peak is unchanged), and a forward that is never
differentiated despite requires_grad pays for the gradient. ``XENT_FUSED_GRAD=0`` in the environment (read
at import) turns the fused path off.
"""

import os

import torch

ENABLED = os.environ.get("XENT_FUSED_GRAD", "1") != "0"


def use_fused_grad(ops, reduction: int, input: torch.Tensor, *others) -> bool:
    """Whether a loss call should take its `*_fwd_grad` op (see the note above). ``ops`` is the active op
    namespace: the fused ops have CPU kernels in ``torch.ops.xent`` only. ``reduction`` is the op code
    (0 none, 1 mean, 2 sum)."""
    return (
        ENABLED
        and reduction != 0
        and ops is torch.ops.xent
        and input.device.type == "cpu"
        and input.requires_grad
        and torch.is_grad_enabled()
        and not any(t is not None and t.requires_grad for t in others)
    )


def register_fused_autograd(ns: str, op_name: str, separate_backward_op) -> None:
    """Autograd of a `*_fwd_grad` op ``ns::op_name`` whose last output is the unit gradient of its first
    tensor argument (the input) and whose other outputs are not differentiable.

    ``separate_backward_op`` is the separate, differentiable backward op, called as
    ``separate_backward_op(grad_loss, *inputs, *outputs, **kw)``: ``inputs`` are the fused op's positional
    arguments, ``outputs`` its outputs between the loss and the gradient (lse for the softmax losses),
    ``kw`` its keyword-only arguments (the convention of xent/_registrar.py).
    """

    def setup_context(ctx, inputs, keyword_only_inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        # The gradient output is as large as the input: autograd must not build a zero tensor for its
        # (never used) incoming gradient, as it otherwise does for every output without one.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs, *output[1:])
        ctx.num_inputs = len(inputs)
        ctx.kw = keyword_only_inputs
        ctx.gradient_used = False

    def backward(ctx, grad_loss, *_unused):
        if grad_loss is None:  # not materialized (see setup_context): the loss got no gradient
            return (None,) * ctx.num_inputs
        saved = ctx.saved_tensors
        inputs, outputs = saved[: ctx.num_inputs], saved[ctx.num_inputs :]
        if ctx.gradient_used or torch.is_grad_enabled():
            grad_input = separate_backward_op(grad_loss, *inputs, *outputs[:-1], **ctx.kw)
        else:
            ctx.gradient_used = True
            grad_input = outputs[-1]
            torch.ops.xent.scale_grad_(grad_input, grad_loss)
        return (grad_input,) + (None,) * (ctx.num_inputs - 1)

    torch.library.register_autograd(f"{ns}::{op_name}", backward, setup_context=setup_context)


@torch.library.register_fake("xent::scale_grad_")
def _(grad, grad_loss):
    torch._check(grad_loss.numel() == 1, lambda: f"scale_grad_: grad_loss must have one element, got {grad_loss.shape}")
    return None
