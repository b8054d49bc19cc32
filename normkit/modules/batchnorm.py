"""BatchNorm1d/2d/3d and their Lazy forms: torch's classes with normkit's forward."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from normkit import functional as F
from normkit.modules import _registry


class BatchNormForward:
    """The forward shared by every normkit batch-norm class (mixed in before torch's class).

    It applies torch's running-statistics rules: in training with tracking on,
    num_batches_tracked is incremented first and momentum=None turns into the cumulative factor
    1/num_batches_tracked; batch statistics are used in training, and in eval only when the
    running buffers are None; buffers are handed over only when they may be used or updated.
    """

    def _batch_norm_arguments(self) -> tuple[Tensor | None, Tensor | None, bool, float]:
        """(running_mean, running_var, use_batch_stats, momentum factor) for F.batch_norm."""
        momentum, training = self.momentum, self.training
        factor = 0.0 if momentum is None else momentum
        running_mean, running_var, num_batches_tracked = _registry.running_stats(self)
        if not training:
            return running_mean, running_var, running_mean is None and running_var is None, \
                factor
        if not self.track_running_stats:
            return None, None, True, factor
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked)
        return running_mean, running_var, True, factor

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, factor = self._batch_norm_arguments()
        weight, bias = _registry.affine(self)
        return F.batch_norm(
            input, running_mean, running_var, weight, bias, use_batch_stats, factor, self.eps,
        )


class BatchNorm1d(BatchNormForward, nn.BatchNorm1d):
    r"""Batch normalization over a 2D (N, C) or 3D (N, C, L) input, computed by normkit.

    y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta per channel, with statistics over N (and L)
    in training and running estimates in eval. Same arguments, buffers and behaviour as
    :class:`torch.nn.BatchNorm1d`.

    Example::

        >>> m = normkit.BatchNorm1d(100)
        >>> y = m(torch.randn(20, 100))
    """


class BatchNorm2d(BatchNormForward, nn.BatchNorm2d):
    r"""Batch normalization over a 4D (N, C, H, W) input, computed by normkit.

    Same arguments, buffers and behaviour as :class:`torch.nn.BatchNorm2d`; channels_last input
    gives channels_last output.

    Example::

        >>> m = normkit.BatchNorm2d(32)
        >>> y = m(torch.randn(8, 32, 14, 14))
    """


class BatchNorm3d(BatchNormForward, nn.BatchNorm3d):
    r"""Batch normalization over a 5D (N, C, D, H, W) input, computed by normkit.

    Same arguments, buffers and behaviour as :class:`torch.nn.BatchNorm3d`.

    Example::

        >>> m = normkit.BatchNorm3d(16)
        >>> y = m(torch.randn(4, 16, 4, 8, 8))
    """


class LazyBatchNorm1d(BatchNormForward, nn.LazyBatchNorm1d):
    """:class:`BatchNorm1d` whose num_features is taken from the first input's dim 1."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(BatchNormForward, nn.LazyBatchNorm2d):
    """:class:`BatchNorm2d` whose num_features is taken from the first input's dim 1."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(BatchNormForward, nn.LazyBatchNorm3d):
    """:class:`BatchNorm3d` whose num_features is taken from the first input's dim 1."""

    cls_to_become = BatchNorm3d
