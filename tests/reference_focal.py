"""Float64 reference of xent.softmax_focal_loss, written from the math with plain torch ops.

Per position, with logp = log_softmax(x) over dim 1, p = exp(logp), class weights w (1 when absent), label
smoothing eps and the target distribution q (class index y: q_c = (1 - eps) [c == y] + eps / C;
probabilities t: q_c = (1 - eps) t_c + eps / C):

    loss = -sum_c w_c q_c (1 - p_c)^gamma logp_c

Ignored class-index positions give 0. 'mean' divides by sum of w_y over the non-ignored positions (class
indices; 0 / 0 = NaN, and with label smoothing any total over 0 is NaN) or by the number of positions
(probabilities), as cross-entropy.

Without smoothing a class index contributes only its own term, gathered (so other classes' -inf logits
do not turn 0 * inf into NaN). 1 - p is -expm1(logp) (accurate for confident predictions). Differentiable:
float64 autograd through it is the reference gradient (also for probability targets).
"""

import math

import torch


def _class_view(v, ndim):
    return v.reshape([1, -1] + [1] * (ndim - 2))


def _focal_f(logp, gamma):
    """-(1 - p)^gamma log p, with (1 - p)^0 = 1 (also at p == 1). At p == 1 (a single class, or a
    saturated softmax) (1 - p)^gamma is taken as the constant 0 for gamma > 0: its derivative there is
    infinite for gamma < 1, but it multiplies log p = 0, and the exact gradient of the product is 0."""
    one_minus_p = -torch.expm1(logp)
    if gamma == 0:
        return -logp
    at_one = one_minus_p == 0
    safe = torch.where(at_one, torch.ones_like(one_minus_p), one_minus_p)
    modulating = torch.where(at_one, torch.zeros_like(safe), safe**gamma)
    return -modulating * logp


def softmax_focal_loss_reference(
    input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, gamma=2.0
):
    x = input.double()
    unbatched = x.dim() == 1
    if unbatched:
        x = x.unsqueeze(0)
        target = target.unsqueeze(0)
    C = x.shape[1]
    w = torch.ones(C, dtype=torch.float64, device=x.device) if weight is None else weight.double()
    wc = _class_view(w, x.dim())
    eps = float(label_smoothing)
    logp = torch.log_softmax(x, dim=1)

    if target.is_floating_point():
        q = (1.0 - eps) * target.double() + eps / C
        per_position = (wc * q * _focal_f(logp, gamma)).sum(dim=1)
        positions = per_position.numel()
        denominator = torch.tensor(float(positions) if positions else math.nan, dtype=torch.float64)
    else:
        target = target.long()
        keep = target != ignore_index
        safe_target = torch.where(keep, target, torch.zeros_like(target))
        if keep.any():
            kept = target[keep]
            assert bool(((kept >= 0) & (kept < C)).all()), "target out of range"
        logp_t = logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        w_t = w[safe_target]
        per_position = (1.0 - eps) * w_t * _focal_f(logp_t, gamma)
        if eps > 0:
            per_position = per_position + eps / C * (wc * _focal_f(logp, gamma)).sum(dim=1)
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        per_position = torch.where(keep, per_position, zero)
        denominator = torch.where(keep, w_t, zero).sum()

    if reduction == "none":
        loss = per_position
    elif reduction == "sum":
        loss = per_position.sum()
    elif reduction == "mean":
        if eps > 0 and denominator.item() == 0:
            # As cross_entropy (PyTorch): its smoothed mean is an NLL mean, 0 / 0 = NaN, plus the smoothing
            # term over the same denominator, so a zero denominator gives NaN (not total / 0 = inf), and so
            # does the gradient of every non-ignored position (ignored ones keep 0, through torch.where).
            denominator = denominator * math.nan
        loss = per_position.sum() / denominator
    else:
        raise ValueError(reduction)
    if unbatched and reduction == "none":
        loss = loss.squeeze(0)
    return loss
