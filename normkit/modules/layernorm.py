"""LayerNorm: torch's class with normkit's forward."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from normkit import functional as F
from normkit.modules import _registry


class LayerNorm(nn.LayerNorm):
    r"""Layer normalization over the trailing `normalized_shape` dims, computed by normkit.

    Same arguments (note `bias` is positional here, as in torch) and behaviour as
    :class:`torch.nn.LayerNorm`.

    Example::

        >>> m = normkit.LayerNorm(1024)
        >>> y = m(torch.randn(16, 128, 1024))
    """

    def forward(self, input: Tensor) -> Tensor:
        weight, bias = _registry.affine(self)
        return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)
