"""torch's autocast rules for the normalization ops, applied around normkit's functional ops.

Under autocast torch runs each of these ops as one kernel: CUDA autocast first casts the
floating-point arguments of group_norm and layer_norm (its "float32" list) to float32, the
other ops keep their input dtypes, and nothing inside the op is autocast again. normkit does the
same, so its own arithmetic (plain tensor ops in the reference backend) is never recast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


def _to_float32(value):
    if isinstance(value, Tensor) and value.dtype in _AUTOCAST_DTYPES:
        return value.float()
    return value


def _autocasting(input) -> bool:
    """True under autocast for the input's device (CPU and CUDA, where normkit has kernels)."""
    if not isinstance(input, Tensor):
        return False
    if input.is_cpu:
        return torch.is_autocast_enabled("cpu")
    return input.is_cuda and torch.is_autocast_enabled("cuda")


def follows_autocast(float32_on: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorate a functional op: under autocast on the input's device, cast its float16 /
    bfloat16 tensor arguments to float32 when that device is in `float32_on`, then run the op
    with autocast off."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(input, *args, **kwargs):
            if not _autocasting(input):
                return fn(input, *args, **kwargs)
            device = input.device.type
            if device in float32_on:
                input, args = _to_float32(input), tuple(_to_float32(a) for a in args)
                kwargs = {k: _to_float32(v) for k, v in kwargs.items()}
            with torch.autocast(device, enabled=False):
                return fn(input, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
