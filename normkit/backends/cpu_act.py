"""CPU backend for act(batch_norm(x) + residual): the fused numba kernels and their autograd.

Covers float32/float64 CPU input laid out for the 'mid' (NCHW-like) or 'cols' (channels_last,
2D) BatchNorm plans; anything else runs the composition in `normkit._batch_norm_act`. The
kernels always keep the minimal state for backward: x, the statistics, a 1-bit mask
(relu / leaky_relu) or the residual (silu / gelu, to recompute z).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from normkit._layout import with_strides_of
from normkit.backends import cpu, cpu_buffers
from normkit.backends.plan import Plan

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}
_NO_BITS = np.zeros((1, 1, 1), dtype=np.uint8)
_NO_ARRAY = {2: np.zeros((1, 1)), 4: np.zeros((1, 1, 1, 1))}

_compiled = None


def _kernels(numel: int):
    global _compiled
    if _compiled is None:
        from normkit.backends import cpu_act_kernels

        _compiled = cpu_act_kernels
    return _compiled.serial if numel < cpu.SERIAL_BELOW else _compiled.parallel


def plan_for(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
             running_mean: Tensor | None) -> Plan | None:
    """The BatchNorm plan of x when the fused kernels cover the call, else None."""
    dims = (0,) + tuple(range(2, x.dim()))
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    plan = cpu._plan(x, weight, bias, dims, running_mean, shape)
    if plan is None or plan.kind not in ("mid", "cols"):
        return None
    others = [t for t in (residual, running_mean) if t is not None]
    if any(t.device.type != "cpu" for t in others):
        return None
    return plan


def _bits_array(plan: Plan, code: int) -> np.ndarray:
    if code not in (1, 2):
        return _NO_BITS
    if plan.kind == "mid":
        return np.empty((plan.A, plan.M, (plan.S + 7) // 8), dtype=np.uint8)
    return np.empty((1, plan.A, (plan.M + 7) // 8), dtype=np.uint8)


def _view_or_placeholder(plan: Plan, t: Tensor | None) -> np.ndarray:
    if t is None:
        return _NO_ARRAY[len(plan.array_shape)]
    return plan.memory_view(t)


class CpuBatchNormAct(torch.autograd.Function):
    """Fused act(batch_norm(x) + residual) on the numba kernels (first-order autograd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, training, momentum,
                eps, act, slope, plan):
        k = _kernels(x.numel())
        code = ACT_CODES[act]
        out = cpu_buffers.empty_like(x)
        stats = np.empty((3, plan.M))
        bits = _bits_array(plan, code)
        has = (weight is not None, bias is not None)
        w, b = cpu._array(weight, (plan.M,)), cpu._array(bias, (plan.M,))
        given = not training
        m = cpu._array(running_mean, (plan.M,)) if given else _NO_ARRAY[2][0]
        v = cpu._array(running_var, (plan.M,)) if given else _NO_ARRAY[2][0]
        if residual is not None:
            residual = with_strides_of(residual, x)
        args = (plan.memory_view(x), _view_or_placeholder(plan, residual), residual is not None,
                w, b, *has, given, m, v, eps, code, slope, plan.memory_view(out), bits, stats)
        if plan.kind == "mid":
            k.mid_act_forward(*args)
        else:
            k.cols_act_forward(*args, cpu._blocks(plan.A))
        stats_t = torch.from_numpy(stats)
        if training and running_mean is not None:
            cpu.update_running_stats(running_mean, running_var, stats_t[0], stats_t[1],
                                     x.numel() // x.shape[1], momentum)
        keep_residual = residual if code in (3, 4) else None
        ctx.save_for_backward(x, weight, bias, keep_residual, stats_t,
                              torch.from_numpy(bits) if code in (1, 2) else None)
        ctx.plan, ctx.code, ctx.slope, ctx.training = plan, code, slope, training
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():
            raise RuntimeError("double backward is not supported by normkit's fused "
                               "BatchNormAct; use BatchNorm followed by the activation")
        x, weight, bias, residual, stats, bits = ctx.saved_tensors
        plan = ctx.plan
        k = _kernels(x.numel())
        dout = with_strides_of(dout, x)
        need_dx = ctx.needs_input_grad[0]
        need_dr = ctx.has_residual and ctx.needs_input_grad[3]
        dx = cpu_buffers.empty_like(x) if need_dx else None
        dr = cpu_buffers.empty_like(x) if need_dr else None
        dw, db = np.empty(plan.M), np.empty(plan.M)
        args = (plan.memory_view(x), _view_or_placeholder(plan, residual), residual is not None,
                plan.memory_view(dout), cpu._array(weight, (plan.M,)),
                cpu._array(bias, (plan.M,)), weight is not None, bias is not None,
                stats.numpy(), ctx.training, ctx.code, ctx.slope,
                _NO_BITS if bits is None else bits.numpy(), need_dx,
                _view_or_placeholder(plan, dx), need_dr, _view_or_placeholder(plan, dr), dw, db)
        if plan.kind == "mid":
            k.mid_act_backward(*args)
        else:
            k.cols_act_backward(*args, cpu._blocks(plan.A))
        dw_t = None if weight is None else torch.from_numpy(dw).to(weight.dtype)
        db_t = None if bias is None else torch.from_numpy(db).to(bias.dtype)
        return dx, dw_t, db_t, dr, None, None, None, None, None, None, None, None
