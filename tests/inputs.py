"""Input builders, memory layouts and upstream gradients shared by the test suites.

Inputs are drawn in float64 and rounded to the tested dtype, so that the float64 references computed from
them are the exact answers for the values xent sees.

A layout is a function of a contiguous tensor that returns a tensor with the same values and shape in
another memory layout, built on the tensor's own device (so call it after ``backend.put``).
"""

import contextlib

import torch

F64 = torch.float64


@contextlib.contextmanager
def fixed_rng(seed=0):
    """Random draws inside come from torch's global generator seeded with `seed`; its state is restored
    after. For inputs built at import time (parametrize lists, opcheck samples): they are drawn before the
    per-test seed of conftest.py and would otherwise differ from run to run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def keep_first_target(t, ignore_index):
    """Sets the first position of class-index targets `t` to a class other than ignore_index, so that a
    mean reduction is never over all-ignored targets. opcheck needs it: it compares eager and traced
    outputs with assert_close, for which NaN (the mean over all-ignored targets, tested elsewhere) is not
    equal to NaN."""
    if t.numel() > 0:
        t[(0,) * t.dim()] = 1 if ignore_index == 0 else 0
    return t


def positions_of(shape):
    """The positions' shape of a class-dim-1 tensor (N, C, d1, ..., dk): (N, d1, ..., dk); () for (C)."""
    return (shape[0],) + tuple(shape[2:]) if len(shape) > 1 else ()


def make_logits(shape, dtype, scale=3.0):
    """Random logits in `dtype` (scale 3: some positions confidently right, some confidently wrong)."""
    return (torch.randn(shape, dtype=F64) * scale).to(dtype)


def make_log_probs(shape, dtype, scale=3.0):
    """Log-probabilities in `dtype`: log_softmax over the class dim of make_logits' values."""
    z = torch.randn(shape, dtype=F64) * scale
    return torch.log_softmax(z, dim=1 if len(shape) > 1 else 0).to(dtype)


def make_prob_target(shape, dtype, kind="softmax"):
    """Class probabilities of the logits' shape: a softmax over the class dim, or any values
    ("unnormalized": PyTorch accepts them; nothing may assume they sum to 1)."""
    if kind == "softmax":
        return torch.softmax(torch.randn(shape, dtype=F64) * 2, dim=1 if len(shape) > 1 else 0).to(dtype)
    if kind == "unnormalized":
        return (torch.rand(shape, dtype=F64) * 2 - 0.5).to(dtype)
    raise ValueError(kind)


def make_target(positions, C, *, dtype=torch.long, ignore_index=-100, ignored=0.0):
    """Class indices (N, *) in [0, C); a fraction `ignored` of them set to ignore_index (all when >= 1)."""
    t = torch.randint(0, max(C, 1), positions, dtype=torch.long)
    if ignored:
        mask = torch.rand(positions) < ignored
        if ignored >= 1.0:
            mask[...] = True
        t[mask] = ignore_index
    return t.to(dtype)


