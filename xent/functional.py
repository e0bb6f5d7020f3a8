"""The functional API: drop-in replacements for torch.nn.functional's losses."""

from typing import Optional

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _cross_entropy_ops, _fused, _library, _ops, _softmax_focal_ops  # noqa: F401  (_ops: registrations)
from ._common import check_label_smoothing, check_same_device
from ._library import REDUCTION_CODES, REDUCTION_NONE


def _reduction_code(reduction: str) -> int:
    try:
        return REDUCTION_CODES[reduction]
    except (KeyError, TypeError):
        raise ValueError(f"{reduction} is not a valid value for reduction") from None


def _check_weight_grad(weight: Optional[Tensor]) -> None:
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "xent: gradients with respect to the class weight are not supported "
            "(torch.nn.functional.cross_entropy does not implement them either); pass weight.detach()"
        )


# The op table's entries of the softmax losses, by target kind: (class indices, class probabilities).
_CROSS_ENTROPY_OPS = (_cross_entropy_ops.INDEX, _cross_entropy_ops.PROB)
_SOFTMAX_FOCAL_OPS = (_softmax_focal_ops.INDEX, _softmax_focal_ops.PROB)


def _softmax_loss(
    entries,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    size_average: Optional[bool],
    ignore_index: int,
    reduce: Optional[bool],
    reduction: str,
    label_smoothing: float,
    options: dict,
) -> Tensor:
    """cross_entropy's argument handling and op call, shared by softmax_focal_loss: legacy reduction
    arguments, validation with PyTorch's exception types, probability targets recognised by shape,
    unbatched (C) input. `entries` are the loss's op-table entries by target kind, `options` its own
    keyword arguments (gamma)."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    code = _reduction_code(reduction)
    check_label_smoothing(label_smoothing)
    if input.dim() < 1:
        # PyTorch's error types for a 0-d input: IndexError (probabilities), RuntimeError (class indices).
        error = IndexError if target.is_floating_point() else RuntimeError
        raise error(f"cross_entropy: expected an input with 1 or more dimensions (got {input.dim()})")
    check_same_device(input, target, weight)
    _check_weight_grad(weight)

    # Probability targets are recognised as PyTorch does: by having the input's shape.
    probabilities = input.shape == target.shape
    if probabilities and ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    unbatched = input.dim() == 1
    if unbatched and not probabilities and target.dim() == 1 and target.numel() == 1:
        target = target.reshape(())  # PyTorch accepts a (1,) class target for a (C) input
    if unbatched and not probabilities and target.dim() >= 1 and target.shape[0] != 1:
        # A (C) input is one position: PyTorch compares its batch size, 1, with the target's.
        raise ValueError(f"Expected input batch_size (1) to match target batch_size ({target.shape[0]}).")
    if unbatched:
        input = input.unsqueeze(0)
        target = target.unsqueeze(0)
    if probabilities:
        if not target.is_floating_point():
            raise RuntimeError(
                f"Expected floating point type for target with class probabilities, got {target.dtype}"
            )
    elif input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
        )

    ops = _library.active_ops()
    entry = entries[probabilities]
    forward = entry.fwd
    # The *_fwd_grad ops also compute the gradient when it will be needed (Note [Fused gradient]).
    if entry.fwd_grad is not None and _fused.use_fused_grad(ops, code, input, target, weight):
        forward = entry.fwd_grad
    keywords = {"reduction": code, "label_smoothing": float(label_smoothing), **options}
    if not probabilities:
        keywords["ignore_index"] = int(ignore_index)
    loss = getattr(ops, forward)(input, target, weight, **keywords)[0]
    if unbatched and code == REDUCTION_NONE:
        loss = loss.squeeze(0)
    return loss


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
            all-ignored mean is NaN, as in PyTorch, and so is a label-smoothed mean whose targets all
            weigh 0.
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
    return _softmax_loss(
        _CROSS_ENTROPY_OPS, input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing, {}
    )


def softmax_focal_loss(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    gamma: float = 2.0,
) -> Tensor:
    """Multi-class focal loss (Lin et al., https://arxiv.org/abs/1708.02002) over softmax probabilities,
    with every argument of :func:`cross_entropy` plus ``gamma``.

    For a position with logits x, p = softmax(x), and target distribution q,

        loss = sum_c w_c q_c (1 - p_c)^gamma (-log p_c)

    where q is the one-hot target smoothed by ``label_smoothing`` = eps, exactly as cross-entropy smooths
    it: q_c = (1 - eps) [c == y] + eps / C for a class index y, q_c = (1 - eps) t_c + eps / C for class
    probabilities t. Without smoothing a class index gives -w_y (1 - p_y)^gamma log p_y. With gamma = 0
    this is cross-entropy's formula, and xent.softmax_focal_loss then calls xent.cross_entropy's kernels:
    equal bit for bit, forward and gradient.

    Args:
        input: logits, shape (C), (N, C) or (N, C, d1, ..., dk); float32, float64, bfloat16 or float16.
        target: class indices, shape (), (N) or (N, d1, ..., dk), int64, int32 or uint8; or class
            probabilities with the input's shape and dtype (differentiable).
        weight: optional (C) per-class weight (the alpha of the focal loss), the input's dtype.
        size_average, reduce: deprecated, as in PyTorch (they override ``reduction``).
        ignore_index: class-index targets equal to it contribute neither loss nor gradient and are left
            out of the mean's denominator.
        reduction: 'none' | 'mean' | 'sum'. 'mean' divides by the summed weights w_y of the non-ignored
            targets (class indices; NaN when all are ignored, or with label_smoothing when they weigh 0,
            as cross_entropy) or by the number of positions
            N * d1 * ... * dk (probabilities), as cross_entropy.
        label_smoothing: eps in [0, 1], see above.
        gamma: the focusing exponent, a number >= 0 (default 2).

    Returns:
        The loss in the input's dtype: a scalar for 'mean'/'sum', shape (N, d1, ..., dk) (or () for an
        unbatched input) for 'none'.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            softmax_focal_loss,
            (input, target, weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            ignore_index=ignore_index,
            reduce=reduce,
            reduction=reduction,
            label_smoothing=label_smoothing,
            gamma=gamma,
        )
    if isinstance(gamma, Tensor):
        raise TypeError("softmax_focal_loss: gamma must be a Python number, not a tensor")
    gamma = float(gamma)
    _softmax_focal_ops.check_gamma(gamma)
    if gamma == 0:
        # Cross-entropy exactly: its kernels, so the two agree bit for bit.
        return cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    return _softmax_loss(
        _SOFTMAX_FOCAL_OPS,
        input,
        target,
        weight,
        size_average,
        ignore_index,
        reduce,
        reduction,
        label_smoothing,
        {"gamma": gamma},
    )


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
    check_same_device(input, target, weight)
    _check_weight_grad(weight)
    if input.dim() == 1 and target.dim() == 1 and target.numel() != 1:
        raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.numel()}")
    unbatched = input.dim() == 1
    if unbatched:
        input = input.unsqueeze(0)
        target = target.unsqueeze(0)
    if target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
        )
    loss, _ = _library.active_ops().nll_loss_fwd(input, target, weight, reduction=code, ignore_index=int(ignore_index))
    if unbatched and code == REDUCTION_NONE:
        loss = loss.squeeze(0)
    return loss


