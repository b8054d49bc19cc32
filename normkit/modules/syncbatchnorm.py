"""SyncBatchNorm: torch's class with normkit's forward, synchronising on CPU (gloo) too."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from normkit import _checks
from normkit import functional as F
from normkit._layout import dense_in_suggested_format
from normkit._sync_batch_norm import SyncBatchNormFunction
from normkit.modules.batchnorm import BatchNormForward


class SyncBatchNorm(BatchNormForward, nn.SyncBatchNorm):
    r"""Batch normalization whose training statistics span a torch.distributed process group.

    Same arguments and behaviour as :class:`torch.nn.SyncBatchNorm`. Without an initialised
    process group, in eval, or with a single rank it is exactly :class:`normkit.BatchNorm2d`'s
    computation for any input rank >= 2. Unlike torch, synchronisation also works for CPU
    tensors (gloo).

    Example::

        >>> m = normkit.SyncBatchNorm(64)
        >>> y = m(torch.randn(8, 64, 16, 16))  # no process group: plain batch norm
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        running_mean, running_var, use_batch_stats, factor = self._batch_norm_arguments()
        group = self.process_group or (dist.group.WORLD if dist.is_available() else None)
        world = 1
        if use_batch_stats and self.training and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size(group)
        if world == 1:
            return F.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                factor, self.eps,
            )
        _checks.check_eps(self.eps, True)
        _checks.check_dtypes(
            "batch_norm", input, self.weight, self.bias, running_mean, running_var,
            dispatch_first=True,
        )
        return SyncBatchNormFunction.apply(
            dense_in_suggested_format(input), self.weight, self.bias, running_mean, running_var,
            self.eps, factor, group, world, self.num_features,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch-norm layer (torch's or normkit's) in `module` by this class.

        The new layers share the old ones' Parameter and buffer objects and training flag (and
        qconfig when present). Returns `module`, changed in place, or a new layer when `module`
        itself is a batch norm.
        """
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # Only a layer built with bias=False needs the keyword (absent in older torch).
            no_bias = {"bias": False} if module.affine and module.bias is None else {}
            converted = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                **no_bias,
            )
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
