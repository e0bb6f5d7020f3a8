#!/usr/bin/env python
"""Fits the polynomial of the CPU kernels' exp (csrc/cpu/simd/vec.h: kExpC2..kExpC6).

exp(x) = 2^n exp(r) with |r| <= ln2/2, and exp(r) ~ 1 + r + c2 r^2 + ... + c6 r^6: the first two
coefficients are fixed to 1, so that exp(0) is exactly 1 and the evaluation 1 + r (1 + r (c2 + ...)) adds
no rounding of its own to them. c2..c6 minimize the maximum relative error on [-ln2/2, ln2/2] (Lawson's
iteratively reweighted least squares, float64). Prints the coefficients as float32 literals and the
fit's maximum relative error; the rounded float evaluation is tested against float64 over every float
input by tests/test_cross_entropy.py::test_cpu_exp_accuracy.

    python scripts/fit_exp_polynomial.py
"""

import numpy as np


def fit(degree: int = 6, points: int = 4000, iterations: int = 40):
    half = np.log(2.0) / 2 * 1.0005  # a little beyond ln2/2: the reduced argument's rounding
    r = np.cos(np.pi * (np.arange(points) + 0.5) / points) * half  # Chebyshev nodes
    e = np.exp(r)
    powers = np.stack([r**k for k in range(2, degree + 1)], axis=1)
    a = powers / e[:, None]  # relative error: (1 + r + sum c_k r^k - e^r) / e^r
    b = (e - 1 - r) / e
    w = np.ones(points)
    for _ in range(iterations):
        sw = np.sqrt(w)
        c, *_ = np.linalg.lstsq(a * sw[:, None], b * sw, rcond=None)
        err = np.abs(a @ c - b)
        w = w * err
        w /= w.sum()
    return c, err.max()


if __name__ == "__main__":
    coeffs, max_err = fit()
    print(f"max relative error of the fit: {max_err:.3e} ({max_err / 2.0**-23:.3f} ulp of 2^-23)")
    for k, c in enumerate(coeffs, start=2):
        print(f"constexpr float kExpC{k} = {float(np.float32(c)):.10e}f;")
