"""Bitwise comparison of results, shared by the determinism tests of the parity suites."""

import torch


def bits(t):
    """The tensor's raw bits as integers: a comparison that also tells NaN payloads and -0.0 apart."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)


def assert_bitwise(a, b, what):
    """Two lists of tensors are equal bit for bit, pairwise."""
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(bits(u), bits(v)), (
            f"{what}: output {i} differs bitwise (max diff {(u.double() - v.double()).abs().max().item():.3e})"
        )