# ------------------------------------------------------------------------------------------------
# Binary losses: binary_cross_entropy, binary_cross_entropy_with_logits, sigmoid_focal_loss.


def _dtype_name(dtype: torch.dtype) -> str:
    """PyTorch's name of a dtype in error messages ('Float', 'Long', ...)."""
    return torch.empty((), dtype=dtype).type().split(".")[-1].replace("Tensor", "")


def _check_not_differentiable(function: str, name: str, t: Optional[Tensor]) -> None:
    # PyTorch's autograd raises this when the op is called (in grad mode), not at backward time.
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"The function '{function}' is not differentiable with respect to argument '{name}'. "
            "This input cannot have requires_grad True."
        )


def _reduction_enum(size_average: Optional[bool], reduce: Optional[bool], reduction: str) -> int:
    # _Reduction.get_enum also accepts the deprecated 'elementwise_mean' (with a warning), as F does.
    if size_average is not None or reduce is not None:
        return _Reduction.legacy_get_enum(size_average, reduce)
    return _Reduction.get_enum(reduction)


def _torchvision_reduction_code(reduction: str) -> int:
    """torchvision's reduction argument (no legacy names), with its error."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(
            f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: 'none', 'mean', 'sum'"
        )
    return REDUCTION_CODES[reduction]


def _logits_dtypes(function: str, input: Tensor, target: Tensor, result_dtype) -> "tuple[Tensor, Tensor]":
    """Input and target in one dtype, following PyTorch's type promotion of the composite formula: the
    with-logits loss takes the target's dtype (ATen computes (1 - target).mul_(input)...), the focal
    loss the promoted dtype. Non-floating arguments raise what PyTorch raises."""
    if not input.is_floating_point():
        raise NotImplementedError(f"\"{function}\" not implemented for '{_dtype_name(input.dtype)}'")
    if target.dtype == torch.bool:
        raise NotImplementedError(f"{function}: boolean targets are not supported; pass target.float()")
    if not target.is_floating_point():
        raise RuntimeError(
            f"result type {_dtype_name(input.dtype)} can't be cast to the desired output type "
            f"{_dtype_name(target.dtype)}"
        )
    dtype = result_dtype(input.dtype, target.dtype)
    return input.to(dtype), target.to(dtype)


def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
) -> Tensor:
    """Binary cross-entropy between probabilities and targets; the arguments and results of
    :func:`torch.nn.functional.binary_cross_entropy`.

    Args:
        input: probabilities in [0, 1], any shape (*); float32, float64, bfloat16 or float16. A value
            outside [0, 1] (or NaN) raises RuntimeError, as PyTorch's CPU kernel does.
        target: the input's shape and dtype, values in [0, 1] (checked likewise).
        weight: optional rescaling weight, broadcastable to the input (any real dtype).
        size_average, reduce: deprecated, as in PyTorch (they override ``reduction``).
        reduction: 'none' | 'mean' | 'sum'.

    Returns:
        -w (y max(log x, -100) + (1 - y) max(log(1 - x), -100)) in the input's dtype: a scalar for
        'mean' (NaN for an empty input) / 'sum', the input's shape for 'none'.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            binary_cross_entropy,
            (input, target, weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            reduce=reduce,
            reduction=reduction,
        )
    code = _reduction_enum(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}) is "
            "deprecated. Please ensure they have the same size."
        )
    _check_not_differentiable("binary_cross_entropy", "weight", weight)
    ops = _library.active_ops()
    if _fused.use_fused_grad(ops, code, input, target, weight):
        loss, _ = ops.binary_cross_entropy_fwd_grad(input, target, weight, reduction=code)
        return loss
    return ops.binary_cross_entropy_fwd(input, target, weight, reduction=code)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[Tensor] = None,
) -> Tensor:
    """Binary cross-entropy between logits and targets; the arguments and results of
    :func:`torch.nn.functional.binary_cross_entropy_with_logits`.

    Args:
        input: logits, any shape (*); float32, float64, bfloat16 or float16.
        target: the input's shape; any floating dtype (the result takes the target's dtype, as in
            PyTorch). Soft targets are fine.
        weight: optional rescaling weight, broadcastable to the input.
        size_average, reduce: deprecated, as in PyTorch.
        reduction: 'none' | 'mean' | 'sum'.
        pos_weight: optional weight of the positive term, broadcastable to the input; typically one value
            per class, shape (C) for an input (N, C).

    Returns:
        w ((1 - y) x - (1 + (pw - 1) y) log_sigmoid(x)), computed without cancellation: a scalar for
        'mean' / 'sum', the input's shape for 'none'.
    """
    if has_torch_function_variadic(input, target, weight, pos_weight):
        return handle_torch_function(
            binary_cross_entropy_with_logits,
            (input, target, weight, pos_weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            reduce=reduce,
            reduction=reduction,
            pos_weight=pos_weight,
        )
    code = _reduction_enum(size_average, reduce, reduction)
    if not (target.size() == input.size()):
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    _check_not_differentiable("binary_cross_entropy_with_logits", "weight", weight)
    _check_not_differentiable("binary_cross_entropy_with_logits", "pos_weight", pos_weight)
    input, target = _logits_dtypes("binary_cross_entropy_with_logits", input, target, lambda a, b: b)
    ops = _library.active_ops()
    if _fused.use_fused_grad(ops, code, input, target, weight, pos_weight):
        loss, _ = ops.binary_cross_entropy_with_logits_fwd_grad(input, target, weight, pos_weight, reduction=code)
        return loss
    return ops.binary_cross_entropy_with_logits_fwd(input, target, weight, pos_weight, reduction=code)


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    weight: Optional[Tensor] = None,
    pos_weight: Optional[Tensor] = None,
) -> Tensor:
    """The focal loss of RetinaNet (https://arxiv.org/abs/1708.02002); the arguments and results of
    :func:`torchvision.ops.sigmoid_focal_loss`, plus ``weight`` and ``pos_weight``.

    Args:
        inputs: logits, any shape (*); float32, float64, bfloat16 or float16.
        targets: the inputs' shape, binary (or soft) labels; any floating dtype (the result takes the
            promoted dtype, as torchvision's).
        alpha: weight of the positives in [0, 1]; a negative value disables the alpha weighting.
        gamma: exponent of the modulating factor (1 - p_t). Integer values use exact products.
        reduction: 'none' | 'mean' | 'sum' (default 'none', as torchvision).
        weight, pos_weight: applied to the binary cross-entropy term exactly as in
            :func:`binary_cross_entropy_with_logits` (broadcastable to the inputs). Not in torchvision.

    Returns:
        alpha_t * ce * (1 - p_t)^gamma, ce = binary_cross_entropy_with_logits(inputs, targets, weight,
        pos_weight, reduction='none'), p_t = p y + (1 - p)(1 - y), p = sigmoid(inputs),
        alpha_t = alpha y + (1 - alpha)(1 - y); reduced as asked.
    """
    if has_torch_function_variadic(inputs, targets, weight, pos_weight):
        return handle_torch_function(
            sigmoid_focal_loss,
            (inputs, targets, weight, pos_weight),
            inputs,
            targets,
            alpha=alpha,
            gamma=gamma,
            reduction=reduction,
            weight=weight,
            pos_weight=pos_weight,
        )
    code = _torchvision_reduction_code(reduction)
    if not (targets.size() == inputs.size()):
        raise ValueError(f"Target size ({targets.size()}) must be the same as input size ({inputs.size()})")
    _check_not_differentiable("sigmoid_focal_loss", "weight", weight)
    _check_not_differentiable("sigmoid_focal_loss", "pos_weight", pos_weight)
    inputs, targets = _logits_dtypes("sigmoid_focal_loss", inputs, targets, torch.promote_types)
    ops = _library.active_ops()
    if _fused.use_fused_grad(ops, code, inputs, targets, weight, pos_weight):
        loss, _ = ops.sigmoid_focal_loss_fwd_grad(
            inputs, targets, weight, pos_weight, alpha=float(alpha), gamma=float(gamma), reduction=code
        )
        return loss
    return ops.sigmoid_focal_loss_fwd(
        inputs, targets, weight, pos_weight, alpha=float(alpha), gamma=float(gamma), reduction=code
    )
