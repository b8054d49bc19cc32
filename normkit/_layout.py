"""Memory-format helpers: which layout torch would pick for a tensor, and keeping it."""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _strides_like_channels_last(sizes: tuple[int, ...], strides: tuple[int, ...],
                                order: tuple[int, ...]) -> bool:
    """torch's stride heuristic: True when `order` (fastest dim first) matches the strides."""
    if strides[1] == 0:
        return False
    smallest = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * max(sizes[d], 1) if sizes[d] > 1 else strides[d]
    return True


@functools.lru_cache(maxsize=256)
def _suggested_for_strides(sizes: tuple[int, ...], strides: tuple[int, ...]
                           ) -> torch.memory_format:
    """`suggest_memory_format` of a strided tensor, by its sizes and strides (memoized: the
    heuristic costs ~2 us a call, which small inputs notice)."""
    if len(sizes) == 4 and _strides_like_channels_last(sizes, strides, (1, 3, 2, 0)):
        return torch.channels_last
    if len(sizes) == 5 and _strides_like_channels_last(sizes, strides, (1, 4, 3, 2, 0)):
        return torch.channels_last_3d
    return torch.contiguous_format


def suggest_memory_format(t: Tensor) -> torch.memory_format:
    """The memory format torch's normalization kernels give their outputs for input `t`."""
    if t.layout != torch.strided:
        return torch.contiguous_format
    return _suggested_for_strides(t.shape, t.stride())


def dense_in_suggested_format(t: Tensor) -> Tensor:
    """`t` itself when already dense in its suggested format, else a copy that is."""
    if t.is_contiguous():
        return t
    return t.contiguous(memory_format=suggest_memory_format(t))


def with_strides_of(values: Tensor, like: Tensor) -> Tensor:
    """`values` laid out with the strides of the dense tensor `like` (differentiable)."""
    if values.stride() == like.stride():
        return values
    return torch.empty_like(like, dtype=values.dtype).copy_(values)


@functools.cache
def batch_layout(rank: int, channels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """BatchNorm of a rank-`rank` input with `channels` channels: the dims its statistics
    run over (all but dim 1) and the shape (1, C, 1, ...) its per-channel tensors broadcast
    in."""
    return (0, *range(2, rank)), (1, channels) + (1,) * (rank - 2)
