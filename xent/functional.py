"""The functional API: drop-in replacements for torch.nn.functional's losses."""

from typing import Optional

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _ops, testing

_REDUCTIONS = {"none": _ops.REDUCTION_NONE, "mean": _ops.REDUCTION_MEAN, "sum": _ops.REDUCTION_SUM}


def _reduction_code(reduction: str) -> int:
    try:
        return _REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(f"{reduction} is not a valid value for reduction") from None


def _check_weight_grad(weight: Optional[Tensor]) -> None:
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "xent: gradients with respect to the class weight are not supported "
            "(torch.nn.functional.cross_entropy does not implement them either); pass weight.detach()"
        )


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy between logits and targets; the arguments and results of
    :func:`torch.nn.functional.cross_entropy`.

    Args:
        input: logits, shape (C), (N, C) or (N, C, d1, ..., dk); float32, float64, bfloat16 or float16.
        target: class indices, shape (), (N) or (N, d1, ..., dk), int64, int32 or uint8; or class
            probabilities with the input's shape and dtype.
        weight: optional (C) rescaling weight per class, the input's dtype.
        size_average, reduce: deprecated, as in PyTorch (they override ``reduction``).
        ignore_index: class-index targets equal to it contribute neither loss nor gradient, and are left
            out of the mean's denominator. Any integer, even a valid class.
        reduction: 'none' | 'mean' | 'sum'. 'mean' divides by the summed weights of the non-ignored
            targets (class indices) or by the number of positions N * d1 * ... * dk (probabilities); an
            all-ignored mean is NaN, as in PyTorch.
        label_smoothing: in [0, 1]; PyTorch's formula, combined with weight and ignore_index as PyTorch
            does.

    Returns:
        The loss in the input's dtype: a scalar for 'mean'/'sum', shape (N, d1, ..., dk) (or () for an
        unbatched input) for 'none'.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            cross_entropy,
            (input, target, weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            ignore_index=ignore_index,
            reduce=reduce,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    code = _reduction_code(reduction)
    if not (0.0 <= label_smoothing <= 1.0):
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if input.dim() < 1:
        raise ValueError(f"Expected 1 or more dimensions (got {input.dim()})")
    _check_weight_grad(weight)

    # Probability targets are recognised as PyTorch does: by having the input's shape.
    probabilities = input.shape == target.shape
    unbatched = input.dim() == 1
    if unbatched:
        input = input.unsqueeze(0)
        target = target.unsqueeze(0)
    ops = testing._active_ops()
    if probabilities:
        if not target.is_floating_point():
            raise RuntimeError(
                f"Expected floating point type for target with class probabilities, got {target.dtype}"
            )
        loss, _ = ops.cross_entropy_prob_fwd(
            input, target, weight, reduction=code, label_smoothing=float(label_smoothing)
        )
    else:
        if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
            )
        loss, _ = ops.cross_entropy_fwd(
            input,
            target,
            weight,
            reduction=code,
            ignore_index=int(ignore_index),
            label_smoothing=float(label_smoothing),
        )
    if unbatched and code == _ops.REDUCTION_NONE:
        loss = loss.squeeze(0)
    return loss


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
) -> Tensor:
    """Negative log-likelihood of log-probabilities; the arguments and results of
    :func:`torch.nn.functional.nll_loss`: input (C), (N, C) or (N, C, d1, ..., dk), class-index targets
    (), (N) or (N, d1, ..., dk), per-class weight, ignore_index, reduction (mean divides by the summed
    weights of the non-ignored targets; NaN when all are ignored)."""
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            nll_loss,
            (input, target, weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            ignore_index=ignore_index,
            reduce=reduce,
            reduction=reduction,
        )
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    code = _reduction_code(reduction)
    if input.dim() < 1:
        raise ValueError(f"Expected 1 or more dimensions (got {input.dim()})")
    _check_weight_grad(weight)
    unbatched = input.dim() == 1
    if unbatched:
        input = input.unsqueeze(0)
        target = target.unsqueeze(0)
    if target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
        )
    loss, _ = testing._active_ops().nll_loss_fwd(input, target, weight, reduction=code, ignore_index=int(ignore_index))
    if unbatched and code == _ops.REDUCTION_NONE:
        loss = loss.squeeze(0)
    return loss
