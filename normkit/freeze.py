"""freeze(model): every batch norm with running statistics becomes a FrozenBatchNorm2d."""

from __future__ import annotations

import torch.nn as nn

from normkit.modules.frozen_batchnorm import FrozenBatchNorm2d


def freeze(model: nn.Module) -> nn.Module:
    """Replace, in place, every BatchNorm (torch's or normkit's, any rank, SyncBatchNorm too)
    that tracks running statistics by a FrozenBatchNorm2d holding its current values; returns
    the model (or the frozen layer when `model` itself is a batch norm). Layers without running
    statistics normalize with batch statistics and cannot be frozen: they are left as they are.
    """
    if _freezable(model):
        return FrozenBatchNorm2d.from_batchnorm(model)
    for name, child in model.named_children():
        frozen = freeze(child)
        if frozen is not child:
            setattr(model, name, frozen)
    return model


def _freezable(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.running_mean is not None and module.running_var is not None)
