"""Reuse of large CPU output buffers, so hot loops do not pay page faults.

A fresh 100 MB tensor costs ~40 ms of page faults on first touch (the kernel zeroes every 4 KiB
page), four times what a bandwidth-bound normalization of it costs. Outputs of at least
`MIN_BYTES` are therefore carved from buffers that earlier outputs released: a buffer returns to
the pool when the last tensor using its memory is freed (a finalizer on the numpy array the
tensor wraps), and the pool keeps at most `max_bytes` (``NORMKIT_CPU_CACHE_BYTES``, default
1 GiB; 0 disables it).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

MIN_BYTES = 1 << 22

_lock = threading.Lock()
_free: dict[int, list[np.ndarray]] = defaultdict(list)
_held = 0
max_bytes = int(os.environ.get("NORMKIT_CPU_CACHE_BYTES", 1 << 30))


def _release(raw: np.ndarray) -> None:
    global _held
    with _lock:
        if _held + raw.nbytes <= max_bytes:
            _free[raw.nbytes].append(raw)
            _held += raw.nbytes


def _acquire(nbytes: int) -> np.ndarray:
    global _held
    with _lock:
        if _free.get(nbytes):
            _held -= nbytes
            return _free[nbytes].pop()
    return np.empty(nbytes, dtype=np.uint8)


def empty_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """torch.empty_like(x, dtype=dtype) for a dense x (x's strides; x's dtype by default), from
    the pool when large."""
    if dtype is None:
        dtype = x.dtype
        if x.numel() * dtype.itemsize < MIN_BYTES:
            return torch.empty_like(x)  # without keywords: 0.6 µs less, small calls notice
    nbytes = x.numel() * dtype.itemsize
    if max_bytes <= 0 or nbytes < MIN_BYTES:
        return torch.empty_like(x, dtype=dtype)
    raw = _acquire(nbytes)
    flat = raw.view()  # the tensor keeps this view alive; its end returns `raw` to the pool
    weakref.finalize(flat, _release, raw)
    return torch.from_numpy(flat).view(dtype).as_strided(x.shape, x.stride())


def converted(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t.to(dtype) for a dense t, into pooled memory when large; autograd sees the conversion
    (its backward converts the grad back, pooled too when laid out as t). While torch.compile
    traces, plain `t.to(dtype)` (the pool's numpy buffers are no graph ops)."""
    if torch.compiler.is_compiling():
        return t.to(dtype)
    if t.requires_grad and torch.is_grad_enabled():
        return _Converted.apply(t, dtype)
    return empty_like(t, dtype).copy_(t)


class _Converted(torch.autograd.Function):
    """`converted` as an autograd node: dtype in, dtype back for the grad."""

    @staticmethod
    def forward(ctx, t, dtype):
        ctx.dtype, ctx.strides = t.dtype, t.stride()
        return empty_like(t, dtype).copy_(t)

    @staticmethod
    def backward(ctx, grad):
        if grad.stride() != ctx.strides or torch.is_grad_enabled():
            return grad.to(ctx.dtype), None
        return empty_like(grad, ctx.dtype).copy_(grad), None


def clear() -> None:
    """Drop every cached buffer."""
    global _held
    with _lock:
        _free.clear()
        _held = 0
