"""Batch normalization whose statistics span every rank of a torch.distributed process group.

Forward: each rank reduces its own (count, mean, M2) per channel; one all_gather shares them and
every rank merges them with Chan's parallel formula, so unequal and empty per-rank batches are
exact. Backward: one all_reduce (SUM) of per-channel (sum dy*w, sum dy*w*(x - mean)) gives each
rank the input gradient of batch norm over the concatenated batch; weight and bias gradients
stay local, as in torch. Works for any device whose backend supports the collectives (gloo on
CPU, NCCL on CUDA).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from normkit._layout import with_strides_of
from normkit.backends.reference import accumulation_dtype


def _local_row(x: Tensor, num_features: int, acc: torch.dtype) -> Tensor:
    """[count, channels, mean(num_features), M2(num_features)] of this rank's batch.

    The row's length depends only on num_features (the same module on every rank), so the
    collective cannot deadlock on mismatched sizes; a rank whose input has another channel
    count sends zeros and its count of channels, and every rank then raises.
    """
    channels = x.shape[1]
    count = x.numel() // channels
    mean = torch.zeros(num_features, dtype=acc, device=x.device)
    m2 = torch.zeros_like(mean)
    if count and channels == num_features:
        dims = (0,) + tuple(range(2, x.dim()))
        xf = x.to(acc)
        mean = xf.mean(dims)
        m2 = (xf - mean.view((1, -1) + (1,) * (x.dim() - 2))).square().sum(dims)
    header = torch.tensor([float(count), float(channels)], dtype=acc, device=x.device)
    return torch.cat([header, mean, m2])


def _merge_rows(rows: Tensor, num_features: int) -> tuple[int, Tensor, Tensor]:
    """(total count, mean, M2) from every rank's row (Chan et al.'s parallel variance)."""
    channels = [int(c) for c in rows[:, 1].tolist()]
    if any(c != num_features for c in channels):
        raise ValueError(
            f"SyncBatchNorm: ranks disagree on the number of input channels: {channels} "
            f"(num_features={num_features})"
        )
    counts = rows[:, :1]
    means = rows[:, 2 : 2 + num_features]
    m2s = rows[:, 2 + num_features :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total.clamp(min=1)
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return int(total.item()), mean, m2


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over the union of all ranks' batches (first-order autograd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world,
                num_features):
        acc = accumulation_dtype(x.dtype)
        row = _local_row(x, num_features, acc)
        rows = [torch.empty_like(row) for _ in range(world)]
        dist.all_gather(rows, row, group=group)
        total, mean, m2 = _merge_rows(torch.stack(rows), num_features)
        rstd = (m2 / max(total, 1) + eps).rsqrt()

        shape = (1, num_features) + (1,) * (x.dim() - 2)
        y = (x.to(acc) - mean.view(shape)) * rstd.view(shape)
        if weight is not None:
            y = y * weight.to(acc).view(shape)
        if bias is not None:
            y = y + bias.to(acc).view(shape)
        if running_mean is not None and total > 0:
            with torch.no_grad():
                # NOTE: unbiased global variance for the running estimate, biased for the output.
                unbiased = m2.double() / max(total - 1, 1)
                for running, batch in ((running_mean, mean.double()), (running_var, unbiased)):
                    running.copy_(momentum * batch + (1.0 - momentum) * running.double())
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.total, ctx.group, ctx.has_bias = total, group, bias is not None
        return with_strides_of(y.to(x.dtype), x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        channels = mean.numel()
        acc = mean.dtype
        dims = (0,) + tuple(range(2, x.dim()))
        shape = (1, channels) + (1,) * (x.dim() - 2)
        dyf = dy.to(acc)
        xmu = x.to(acc) - mean.view(shape)
        local_sum_dy = dyf.sum(dims)
        local_sum_dy_xmu = (dyf * xmu).sum(dims)
        w = torch.ones_like(mean) if weight is None else weight.to(acc)
        sums = torch.cat([local_sum_dy * w, local_sum_dy_xmu * w])
        dist.all_reduce(sums, group=ctx.group)
        sum_g, sum_g_xmu = sums[:channels], sums[channels:]
        total = max(ctx.total, 1)
        dx = None
        if ctx.needs_input_grad[0]:
            g = dyf * w.view(shape)
            dx = (g - (sum_g / total).view(shape)
                  - xmu * (rstd.square() * sum_g_xmu / total).view(shape)) * rstd.view(shape)
            dx = with_strides_of(dx.to(x.dtype), x)
        dw = (local_sum_dy_xmu * rstd).to(weight.dtype) if weight is not None else None
        db = local_sum_dy.to(weight.dtype) if ctx.has_bias else None
        return dx, dw, db, None, None, None, None, None, None, None
