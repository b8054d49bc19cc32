"""convert(model): swap torch.nn normalization layers for their normkit twins, or back."""

from __future__ import annotations

import torch.nn as nn

import normkit

NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
         "LazyBatchNorm3d", "SyncBatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm1d",
         "InstanceNorm2d", "InstanceNorm3d")
TO_NORMKIT = {getattr(nn, n): getattr(normkit, n) for n in NAMES}
TO_TORCH = {v: k for k, v in TO_NORMKIT.items()}


def convert(model: nn.Module, to: str = "normkit") -> nn.Module:
    """Turn every torch.nn normalization layer in `model` into its normkit twin (to="normkit")
    or back (to="torch"), in place; returns `model`.

    Each layer keeps its identity: only its class changes (normkit's classes subclass torch's
    and hold no extra state), so Parameters, buffers, hooks, training flags and any references
    to the layer (an optimizer's, a parent's) stay valid. Only exact classes are converted:
    subclasses defined elsewhere (e.g. a model library's fused layer) are left alone.
    """
    table = {"normkit": TO_NORMKIT, "torch": TO_TORCH}.get(to)
    if table is None:
        raise ValueError(f"to must be 'normkit' or 'torch', got {to!r}")
    for module in model.modules():
        target = table.get(type(module))
        if target is not None:
            module.__class__ = target
    return model
