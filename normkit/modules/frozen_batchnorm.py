"""FrozenBatchNorm2d: batch norm with fixed statistics and affine, all stored as buffers."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from normkit import functional as F


class FrozenBatchNorm2d(nn.Module):
    r"""y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, nothing trainable.

    weight, bias, running_mean and running_var are buffers (no gradients, untouched by
    optimizers, never updated), as in torchvision's FrozenBatchNorm2d. A BatchNorm state_dict
    loads into it (num_batches_tracked is ignored). Accepts any (N, C, *) input.

    Example::

        >>> frozen = normkit.FrozenBatchNorm2d(64)
        >>> frozen.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm2d:
        """The frozen form of a batch-norm layer with running statistics (copies its values)."""
        frozen = cls(bn.num_features, bn.eps, device=bn.running_mean.device,
                     dtype=bn.running_mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
