"""update_bn_stats: exact population statistics for every batch norm, from given batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn


class _Moments:
    """Running (count, mean, M2) per channel, merged batch by batch with Chan's formula."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        xf = x.detach().double()
        mean = xf.mean(dims)
        m2 = (xf - mean.view([1, -1] + [1] * (x.dim() - 2))).square().sum(dims)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total


@torch.no_grad()
def update_bn_stats(model: nn.Module, data: Iterable, num_batches: int | None = None,
                    progress: bool = True) -> nn.Module:
    """Set every batch norm's running_mean / running_var (torch's or normkit's layers) to the
    exact mean and unbiased variance of its inputs over the given batches ("precise BN").

    The model runs in training mode, so each layer sees the inputs it sees while training;
    `data` yields input batches (or tuples/lists whose first item is the input); at most
    `num_batches` are used. Momentum, num_batches_tracked and training flags are restored
    afterwards. Returns the model.
    """
    from tqdm import tqdm

    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.running_mean is not None]
    moments = {m: _Moments() for m in layers}
    saved = {m: (m.momentum, m.num_batches_tracked.clone()) for m in layers}
    flags = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, args: moments[mod].add(args[0]))
             for m in layers]
    try:
        model.train()
        for m in layers:
            m.momentum = 0.0
        for i, batch in enumerate(tqdm(data, total=num_batches, disable=not progress,
                                       desc="update_bn_stats")):
            if num_batches is not None and i >= num_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in hooks:
            h.remove()
        for m, (momentum, nbt) in saved.items():
            m.momentum = momentum
            m.num_batches_tracked.copy_(nbt)
        for m, flag in flags.items():
            m.training = flag
    for m, mom in moments.items():
        if mom.mean is None:
            continue
        m.running_mean.copy_(mom.mean)
        m.running_var.copy_(mom.m2 / max(mom.count - 1, 1))
    return model
