"""The one error model of the parity suites: how far xent's result may be from the exact value.

Every check compares a result with a float64 value computed from the same input values (the exact
answer for what xent sees) and allows ``rtol * |expected| + atol`` per element: a ``Bound``. A loss's
bound is the sum of named pieces, each justified here once:

* ``Bound.target(dtype)``: the project's accuracy target in float32 and float64, a fixed relative
  error (``Tolerance``), for the losses compared with PyTorch (cross-entropy, the binary losses).
* ``Bound.rounding(dtype, units)``: ``units`` roundings to the output dtype (half an ulp each, relative,
  and half the subnormal spacing absolute, where rounding is absolute).
* ``Bound.cancellation(magnitude, dtype)``: a result that is a difference of terms of size
  ``magnitude`` carries a few units of roundoff of that size in the dtype the terms are rounded to,
  however small the difference (no relative bound can hold there).
* ``Bound.summation(n, abs_sum, dtype)``: a recursive sum of n terms, n units of roundoff of the sum of
  their magnitudes.
* ``Bound.no_worse_than_torch(expected, torch_result, dtype)``: in bfloat16 and float16, at most
  ``LOW_FACTOR`` times PyTorch's own error in that dtype, plus the rounding of the result to the dtype.

The losses' error models (their test files) compute the magnitudes from each loss's math and add the
pieces; ``assert_within`` is the one comparison.
"""

import dataclasses
import math
from typing import Union

import torch

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [F32, F64, BF16, F16]
LOW = (BF16, F16)

# Unit roundoff (half an ulp, relative) of each dtype.
UNIT_ROUNDOFF = {F64: 2.0**-53, F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11}


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def accumulation_dtype(dtype):
    """The dtype xent's kernels accumulate in: float64 for float64, float32 for everything else."""
    return F64 if dtype == F64 else F32


def acc_roundoff(dtype):
    """The unit roundoff of the dtype a result of `dtype` is accumulated in."""
    return UNIT_ROUNDOFF[accumulation_dtype(dtype)]


def half_subnormal_spacing(dtype):
    """The absolute rounding error of a result in the subnormal range of `dtype` (half the spacing)."""
    return torch.finfo(dtype).smallest_normal * UNIT_ROUNDOFF[dtype]


class Tolerance:
    """The constants of the model."""

    # float64: the kernels accumulate in float64; 1e-12 relative leaves room for different summation
    # orders over up to 50257 classes (each costs ~C * 2**-53 ~ 6e-12 at worst, ~1e-15 in practice) while
    # any formula error shows far above it.
    F64_RTOL = 1e-12
    # float32 loss: 1e-6 relative is the project's accuracy target for the loss.
    F32_LOSS_RTOL = 1e-6
    # float32 gradient, relative to its largest entry: a softmax exp(x_j - lse) or a sigmoid carries a
    # relative error of about |x_j - lse| * 2**-24 (~1e-6 for the logit ranges used here); 1e-5 keeps a
    # 10x margin without hiding a wrong term (which is O(1) relative).
    F32_GRAD_RTOL = 1e-5
    # Cancellation: a log-probability x - lse, or a loss lse - x_t, is a difference of terms of magnitude
    # |lse| + |x| rounded in the accumulation dtype: lse itself carries ~2 units (exp, sum, log; the exps'
    # relative errors become an absolute error of log(sum)), its rounding 1, the subtraction 1.
    CANCELLATION_ULPS = 4.0
    # NLL: a per-position loss -w_t x_t or gradient entry is one product in the accumulation dtype and the
    # rounding of the result to the output dtype: two roundings.
    NLL_ROUNDINGS = 2.0
    # Softmax focal: the relative error of a term a_c f(p_c) from exp / expm1 / log / pow in the
    # accumulation dtype: about 1 ulp each, pow's scaled by |gamma log(1 - p)| (<= 20 for the gammas and
    # logit ranges of the tests), plus the products; 32 ulp leaves a 2x margin while any formula error is O(1).
    FOCAL_TERM_ULPS = 32.0
    # Low precision: xent may be at most this factor worse than PyTorch in the same dtype ...
    LOW_FACTOR = 2.0
    # ... plus this many units of roundoff of the result's magnitude: rounding the (float32-accumulated)
    # result to bfloat16/float16 costs up to half an ulp = 1 unit, and PyTorch may happen to be exact.
    LOW_ROUNDING_UNITS = 1.0


