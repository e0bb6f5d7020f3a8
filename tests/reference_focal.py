"""Float64 reference of xent.softmax_focal_loss, written from the math with plain torch ops (on the class
losses' skeleton of tests/reference.py, class_loss).

Per position, with logp = log_softmax(x) over dim 1, p = exp(logp), class weights w (1 when absent), label
smoothing eps and the target distribution q (class index y: q_c = (1 - eps) [c == y] + eps / C;
probabilities t: q_c = (1 - eps) t_c + eps / C):

    loss = -sum_c w_c q_c (1 - p_c)^gamma logp_c

Ignored class-index positions give 0. 'mean' divides by sum of w_y over the non-ignored positions (class
indices; 0 / 0 = NaN, and with label smoothing any total over 0 is NaN) or by the number of positions
(probabilities), as cross-entropy.

Without smoothing a class index contributes only its own term. 1 - p is -expm1(logp) (accurate for
confident predictions). Differentiable: float64 autograd through it is the reference gradient (also for
probability targets).
"""

import torch

from reference import class_loss


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
    return class_loss(input, target, weight, ignore_index, reduction, label_smoothing,
                      lambda logp: _focal_f(logp, gamma))
