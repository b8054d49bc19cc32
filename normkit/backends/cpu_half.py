"""16-bit float storage for the numba kernels: float16 / bfloat16 values to and from float32.

numba has no float16 type and numpy no bfloat16, so 16-bit tensors reach a kernel as uint16
arrays and each value is converted by LLVM operations: float16 by fpext / fptrunc (IEEE round
to nearest even), bfloat16 by moving its bits (widening is exact; narrowing rounds to nearest
even and keeps NaN a quiet NaN), as torch converts. `half` says which: True for float16, False
for bfloat16. numba's on-disk cache of the kernels that inline these does not notice edits to
this file: clear the cache (the `__pycache__` *.nbi / *.nbc files) after changing it.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit
from numba import types as nbtypes
from numba.extending import intrinsic

_I32 = ir.IntType(32)


def _i32(value: int) -> ir.Constant:
    return ir.Constant(_I32, value)


@intrinsic
def _from_float16(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return nbtypes.float32(nbtypes.uint16), codegen


@intrinsic
def _to_float16(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return nbtypes.uint16(nbtypes.float32), codegen


@intrinsic
def _from_bfloat16(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.shl(builder.zext(args[0], _I32), _i32(16)), ir.FloatType())

    return nbtypes.float32(nbtypes.uint16), codegen


@intrinsic
def _to_bfloat16(typingctx, value):
    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], _I32)
        high = builder.lshr(bits, _i32(16))
        odd = builder.and_(high, _i32(1))
        rounded = builder.lshr(builder.add(builder.add(bits, _i32(0x7FFF)), odd), _i32(16))
        nan = builder.icmp_unsigned(">", builder.and_(bits, _i32(0x7FFFFFFF)), _i32(0x7F800000))
        quiet = builder.or_(high, _i32(0x40))
        return builder.trunc(builder.select(nan, quiet, rounded), ir.IntType(16))

    return nbtypes.uint16(nbtypes.float32), codegen


@njit(inline="always", cache=True)
def load(bits, half):
    """The float32 value of 16-bit `bits`."""
    return _from_float16(bits) if half else _from_bfloat16(bits)


@njit(inline="always", cache=True)
def store(value, half):
    """The 16-bit bits of float32 `value`, rounded to nearest even."""
    return _to_float16(value) if half else _to_bfloat16(value)
