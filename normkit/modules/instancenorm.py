"""InstanceNorm1d/2d/3d: torch's classes with normkit's forward."""

from __future__ import annotations

import warnings

import torch.nn as nn
from torch import Tensor

from normkit import functional as F
from normkit.modules import _registry


class InstanceNormForward:
    """The forward shared by normkit's instance-norm classes (mixed in before torch's class).

    Torch's rules: a channel-count mismatch is an error with affine parameters and a warning
    without; unbatched input gets a batch dim for the call; instance statistics are used in
    training and whenever running statistics are not tracked; momentum=None means 0.
    """

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        weight, bias = _registry.affine(self)
        running_mean, running_var, _ = _registry.running_stats(self)
        return F.instance_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {input.size(feature_dim)}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        if input.dim() == self._get_no_batch_dim():
            return self._apply_instance_norm(input.unsqueeze(0)).squeeze(0)
        return self._apply_instance_norm(input)


class InstanceNorm1d(InstanceNormForward, nn.InstanceNorm1d):
    r"""Instance normalization over a (N, C, L) or unbatched (C, L) input, computed by normkit.

    Each (sample, channel) is normalized over L. Same arguments (affine=False and
    track_running_stats=False by default) and behaviour as :class:`torch.nn.InstanceNorm1d`.

    Example::

        >>> m = normkit.InstanceNorm1d(8)
        >>> y = m(torch.randn(4, 8, 50))
    """


class InstanceNorm2d(InstanceNormForward, nn.InstanceNorm2d):
    r"""Instance normalization over a (N, C, H, W) or unbatched (C, H, W) input, by normkit.

    Same arguments and behaviour as :class:`torch.nn.InstanceNorm2d`.

    Example::

        >>> m = normkit.InstanceNorm2d(3, affine=True)
        >>> y = m(torch.randn(2, 3, 32, 32))
    """


class InstanceNorm3d(InstanceNormForward, nn.InstanceNorm3d):
    r"""Instance normalization over a (N, C, D, H, W) or unbatched (C, D, H, W) input, by normkit.

    Same arguments and behaviour as :class:`torch.nn.InstanceNorm3d`.

    Example::

        >>> m = normkit.InstanceNorm3d(4)
        >>> y = m(torch.randn(2, 4, 8, 8, 8))
    """
