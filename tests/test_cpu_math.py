"""normkit.backends.cpu_math.exp against libm, inside loops compiled as the kernels are."""

import math

import numpy as np
import pytest
from numba import njit

from normkit.backends import cpu_kernels, cpu_math


@njit(fastmath=cpu_kernels.FASTMATH, error_model="numpy")
def _exp_loop(a, out):
    """As the fused kernels call it: in a loop compiled with reassociation allowed (which must
    not leak into exp's range reduction)."""
    for i in range(a.shape[0]):
        out[i] = cpu_math.exp(a[i])


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.abs(got - want) / np.spacing(np.abs(want))


@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (-30.0, 30.0), (-708.0, 709.0), (-745.0, -700.0)])
def test_exp_within_one_ulp_of_libm(lo, hi):
    a = np.random.default_rng(0).uniform(lo, hi, 100_000)
    got = np.empty_like(a)
    _exp_loop(a, got)
    want = np.array([math.exp(v) for v in a])
    assert _ulps(got, want).max() <= 1.0


def test_exp_special_values():
    edges = [0.0, -0.0, 1e-300, -1e-310, 709.78, 709.7827, 709.7828, 710.0, 1e308, np.inf,
             -708.4, -720.3, -745.13, -745.14, -1e308, -np.inf, np.nan, 0.5 * math.log(2.0)]
    a = np.array(edges)
    got = np.empty_like(a)
    _exp_loop(a, got)
    with np.errstate(over="ignore"):
        want = np.exp(a)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    assert np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    assert _ulps(got[finite], want[finite]).max() <= 1.0