def target_rtol(dtype, *, grad=False):
    """The project's relative accuracy target for float32 / float64 results (see ``Tolerance``)."""
    if dtype == F64:
        return Tolerance.F64_RTOL
    assert dtype == F32, dtype
    return Tolerance.F32_GRAD_RTOL if grad else Tolerance.F32_LOSS_RTOL


Number = Union[float, torch.Tensor]


def max_finite(t):
    """The largest finite entry of `t` (0 for an empty or all-NaN tensor, or a number)."""
    t = torch.as_tensor(t, dtype=F64)
    return torch.nan_to_num(t, nan=0.0, posinf=0.0).max().item() if t.numel() else 0.0


@dataclasses.dataclass(frozen=True)
class Bound:
    """Allowed error per element: ``rtol * |expected| + atol``; each a number or a float64 tensor that
    broadcasts against the expected value."""

    rtol: Number = 0.0
    atol: Number = 0.0

    def __add__(self, other):
        return Bound(self.rtol + other.rtol, self.atol + other.atol)

    def scaled(self, factor):
        return Bound(self.rtol * factor, self.atol * factor)

    def max_atol(self):
        """The absolute part as one number, its largest entry (for a bound on a max-norm error)."""
        return Bound(self.rtol, max_finite(self.atol))

    @staticmethod
    def target(dtype, *, grad=False, magnitude=None):
        """The project's target (``target_rtol``); a gradient's is relative to its largest entry
        `magnitude` as well, since its entries are differences of terms of that size."""
        rtol = target_rtol(dtype, grad=grad)
        return Bound(rtol, 0.0 if magnitude is None else rtol * magnitude)

    @staticmethod
    def rounding(dtype, units=1.0):
        """`units` roundings of a result to `dtype`: relative, and absolute in the subnormal range."""
        return Bound(units * UNIT_ROUNDOFF[dtype], units * half_subnormal_spacing(dtype))

    @staticmethod
    def cancellation(magnitude, dtype, units=Tolerance.CANCELLATION_ULPS):
        """A difference of terms of size `magnitude` (number or tensor) rounded in `dtype`."""
        return Bound(0.0, units * UNIT_ROUNDOFF[dtype] * magnitude)

    @staticmethod
    def summation(n, abs_sum, dtype):
        """The recursive-summation bound of n terms whose magnitudes sum to `abs_sum`, in `dtype`."""
        return Bound(0.0, n * UNIT_ROUNDOFF[dtype] * abs_sum)

    @staticmethod
    def no_worse_than_torch(expected, torch_result, dtype):
        """bfloat16 / float16: ``LOW_FACTOR`` times PyTorch's own max error in `dtype` (`torch_result`,
        PyTorch's result in that dtype, against `expected`), plus the rounding of a result as large as
        the largest expected entry. A bound on the max-norm error (an absolute number)."""
        expected = _representable(expected.detach().double().cpu(), dtype)
        err_torch = max_abs_err(torch_result, expected)
        magnitude = max_finite(expected.abs())
        return Bound(0.0, Tolerance.LOW_FACTOR * err_torch
                     + Tolerance.LOW_ROUNDING_UNITS * UNIT_ROUNDOFF[dtype] * magnitude)


