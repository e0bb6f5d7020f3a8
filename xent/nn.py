"""Loss modules: drop-in replacements for torch.nn's."""

from typing import Optional

from torch import Tensor
from torch.nn import Module
from torch.nn.modules.loss import _Loss, _WeightedLoss

from . import functional
from ._softmax_focal_ops import check_gamma


def _register_weight_buffers(module: Module, weight: Optional[Tensor], pos_weight: Optional[Tensor]) -> None:
    """``weight`` and ``pos_weight`` of a binary loss, as buffers (None allowed)."""
    module.register_buffer("weight", weight)
    module.register_buffer("pos_weight", pos_weight)


class _SoftmaxLoss(_WeightedLoss):
    """The constructor arguments of :class:`torch.nn.CrossEntropyLoss` (``weight`` is a buffer), shared by
    CrossEntropyLoss and SoftmaxFocalLoss."""

    ignore_index: int
    label_smoothing: float

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing


class CrossEntropyLoss(_SoftmaxLoss):
    """:class:`torch.nn.CrossEntropyLoss` with xent's kernels: same constructor arguments and results."""

    __constants__ = ["ignore_index", "reduction", "label_smoothing"]

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class SoftmaxFocalLoss(_SoftmaxLoss):
    """Softmax focal loss as a module (see :func:`xent.softmax_focal_loss`): the constructor arguments of
    :class:`torch.nn.CrossEntropyLoss` (``weight`` is a buffer, the per-class alpha) plus ``gamma``."""

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "gamma"]
    gamma: float

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        gamma: float = 2.0,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        check_gamma(gamma, "SoftmaxFocalLoss")
        self.gamma = gamma

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.softmax_focal_loss(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            gamma=self.gamma,
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"


class NLLLoss(_WeightedLoss):
    """:class:`torch.nn.NLLLoss` with xent's kernels: same constructor arguments and results."""

    __constants__ = ["ignore_index", "reduction"]
    ignore_index: int

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.nll_loss(
            input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction
        )


class BCELoss(_WeightedLoss):
    """:class:`torch.nn.BCELoss` with xent's kernels: same constructor arguments (``weight`` is a buffer)
    and results."""

    __constants__ = ["reduction"]

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None, reduction: str = "mean") -> None:
        super().__init__(weight, size_average, reduce, reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    """:class:`torch.nn.BCEWithLogitsLoss` with xent's kernels: same constructor arguments (``weight`` and
    ``pos_weight`` are buffers) and results."""

    weight: Optional[Tensor]
    pos_weight: Optional[Tensor]

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
        pos_weight: Optional[Tensor] = None,
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        _register_weight_buffers(self, weight, pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class SigmoidFocalLoss(Module):
    """:func:`torchvision.ops.sigmoid_focal_loss` as a module (see :func:`xent.sigmoid_focal_loss`);
    ``weight`` and ``pos_weight`` are buffers."""

    __constants__ = ["alpha", "gamma", "reduction"]
    weight: Optional[Tensor]
    pos_weight: Optional[Tensor]

    def __init__(
        self,
        alpha: float = 0.25,
        gamma: float = 2.0,
        reduction: str = "none",
        weight: Optional[Tensor] = None,
        pos_weight: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        functional._torchvision_reduction_code(reduction)  # raises torchvision's error for another value
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        _register_weight_buffers(self, weight, pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.sigmoid_focal_loss(
            input, target, self.alpha, self.gamma, self.reduction, weight=self.weight, pos_weight=self.pos_weight
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction}"


__all__ = ["CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss", "SigmoidFocalLoss", "SoftmaxFocalLoss"]
