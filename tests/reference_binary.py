"""Slow, obviously-correct float64 references of the binary losses.

Written from the math with plain torch ops (log, log1p, logsigmoid, pow), independently of
torch.nn.functional's binary losses and of torchvision, so that the parity tests compare xent against two
implementations that share no code: PyTorch's (or torchvision's) own in float64 and these.
``test_reference_matches_pytorch`` in tests/test_binary_losses.py checks that they agree.

Every function is differentiable (float64 autograd through it is the reference gradient, also with
respect to the target) and returns float64: () for 'mean' / 'sum', the input's shape for 'none'.

Notation, per element: x = input, y = target, w = weight (1 when absent), pw = pos_weight (1 when absent).

* binary cross-entropy (x a probability): -w (y max(log x, -100) + (1 - y) max(log(1 - x), -100)).
* with logits: -w (pw y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))), with
  log(1 - sigmoid(x)) = log sigmoid(-x): both logs are evaluated without cancellation.
* sigmoid focal loss (torchvision's definition, weight/pos_weight inside the cross-entropy term):
  ce (1 - p_t)^gamma alpha_t, ce the with-logits loss, p = sigmoid(x), 1 - p_t = p (1 - y) + (1 - p) y
  (1 - p evaluated as sigmoid(-x)), alpha_t = alpha y + (1 - alpha)(1 - y) (1 when alpha < 0).
'mean' divides the sum by the number of elements (NaN for an empty input).
"""

import torch
import torch.nn.functional as F


def _reduce(loss, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / loss.numel() if loss.numel() else loss.sum() / 0.0
    raise ValueError(f"{reduction} is not a valid value for reduction")


def _weighted(loss, weight):
    return loss if weight is None else loss * weight.double()


def binary_cross_entropy_reference(input, target, weight=None, reduction="mean"):
    x, y = input.double(), target.double()
    log_x = torch.clamp(torch.log(x), min=-100)
    log_1mx = torch.clamp(torch.log1p(-x), min=-100)
    return _reduce(_weighted(-(y * log_x + (1 - y) * log_1mx), weight), reduction)


def binary_cross_entropy_with_logits_reference(input, target, weight=None, pos_weight=None, reduction="mean"):
    x, y = input.double(), target.double()
    pw = 1.0 if pos_weight is None else pos_weight.double()
    loss = -(pw * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x))
    return _reduce(_weighted(loss, weight), reduction)


def sigmoid_focal_loss_reference(inputs, targets, alpha=0.25, gamma=2.0, reduction="none", weight=None,
                                 pos_weight=None):
    x, y = inputs.double(), targets.double()
    p, q = torch.sigmoid(x), torch.sigmoid(-x)  # q = 1 - p without its cancellation as p -> 1
    ce = binary_cross_entropy_with_logits_reference(x, y, weight, pos_weight, reduction="none")
    one_minus_p_t = p * (1 - y) + q * y
    loss = ce * one_minus_p_t**gamma
    if alpha >= 0:
        loss = loss * (alpha * y + (1 - alpha) * (1 - y))
    return _reduce(loss, reduction)
