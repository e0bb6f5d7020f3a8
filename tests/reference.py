"""Slow, obviously-correct float64 reference implementations of the class losses (cross-entropy, NLL;
softmax focal in tests/reference_focal.py on the same skeleton).

Written from the math with plain torch ops (log_softmax, gather, masks, sums), independently of
torch.nn.functional, so that the parity tests compare xent against two implementations that do not
share code: PyTorch's own loss in float64 and this one. ``test_reference_matches_pytorch`` in
tests/test_cross_entropy.py (and test_nll_loss.py) checks the two agree.

The functions are differentiable (float64 autograd through them is the reference gradient, also with
respect to probability targets) and work on any device.

Notation, per position p (a batch row n and spatial index s), with C classes, class weights w (all 1
when absent), W = sum_c w_c, label smoothing eps and log-probabilities logp = log_softmax(x) over dim 1:

* class-index target t:  loss_p = (1 - eps) * w_t * (-logp_t) + eps / C * sum_c w_c * (-logp_c)
  for non-ignored positions, 0 for ignored ones (t == ignore_index). 'mean' divides the sum by
  sum_p w_{t_p} over the non-ignored positions (0 / 0 = NaN when all are ignored).
* probability target t:  q = (1 - eps) * t + eps / C,  loss_p = -sum_c w_c * q_c * logp_c.
  'mean' divides the sum by the number of positions N * d1 * ... * dk (NaN when there are none).
"""

import math

import torch


def _reduce(per_position, reduction, denominator):
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / denominator
    raise ValueError(f"{reduction} is not a valid value for reduction")


def _class_view(v, ndim):
    """A (C) vector shaped to broadcast against (N, C, d1, ..., dk)."""
    return v.reshape([1, -1] + [1] * (ndim - 2))


def _batched(input, target, weight):
    """(x, target, w, unbatched): a (C) input and its () target as a batch of one, x in float64, w the
    float64 class weights (ones when absent)."""
    x = input.double()
    unbatched = x.dim() == 1
    if unbatched:
        x = x.unsqueeze(0)
        target = target.unsqueeze(0)
    C = x.shape[1]
    w = torch.ones(C, dtype=torch.float64, device=x.device) if weight is None else weight.double()
    return x, target, w, unbatched


def _unbatched(loss, reduction, unbatched):
    return loss.squeeze(0) if unbatched and reduction == "none" else loss


def _kept_classes(target, ignore_index, C):
    """(keep, safe_target) of class indices: the positions not ignored, and the targets with the ignored
    ones replaced by a valid class (any: they are masked)."""
    target = target.long()
    keep = target != ignore_index
    if keep.any():  # the kernels raise for these; the reference must not silently gather garbage
        kept = target[keep]
        assert bool(((kept >= 0) & (kept < C)).all()), "target out of range"
    return keep, torch.where(keep, target, torch.zeros_like(target))


def class_loss(input, target, weight, ignore_index, reduction, label_smoothing, f):
    """The loss sum_c w_c q_c f(logp_c) per position, shared by cross-entropy (f = -logp) and softmax
    focal (tests/reference_focal.py): the target distribution q (see the module docstring), ignored
    positions, the mean's denominator and the unbatched (C) input.

    input: (C), (N, C) or (N, C, d1, ..., dk) logits of any float dtype (computed in float64).
    target: class indices of shape (), (N) or (N, d1, ..., dk) (any integer dtype), or class
        probabilities with the input's shape (any float dtype; computed in float64).
    f: the per-class term as a function of log-probabilities (float64, elementwise).
    Returns a float64 tensor: () for 'mean'/'sum', the positions' shape for 'none'.
    """
    x, target, w, unbatched = _batched(input, target, weight)
    C = x.shape[1]
    eps = float(label_smoothing)
    logp = torch.log_softmax(x, dim=1)
    wc = _class_view(w, x.dim())

    if target.is_floating_point():  # probability targets, the input's shape
        assert target.shape == x.shape
        q = (1.0 - eps) * target.double() + eps / C
        per_position = (wc * q * f(logp)).sum(dim=1)
        positions = per_position.numel()
        denominator = torch.tensor(float(positions) if positions else math.nan, dtype=torch.float64)
    else:
        keep, safe_target = _kept_classes(target, ignore_index, C)
        # Without smoothing only the target's term enters, gathered (so other classes' -inf logits do not
        # turn 0 * inf into NaN).
        logp_t = logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)  # (N, *)
        w_t = w[safe_target]  # (N, *)
        per_position = (1.0 - eps) * w_t * f(logp_t)
        if eps > 0:
            per_position = per_position + eps / C * (wc * f(logp)).sum(dim=1)
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        per_position = torch.where(keep, per_position, zero)
        denominator = torch.where(keep, w_t, zero).sum()
        if reduction == "mean" and eps > 0 and denominator.item() == 0:
            # As PyTorch: its smoothed mean is an NLL mean, 0 / 0 = NaN, plus the smoothing term over the
            # same denominator, so a zero denominator gives NaN (not total / 0 = inf), and so does the
            # gradient of every non-ignored position (ignored ones keep 0, through torch.where).
            denominator = denominator * math.nan
    return _unbatched(_reduce(per_position, reduction, denominator), reduction, unbatched)


def cross_entropy_reference(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """The cross-entropy loss in float64 (see the module docstring for the formulas and class_loss for the
    arguments)."""
    return class_loss(input, target, weight, ignore_index, reduction, label_smoothing, lambda logp: -logp)


def nll_loss_reference(input, target, weight=None, ignore_index=-100, reduction="mean"):
    """The negative log-likelihood loss of log-probabilities `input` in float64: -w_t input_t per
    non-ignored position, 0 for ignored ones; 'mean' divides the sum by sum_p w_{t_p} over the non-ignored
    positions (0 / 0 = NaN when all are ignored). Shapes as cross_entropy_reference's class indices."""
    x, target, w, unbatched = _batched(input, target, weight)
    keep, safe_target = _kept_classes(target, ignore_index, x.shape[1])
    x_t = x.gather(1, safe_target.unsqueeze(1)).squeeze(1)  # reads no other class (NaN there is harmless)
    w_t = w[safe_target]
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    loss = _reduce(torch.where(keep, -w_t * x_t, zero), reduction, torch.where(keep, w_t, zero).sum())
    return _unbatched(loss, reduction, unbatched)


def cross_entropy_reference_chunked(input, target, chunk_elements=1 << 20):
    """Cross-entropy of (N, C) logits with class-index targets (no weight, smoothing or ignore_index),
    for inputs with more than 2**31 elements: never materializes a float64 copy of more than
    ``chunk_elements`` logits at once (8 MiB by default).

    Each row's log-sum-exp is accumulated over blocks of rows and columns in float64: the log-sum-exp
    of every block merged with logaddexp. Returns (mean loss, per-row losses), float64.
    """
    N, C = input.shape
    rows = max(1, chunk_elements // max(C, 1))
    cols = max(1, min(C, chunk_elements))
    lse = torch.empty(N, dtype=torch.float64)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        acc = torch.full((r1 - r0,), -math.inf, dtype=torch.float64)
        for c0 in range(0, C, cols):
            block = input[r0:r1, c0 : c0 + cols].double()
            acc = torch.logaddexp(acc, torch.logsumexp(block, dim=1))
        lse[r0:r1] = acc
    x_t = input.gather(1, target.long().unsqueeze(1)).squeeze(1).double()
    per_row = lse - x_t
    return per_row.mean(), per_row
