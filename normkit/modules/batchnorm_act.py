"""BatchNormAct1d/2d/3d: batch norm, residual add and activation as one fused layer."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from normkit import functional as F
from normkit.modules import _registry
from normkit.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d


class BatchNormActForward:
    """forward(x, residual=None) = act(batch_norm(x) + residual), running statistics as BN."""

    def _init_act(self, act: str, negative_slope: float, memory_efficient: bool) -> None:
        from normkit._batch_norm_act import check_act

        check_act(act)
        self.act = act
        self.negative_slope = negative_slope
        self.memory_efficient = memory_efficient

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, factor = self._batch_norm_arguments()
        weight, bias = _registry.affine(self)
        return F.batch_norm_act(
            input, running_mean, running_var, weight, bias, use_batch_stats, factor,
            self.eps, self.act, self.negative_slope, residual, self.memory_efficient,
        )

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.act == "leaky_relu" else ""
        return (f"{nn.modules.batchnorm._NormBase.extra_repr(self)}, act={self.act}{slope}, "
                f"memory_efficient={self.memory_efficient}")


def _act_class(base: type, rank_doc: str) -> type:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, act: str = "relu", negative_slope: float = 0.01,
                 memory_efficient: bool = False, **kwargs) -> None:
        base.__init__(self, num_features, eps, momentum, affine, track_running_stats, device,
                      dtype, **kwargs)
        self._init_act(act, negative_slope, memory_efficient)

    doc = (f"act(batch_norm(x) + residual) for {rank_doc} input, as one autograd node.\n\n"
           f"    A {base.__name__} (same parameters, buffers and state_dict: a {base.__name__} "
           "state_dict loads into it) whose forward takes an optional residual and applies `act`"
           " ('identity', 'relu', 'leaky_relu' with `negative_slope`, 'silu', 'gelu'). With "
           "`memory_efficient=True` backward keeps only the input plus a 1-bit sign mask "
           "(relu/leaky_relu) or the residual (silu/gelu) and recomputes the rest, exactly.\n\n"
           "    Example::\n\n        >>> m = normkit.BatchNormAct2d(64, act='relu')\n"
           "        >>> y = m(x, residual=shortcut)\n")
    return __init__, doc


class BatchNormAct1d(BatchNormActForward, BatchNorm1d):
    __init__, __doc__ = _act_class(BatchNorm1d, "(N, C) or (N, C, L)")


class BatchNormAct2d(BatchNormActForward, BatchNorm2d):
    __init__, __doc__ = _act_class(BatchNorm2d, "(N, C, H, W)")


class BatchNormAct3d(BatchNormActForward, BatchNorm3d):
    __init__, __doc__ = _act_class(BatchNorm3d, "(N, C, D, H, W)")
