"""Helpers shared by the op families (xent/_*_ops.py) and the functional API.

Shapes and dtypes of the per-position tensors of the class losses (cross-entropy, NLL, softmax focal: input
(N, C, *), one loss per position (N, *)); the upstream gradient and its adjoint; class weights and
class-index targets as tensors; the fake kernels' checks and outputs shared by the class losses.
"""

from typing import Optional

import torch
from torch import Tensor

from ._library import REDUCTION_MEAN, REDUCTION_NONE
from ._registrar import LossOps


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for float64 inputs, float32 for every other."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def position_shape(logits: Tensor) -> tuple:
    """Shape of the per-position tensors (loss with reduction='none', lse): the logits' without dim 1."""
    return (logits.shape[0],) + tuple(logits.shape[2:])


def position_count(logits: Tensor):
    """N * d1 * ... * dk, the probability-target mean's denominator, kept symbolic under dynamic shapes
    (float() or numel() // C would specialize the compiled graph on the batch size)."""
    count = 1
    for size in position_shape(logits):
        count = count * size
    return count


# ------------------------------------------------------------------------------------------------
# The upstream gradient. A loss is reduce(per-element losses); its backward sees grad_loss in the loss's
# shape, and every formula needs s, the gradient of one element's loss.


def upstream_scale(grad_loss: Tensor, reduction: int, denominator, acc: torch.dtype) -> Tensor:
    """s in the accumulation dtype: grad_loss (the losses' shape for 'none', a scalar otherwise), divided by
    the mean's denominator."""
    s = grad_loss.to(acc)
    return s / denominator if reduction == REDUCTION_MEAN else s


def position_scale(grad_loss: Tensor, reduction: int, denominator, logits: Tensor) -> Tensor:
    """upstream_scale of a class loss, broadcastable to its input (N, C, *): (N, 1, *) or a scalar."""
    s = upstream_scale(grad_loss, reduction, denominator, acc_dtype(logits.dtype))
    return s.unsqueeze(1) if reduction == REDUCTION_NONE else s


def reduce_like_loss(values: Tensor, reduction: int, denominator) -> Tensor:
    """The adjoint of upstream_scale: per-element values (the losses' shape) to grad_loss's shape."""
    if reduction == REDUCTION_NONE:
        return values
    total = values.sum()
    return total / denominator if reduction == REDUCTION_MEAN else total


# ------------------------------------------------------------------------------------------------
# Class weights and class-index targets as tensors, in the accumulation dtype.


def class_weight(weight: Optional[Tensor], logits: Tensor, dtype: torch.dtype) -> Tensor:
    """w as (1, C, 1, ...) in `dtype` (ones without weight), to broadcast against the logits (N, C, *)."""
    C = logits.shape[1]
    shape = [1, C] + [1] * (logits.dim() - 2)
    if weight is None:
        return torch.ones(shape, dtype=dtype, device=logits.device)
    return weight.to(dtype).reshape(shape)


def class_index_onehot(target: Tensor, ignore_index: int, num_classes: int, acc: torch.dtype):
    """(keep (N, *): the targets not ignored; the targets with ignored ones set to class 0 (N, *), int64;
    their one-hot encoding (N, C, *) in `acc`)."""
    keep = target != ignore_index
    safe_target = torch.where(keep, target, torch.zeros_like(target)).long()
    onehot = torch.nn.functional.one_hot(safe_target, num_classes).to(acc).movedim(-1, 1)
    return keep, safe_target, onehot


def index_target_terms(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int):
    """(keep (N, *), w: the class weights (C) (ones without weight), w_t (N, *): each target's weight, 0
    where ignored, onehot (N, C, *)), in the accumulation dtype."""
    acc = acc_dtype(input.dtype)
    C = input.shape[1]
    keep, safe_target, onehot = class_index_onehot(target, ignore_index, C, acc)
    w = torch.ones(C, dtype=acc, device=input.device) if weight is None else weight.to(acc)
    w_t = w[safe_target] * keep.to(acc)
    return keep, w, w_t, onehot


