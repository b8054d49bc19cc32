"""Memory-format helpers: which layout torch would pick for a tensor, and keeping it."""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _strides_like_channels_last(t: Tensor, order: tuple[int, ...]) -> bool:
    """torch's stride heuristic: True when `order` (fastest dim first) matches t's strides."""
    sizes, strides = t.shape, t.stride()
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


def suggest_memory_format(t: Tensor) -> torch.memory_format:
    """The memory format torch's normalization kernels give their outputs for input `t`."""
    if t.layout != torch.strided:
        return torch.contiguous_format
    if t.dim() == 4 and _strides_like_channels_last(t, (1, 3, 2, 0)):
        return torch.channels_last
    if t.dim() == 5 and _strides_like_channels_last(t, (1, 4, 3, 2, 0)):
        return torch.channels_last_3d
    return torch.contiguous_format


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
