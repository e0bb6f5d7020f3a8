"""The negative log-likelihood's ops (``nll_loss_fwd``, ``nll_loss_bwd``; schemas in csrc/ops.cpp): their
entry in the op table (xent/_registrar.py) and the backward op's own gradient.

The forward op returns (loss, total_weight): total_weight, the mean's denominator (the summed weights of
the non-ignored targets, a scalar in the input's dtype), is saved for the backward op as in ATen.
"""

from ._common import (
    check_index_target,
    class_loss_check,
    fake_grad_like,
    fake_loss,
    index_target_terms,
    position_shape,
    reduce_like_loss,
)
from ._registrar import LossOps


def _fake_outputs(input, kw):
    return fake_loss(input, kw["reduction"], position_shape(input)), input.new_empty(())


def _double_backward(grad_loss, input, target, options, saved, kw, v, needs_input_grad):
    # grad_input = -s w_t onehot(t) is linear in grad_loss and constant in the input.
    (weight,), (total_weight,) = options, saved
    grad_grad_loss = None
    if needs_input_grad[0]:
        _, _, w_t, onehot = index_target_terms(input, target, weight, kw["ignore_index"])
        per_position = -(onehot * v.to(w_t.dtype)).sum(1) * w_t
        grad_grad_loss = reduce_like_loss(per_position, kw["reduction"], total_weight.to(w_t.dtype)).to(grad_loss.dtype)
    return grad_grad_loss, None, None


NLL = LossOps(
    "nll_loss",
    check=class_loss_check(check_index_target),
    fake_outputs=_fake_outputs,
    fake_grad=fake_grad_like,
    double_backward=_double_backward,
)