# ------------------------------------------------------------------------------------------------
# Argument checks that both the functional API and the fake kernels make (same exception, same message).


def check_same_device(input: Tensor, *others: Optional[Tensor]) -> None:
    """A tensor on the meta device sends an op to its fake kernel, and a fake kernel also runs for mixed
    real and meta arguments: both refuse other devices as the kernels do."""
    for other in others:
        if other is not None and other.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found {input.device} and {other.device}"
            )


def check_label_smoothing(label_smoothing: float) -> None:
    if not (0.0 <= label_smoothing <= 1.0):
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


# ------------------------------------------------------------------------------------------------
# The class losses' fake kernels: their checks that need only metadata, and their outputs.


def _check_class_loss_args(input, weight, reduction, label_smoothing) -> None:
    torch._check(
        input.dim() >= 2,
        lambda: f"cross_entropy: expected logits of shape (N, C) or (N, C, d1, ..., dk), got {input.dim()}-d",
    )
    torch._check(
        input.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        lambda: f"cross_entropy: expected float32, float64, bfloat16 or float16 logits, got {input.dtype}",
    )
    torch._check(reduction in (0, 1, 2), lambda: f"cross_entropy: reduction must be 0, 1 or 2, got {reduction}")
    check_label_smoothing(label_smoothing)
    if weight is not None:
        torch._check(
            weight.dim() == 1 and weight.shape[0] == input.shape[1],
            lambda: f"weight tensor should be defined either for all {input.shape[1]} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}",
        )


def check_index_target(input: Tensor, target: Tensor) -> None:
    torch._check(
        target.dtype in (torch.int64, torch.int32, torch.uint8),
        lambda: f"cross_entropy: expected class-index targets of dtype int64, int32 or uint8, got {target.dtype}",
    )
    torch._check(
        tuple(target.shape) == position_shape(input),
        lambda: f"cross_entropy: expected target size {list(position_shape(input))}, got {list(target.shape)}",
    )


def check_prob_target(input: Tensor, target: Tensor) -> None:
    torch._check(
        target.shape == input.shape and target.dtype == input.dtype,
        lambda: "cross_entropy: probability targets must have the logits' shape and dtype",
    )


def class_loss_check(check_target, *check_keywords):
    """The fake kernels' check of a class loss's op (see LossOps.check in xent/_registrar.py): the input,
    weight and options; `check_keywords`, each called with the keyword arguments (the op's own options,
    e.g. gamma); the devices; the target, by `check_target(input, target)`."""

    def check(input, target, options, kw, tensors):
        _check_class_loss_args(input, options[0], kw["reduction"], kw.get("label_smoothing", 0.0))
        for check_keyword in check_keywords:
            check_keyword(kw)
        check_same_device(input, *tensors)
        check_target(input, target)

    return check


def fake_loss(input: Tensor, reduction: int, shape) -> Tensor:
    """The loss: `shape` for reduction 'none', a scalar otherwise; the input's dtype."""
    return input.new_empty(shape if reduction == REDUCTION_NONE else ())


def fake_softmax_outputs(logits: Tensor, kw) -> tuple:
    """(loss, lse) of a softmax loss's forward op; lse (N, *) in the accumulation dtype."""
    lse = logits.new_empty(position_shape(logits), dtype=acc_dtype(logits.dtype))
    return fake_loss(logits, kw["reduction"], position_shape(logits)), lse


def fake_grad_like(input: Tensor) -> Tensor:
    """A class loss's grad_input: the kernels' rule (csrc/class_losses_host.h: dense_strides_like)."""
    return torch.empty_like(input, memory_format=torch.preserve_format)


def softmax_loss_ops(name: str, check, **formulas) -> LossOps:
    """The op-table entry of a softmax loss (cross-entropy, softmax focal) for one target kind: forward
    outputs (loss, lse), gradient with the logits' strides; `check` and the formulas as in LossOps."""
    return LossOps(name, check=check, fake_outputs=fake_softmax_outputs, fake_grad=fake_grad_like, **formulas)
