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


def empty_like(x: Tensor) -> Tensor:
    """torch.empty_like(x) for a dense x (same dtype and strides), from the pool when large."""
    nbytes = x.numel() * x.element_size()
    if max_bytes <= 0 or nbytes < MIN_BYTES:
        return torch.empty_like(x)
    raw = _acquire(nbytes)
    flat = raw.view(np.dtype(str(x.dtype).removeprefix("torch.")))
    weakref.finalize(flat, _release, raw)
    return torch.from_numpy(flat).as_strided(x.shape, x.stride())


def clear() -> None:
    """Drop every cached buffer."""
    global _held
    with _lock:
        _free.clear()
        _held = 0
