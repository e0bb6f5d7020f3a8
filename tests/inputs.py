"""Input builders and memory layouts shared by the parity suites (test_cross_entropy.py, test_nll_loss.py;
fixed_rng and keep_first_target also the focal and binary suites).

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


def make_target(positions, C, *, dtype=torch.long, ignore_index=-100, ignored=0.0):
    """Class indices (N, *) in [0, C); a fraction `ignored` of them set to ignore_index (all when >= 1)."""
    t = torch.randint(0, max(C, 1), positions, dtype=torch.long)
    if ignored:
        mask = torch.rand(positions) < ignored
        if ignored >= 1.0:
            mask[...] = True
        t[mask] = ignore_index
    return t.to(dtype)


def make_weight(C, dtype, with_zero=False):
    """A per-class weight in [0.25, 1.75), with one zero (class C // 2) when `with_zero`."""
    w = (torch.rand(C, dtype=F64) * 1.5 + 0.25).to(dtype)
    if with_zero and C > 1:
        w[C // 2] = 0
    return w


def _contiguous(x):
    return x.clone()


def _transposed(x):  # (N, C) stored as (C, N): class stride N, batch stride 1 (the lanes layout)
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def _class_sliced(x):  # x[:, ::2] of a twice-as-wide tensor: class stride 2 (fits no kernel layout)
    wide = torch.zeros((x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    return wide[:, ::2]


def _batch_sliced(x):  # x[::2] of a twice-as-tall tensor: rows 2C apart
    tall = torch.zeros((2 * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    tall[::2] = x
    return tall[::2]


def _spatial_sliced(x):  # x[..., ::2] of a K-dim tensor twice as wide in the last dim
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
    "spatial_sliced": _spatial_sliced,
    "channels_last": _channels_last,
    "permuted": _permuted,
    "spatial_reversed": _spatial_reversed,
    "misaligned": _misaligned,
    "expanded": _expanded,
}


def layouts(*names):
    """The named layouts, in the given order (a suite's parametrization)."""
    return {name: ALL_LAYOUTS[name] for name in names}
