"""exp in float64 as straight-line numba code that LLVM can vectorize.

numba calls libm's exp one element at a time (its SVML vector library is not in the pip
builds of llvmlite), which made the fused BatchNorm + SiLU / GELU kernels spend most of their
time there. This version uses only arithmetic, comparisons and bit casts, so a loop over it
becomes SIMD code (measured: 2.3 against 6.4 ns per element on this project's 2-core VM).

x = n·ln2 + r with |r| ≤ ln2/2 (Cody-Waite: ln2 split in a high part exact in
n·ln2_hi and a low part), e^r by its Taylor polynomial to degree 13 (truncation < 1e-17),
times 2^n built in the exponent bits. At the ends of the range 2^n is applied in two steps
(so that subnormal results and e^709.78 come out right); overflow gives inf, NaN stays NaN.
It agrees with libm's exp to one unit in the last place (tests/test_cpu_math.py).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from numba import types as nbtypes
from numba.extending import intrinsic

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 to 32 bits: n * _LN2_HI is exact for |n| < 2^21
_LN2_LO = 1.90821492927058770002e-10  # ln 2 - _LN2_HI
_ROUNDER = 6755399441055744.0  # 1.5 * 2^52: n + _ROUNDER holds the integer n in its low bits
_EXP_MAX = 709.782712893384  # log(largest double)
_EXP_MIN = -745.1332191019412  # log(smallest subnormal / 2)
_SUBNORMAL_SHIFT = 2.0 ** -54
_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(14))


@intrinsic
def _bits(typingctx, value):
    """The IEEE bits of a float64, as an int64."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(nbtypes.int64))

    return nbtypes.int64(nbtypes.float64), codegen


@intrinsic
def _from_bits(typingctx, bits):
    """The float64 whose IEEE bits are the int64 `bits`."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(nbtypes.float64))

    return nbtypes.float64(nbtypes.int64), codegen


@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def exp(x):
    """e^x in float64 (see the module docstring)."""
    xc = min(max(x, _EXP_MIN), _EXP_MAX)
    n = np.rint(xc * _LOG2E)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = _TAYLOR[13]
    for k in range(12, -1, -1):
        p = p * r + _TAYLOR[k]
    k = _bits(n + _ROUNDER) - _bits(_ROUNDER)  # n as an integer
    low = k < -1000
    high = k > 1000
    y = p * _from_bits((k + (1077 if low else (1022 if high else 1023))) << 52)
    if low:
        y *= _SUBNORMAL_SHIFT
    if high:
        y *= 2.0
    if x > _EXP_MAX:
        y = np.inf
    if x < _EXP_MIN:
        y = 0.0
    if x != x:
        y = x
    return y
