"""The CPU kernels as torch custom ops, so torch.compile / torch.export graphs call them.

Eager code calls the kernels directly (lower overhead); while torch traces, `cpu.normalize`
goes through `normkit::cpu_normalize_forward` / `normkit::cpu_normalize_backward`, which have
fake implementations (shapes and dtypes only) and a registered autograd formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit.backends.plan import Plan


@torch.library.custom_op("normkit::cpu_normalize_forward", mutates_args=())
def normalize_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                      mean: Tensor | None, var: Tensor | None, eps: float, kind: str,
                      sizes: list[int]) -> tuple[Tensor, Tensor]:
    """(y, stats) of `cpu._forward` for the plan (kind, *sizes); stats is float64 (3, items)."""
    from normkit.backends import cpu

    y, stats = cpu._forward(Plan(kind, *sizes), x, weight, bias, eps, mean, var)
    return y, stats.clone()


@normalize_forward.register_fake
def _(x, weight, bias, mean, var, eps, kind, sizes):
    plan = Plan(kind, *sizes)
    return torch.empty_like(x), x.new_empty((3, plan.items), dtype=torch.float64)


@torch.library.custom_op("normkit::cpu_normalize_backward", mutates_args=())
def normalize_backward(x: Tensor, dy: Tensor, weight: Tensor | None, stats: Tensor,
                       batch_stats: bool, need_dx: bool, kind: str,
                       sizes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) of `cpu._backward`; dx is empty when not needed, dw/db in the plan's
    weight shape (the op's contract: compiled graphs cached by torch.compile assert it)."""
    from normkit.backends import cpu

    plan = Plan(kind, *sizes)
    dx, dw, db = cpu._backward(plan, x, dy, weight, stats, batch_stats, need_dx)
    return ((x.new_empty(0) if dx is None else dx), dw.view(plan.weight_shape),
            db.view(plan.weight_shape))


@normalize_backward.register_fake
def _(x, dy, weight, stats, batch_stats, need_dx, kind, sizes):
    plan = Plan(kind, *sizes)
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = x.new_empty(plan.weight_shape)
    return dx, dw, torch.empty_like(dw)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mean, _var, _eps, kind, sizes = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.kind, ctx.sizes, ctx.batch_stats = kind, sizes, mean is None


def _backward(ctx, dy, _dstats):
    x, weight, bias, stats = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, dw, db = normalize_backward(x, dy, weight, stats, ctx.batch_stats, need_dx, ctx.kind,
                                    ctx.sizes)
    dw = None if weight is None else dw.reshape(weight.shape)
    db = None if bias is None else db.reshape(bias.shape)
    return (dx if need_dx else None), dw, db, None, None, None, None, None


normalize_forward.register_autograd(_backward, setup_context=_setup_context)
