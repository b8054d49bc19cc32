"""The Triton kernels as torch.library.triton_op operators, so that torch.compile and
torch.export graphs hold the kernels themselves (Inductor schedules them with its own code).

Eager code launches the kernels directly (`gpu.normalize`, lower overhead); while torch traces
CUDA tensors, `gpu.normalize` calls `normkit::triton_normalize_forward`, whose backward is
`normkit::triton_normalize_backward`. Their launches go through
`torch.library.wrap_triton` (`gpu_launch.traceable_launches`). Needs torch >= 2.6 (triton_op);
the backward is first-order only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit._layout import with_strides_of
from normkit.backends import gpu_launch
from normkit.backends.plan import Plan


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=gpu_launch.accumulation_dtype(like.dtype)) if t is None else t


def _or_none(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


@torch.library.triton_op("normkit::triton_normalize_forward", mutates_args=())
def normalize_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                      mean: Tensor | None, var: Tensor | None, eps: float, kind: str,
                      sizes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(y, stats, coef) of `gpu_launch.forward` for the plan (kind, *sizes); a statistics
    tensor the launch does not produce is returned empty."""
    with gpu_launch.traceable_launches():
        y, stats, coef = gpu_launch.forward(Plan(kind, *sizes), x, weight, bias, eps, mean,
                                            var)
    return y, _or_empty(stats, x), _or_empty(coef, x)


@torch.library.triton_op("normkit::triton_normalize_backward", mutates_args=())
def normalize_backward(x: Tensor, dy: Tensor, weight: Tensor | None, stats: Tensor,
                       coef: Tensor, need_dx: bool, kind: str,
                       sizes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of `gpu_launch.backward`; dx is empty when not needed, dweight /
    dbias flat in the accumulation dtype. dy must have x's strides."""
    with gpu_launch.traceable_launches():
        dx, dw, db = gpu_launch.backward(Plan(kind, *sizes), x, dy, weight, _or_none(stats),
                                         _or_none(coef), need_dx)
    return x.new_empty(0) if dx is None else dx, dw.clone(), db.clone()


def _setup_context(ctx, inputs, output):
    x, weight, bias, _mean, _var, _eps, kind, sizes = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.kind, ctx.sizes = kind, sizes
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)


def _backward(ctx, dy, _dstats, _dcoef):
    x, weight, stats, coef = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, dw, db = normalize_backward(x, with_strides_of(dy, x), weight, stats, coef, need_dx,
                                    ctx.kind, ctx.sizes)
    dw = None if weight is None else dw.reshape(weight.shape).to(weight.dtype)
    db = None if ctx.bias_meta is None else db.reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1])
    return (dx if need_dx else None), dw, db, None, None, None, None, None


normalize_forward.register_autograd(_backward, setup_context=_setup_context)