def pytorch_parity_bound(dtype, expected, torch_result=None, *, grad=False, magnitude=None, extra=Bound(),
                         low_extra=Bound()):
    """The model of the losses measured against PyTorch (cross-entropy, the binary losses): in float32 /
    float64 the project's target (a gradient's relative to its largest entry, or to `magnitude` when given)
    plus `extra`; in bfloat16 / float16 no worse than PyTorch's own error in the dtype (`torch_result`)
    plus `low_extra`."""
    if dtype in LOW:
        return Bound.no_worse_than_torch(expected, torch_result, dtype) + low_extra
    if grad and magnitude is None:
        magnitude = max_finite(expected.detach().abs())
    return Bound.target(dtype, grad=grad, magnitude=magnitude) + extra


def _representable(expected, dtype):
    """`expected` (float64) with the values beyond `dtype`'s range replaced by the infinity they round to
    (a float16 sum above 65504 is inf, exactly)."""
    if dtype == F64 or not expected.is_floating_point():
        return expected
    rounded = expected.to(dtype).double()
    return torch.where(torch.isinf(rounded) & torch.isfinite(expected), rounded, expected)


def max_abs_err(actual, expected):
    """max |actual - expected| over the entries where `expected` is finite (inf where actual is NaN there;
    0 when there is none)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = torch.isfinite(e)
    if not finite.any():
        return 0.0
    d = (a - e).abs()[finite]
    return torch.nan_to_num(d, nan=math.inf).max().item()


def _assert_same_specials(a, e, what):
    """NaN exactly where `e` is NaN, `e`'s infinities reproduced, finite wherever `e` is finite. Returns
    the mask of finite `e` entries (None when all are: the fast path for large tensors)."""
    if bool(torch.isfinite(e).all()):
        if not bool(torch.isfinite(a).all()):
            bad = ~torch.isfinite(a)
            raise AssertionError(f"{what}: xent is not finite where the exact value is: at "
                                 f"{bad.nonzero().tolist()[:8]}: {a[bad][:8].tolist()}")
        return None
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{what}: NaN at different places: xent NaN at {nan_a.nonzero().tolist()[:8]}, "
        f"expected NaN at {nan_e.nonzero().tolist()[:8]}"
    )
    inf_e = torch.isinf(e)
    assert torch.equal(a[inf_e], e[inf_e]), f"{what}: expected infinities {e[inf_e][:8]}, got {a[inf_e][:8]}"
    finite = torch.isfinite(e)
    bad = torch.isinf(a) & finite
    assert not bad.any(), f"{what}: xent is infinite where the exact value is finite: {a[bad][:8]} vs {e[bad][:8]}"
    return finite


def assert_within(actual, expected, bound, *, what):
    """`actual` (any dtype, any device) is within `bound` of the float64 `expected`: the same shape, NaN
    and infinities at the same places (an exact value beyond actual's dtype counts as the infinity it
    rounds to), and |actual - expected| <= rtol |expected| + atol elsewhere."""
    a = actual.detach().double().cpu()
    e = _representable(expected.detach().double().cpu(), actual.dtype)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    finite = _assert_same_specials(a, e, what)
    if e.numel() == 0:
        return
    tol = torch.as_tensor(bound.rtol, dtype=F64) * e.abs() + torch.as_tensor(bound.atol, dtype=F64)
    err = (a - e).abs()
    bad = ~(err <= tol) & (a != e)  # an exact result passes whatever the bound (also a NaN bound)
    if finite is not None:
        bad &= finite
    if bad.any():
        finite = torch.isfinite(e) if finite is None else finite
        i = bad.nonzero()[0].tolist() if bad.dim() else []
        idx = tuple(i)
        tol = tol.expand_as(e)
        rel = (err[finite] / e[finite].abs().clamp_min(1e-300)).max().item()
        raise AssertionError(
            f"{what} ({dtype_id(actual.dtype)}): {int(bad.sum())} of {int(finite.sum())} entries out of "
            f"tolerance; first at {i}: xent {a[idx].item()!r} expected {e[idx].item()!r} |err| "
            f"{err[idx].item():.3e} > tol {tol[idx].item():.3e}; max rel err {rel:.3e}; max |err| / tol "
            f"{(err / tol.clamp_min(1e-300))[bad].max().item():.3g}"
        )