def make_weight(shape, dtype, with_zero=False):
    """A weight in [0.25, 1.75) of `shape` (a class count C: a per-class weight), with one zero (class
    C // 2) when `with_zero`."""
    w = (torch.rand(shape, dtype=F64) * 1.5 + 0.25).to(dtype)
    if with_zero and w.dim() == 1 and len(w) > 1:
        w[len(w) // 2] = 0
    return w


def _contiguous(x):
    return x.clone()


def _transposed(x):  # first and last dims swapped in storage; (N, C) stored as (C, N): the lanes layout
    if x.dim() < 2:  # nothing to swap: the last dim sliced instead
        return _last_dim_sliced(x)
    return x.transpose(0, -1).contiguous().transpose(0, -1)


def _class_sliced(x):  # x[:, ::2] of a twice-as-wide tensor: class stride 2 (fits no kernel layout)
    wide = torch.zeros((x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    return wide[:, ::2]


def _batch_sliced(x):  # x[::2] of a twice-as-tall tensor: rows 2C apart
    tall = torch.zeros((2 * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    tall[::2] = x
    return tall[::2]


def _last_dim_sliced(x):  # x[..., ::2] of a tensor twice as wide in the last dim
    if x.dim() == 0:
        return x.clone()
    wide = torch.zeros(tuple(x.shape[:-1]) + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def _channels_last(x):  # class stride 1, spatial positions strided (channels-last / NHWC)
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError("channels_last needs a K-dim tensor")


def _permuted(x):  # dense, but storage order (d1, N, d2, C) for 4-d / (C, d1, N) for 3-d
    if x.dim() == 4:
        return x.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    if x.dim() == 3:
        return x.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    raise ValueError("permuted needs a K-dim tensor")


def _spatial_reversed(x):  # dense, spatial dims stored in reverse order: none of them merge
    k = x.dim() - 2
    order = [0, 1] + list(range(x.dim() - 1, 1, -1))
    inverse = [order.index(d) for d in range(x.dim())]
    assert k >= 2
    return x.permute(order).contiguous().permute(inverse)


def _misaligned(x):  # storage offset 1: the data pointer is not vector-aligned
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    return buf[1:].view(x.shape).copy_(x)


def _expanded(x):  # batch stride 0: every row the same (x's first row)
    return x[:1].expand(x.shape)


ALL_LAYOUTS = {
    "contiguous": _contiguous,
    "transposed": _transposed,
    "class_sliced": _class_sliced,
    "batch_sliced": _batch_sliced,
    "last_dim_sliced": _last_dim_sliced,
    "channels_last": _channels_last,
    "permuted": _permuted,
    "spatial_reversed": _spatial_reversed,
    "misaligned": _misaligned,
    "expanded": _expanded,
}


# ================================================================================================
# The layouts the class losses (class dim 1) are checked in: every layout above, on shapes whose
# positions fill the kernels' vectors with a tail (300, 301 rows; 37 columns), long class rows, and K-dim
# inputs whose position dims merge or (5 of them stored in reverse) do not.

CLASS_LAYOUT_CASES = [
    ((7, 5), "transposed"),
    ((300, 37), "transposed"),
    ((7, 5), "class_sliced"),
    ((7, 5000), "class_sliced"),
    ((2, 3, 2, 3, 2, 3), "class_sliced"),
    ((7, 5), "batch_sliced"),
    ((2, 5, 3, 4), "batch_sliced"),
    ((7, 5), "misaligned"),
    ((5, 1000), "misaligned"),
    ((301, 33), "misaligned"),
    ((3, 5, 4), "misaligned"),
    ((2, 5, 3, 37), "misaligned"),
    ((7, 5), "expanded"),
    ((3, 5, 4), "channels_last"),
    ((2, 5, 3, 4), "channels_last"),
    ((2, 300, 5, 7), "channels_last"),
    ((3, 5, 4), "permuted"),
    ((2, 5, 3, 4), "permuted"),
    ((3, 5, 4), "last_dim_sliced"),
    ((2, 5, 3, 4), "last_dim_sliced"),
    ((2, 5, 3, 4), "spatial_reversed"),
    ((2, 3, 2, 3, 2, 3), "spatial_reversed"),
]


def shape_id(v):
    """The pytest id of a shape ("2x5x3x4", "scalar" for ()) or of any other parameter (its str)."""
    if isinstance(v, tuple):
        return "x".join(map(str, v)) if v else "scalar"
    return str(v)


# ================================================================================================
# Upstream gradients.

GRAD_OUTPUTS = ("random", "ones", "expanded", "expanded_row", "transposed")


def grad_output_values(shape, dtype, kind, generator):
    """The values of an upstream gradient of `shape` in the layout `kind` (GRAD_OUTPUTS): the tensor the
    layout is built from by ``lay_out_grad_output`` (a 0-d value for "expanded", the last row for
    "expanded_row"). Random values in `dtype`, drawn from `generator`."""
    def rand(s):
        return torch.randn(s, dtype=F64, generator=generator).to(dtype)

    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "expanded":  # one upstream value broadcast to every position (what loss.sum() gives)
        return rand(())
    if kind == "expanded_row" and len(shape) >= 1:  # broadcast along all but the last dim
        return rand(shape[-1:])
    if kind in ("random", "transposed", "expanded_row"):
        return rand(shape)
    raise ValueError(kind)


def lay_out_grad_output(values, shape, kind):
    """The upstream gradient of `shape` from grad_output_values(), laid out on values' device."""
    if kind in ("expanded", "expanded_row"):
        return values.expand(shape)
    if kind == "transposed":
        return _transposed(values)
    return values
