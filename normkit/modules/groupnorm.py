"""GroupNorm: torch's class with normkit's forward."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from normkit import functional as F
from normkit.modules import _registry


class GroupNorm(nn.GroupNorm):
    r"""Group normalization over a (N, C, *) input, computed by normkit.

    The C channels form `num_groups` groups; each (sample, group) is normalized over its channels
    and spatial positions, then a per-channel affine is applied, in train and eval alike. Same
    arguments and behaviour as :class:`torch.nn.GroupNorm`; channels_last is kept.

    Example::

        >>> m = normkit.GroupNorm(4, 32)
        >>> y = m(torch.randn(8, 32, 16, 16))
    """

    def forward(self, input: Tensor) -> Tensor:
        weight, bias = _registry.affine(self)
        return F.group_norm(input, self.num_groups, weight, bias, self.eps)
