"""normkit: torch.nn's normalization layers, computed by normkit's own kernels.

Swap ``import torch.nn as nn`` for ``import normkit as nk``: ``nk.BatchNorm2d`` is a
``torch.nn.BatchNorm2d`` (same arguments, buffers, state_dict, errors), whose arithmetic runs in
normkit's backends instead of torch's native normalization ops.
"""

from normkit import functional
from normkit.backends import available_backends, set_backend, use_backend
from normkit.modules import (
    BatchNorm1d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    FrozenBatchNorm2d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    SyncBatchNorm,
)

from normkit.convert import convert  # noqa: E402 - needs the classes above
from normkit.fold import fold_batchnorm  # noqa: E402
from normkit.freeze import freeze  # noqa: E402
from normkit.precise_bn import update_bn_stats  # noqa: E402

__version__ = "0.1.0"

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
    "freeze",
    "convert",
    "fold_batchnorm",
    "update_bn_stats",
    "functional",
    "set_backend",
    "use_backend",
    "available_backends",
]
