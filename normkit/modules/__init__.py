"""normkit's layer classes: torch.nn's normalization classes with normkit's forward."""

from normkit.modules.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from normkit.modules.batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from normkit.modules.frozen_batchnorm import FrozenBatchNorm2d
from normkit.modules.groupnorm import GroupNorm
from normkit.modules.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normkit.modules.layernorm import LayerNorm
from normkit.modules.syncbatchnorm import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "GroupNorm",
    "LayerNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "FrozenBatchNorm2d",
]
