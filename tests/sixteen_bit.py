"""Comparing 16-bit results of two normkit computations."""

from __future__ import annotations

import torch


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers in their order: neighbouring values differ by 1 (0 and -0
    are both 0)."""
    bits = t.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def units_apart(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many representable values of 16-bit got's dtype lie between got and want rounded to
    that dtype, per element."""
    return (_ordered(got) - _ordered(want.to(got.dtype))).abs()


def assert_rounded_within_one_unit(got: torch.Tensor, want: torch.Tensor) -> None:
    """16-bit `got` is `want` (float32 or float64) rounded to got's dtype, but for rare elements
    one unit away. normkit's 16-bit elementwise passes compute in float32 where `want` came from
    float64 arithmetic (the float32 kernels', or torch's float64 result), so where a value lies
    within float32's error of a rounding boundary of the 16-bit format it can round the other
    way: expected for about 2^-16 (bfloat16) to 2^-13 (float16) of the elements, 1 % allowed."""
    steps = units_apart(got, want)
    assert steps.max() <= 1, f"{steps.max()} units apart"
    assert (steps > 0).sum() <= got.numel() // 100, f"{(steps > 0).sum()} of {got.numel()} differ"
