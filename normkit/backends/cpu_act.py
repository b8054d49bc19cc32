"""CPU backend for act(batch_norm(x) + residual): the fused numba kernels and their autograd.

Covers float32/float64 CPU input (and float16 / bfloat16 input, read and written as its 16 bits
with float32 parameters) laid out for the 'mid' (NCHW-like) or 'cols' (channels_last, 2D)
BatchNorm plans, with identity, relu, leaky_relu or silu; anything else runs the
composition in `normkit._batch_norm_act`. GELU too: numba only has libm's scalar erf, and the
fused kernel was 1.9-2.7x slower than the composition (whose GELU is torch's vectorized op),
measured at 32x1024x14x14 and 8x256x28x28. Kept for backward: x, the statistics, and a 1-bit
mask (relu / leaky_relu); for silu act'(z) in x's dtype (one tensor of x's size, as the default
mode of the composition keeps its output), or with memory_efficient only the residual, z and
act'(z) being recomputed (two more exponentials per element).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit._layout import batch_layout, with_strides_of
from normkit.backends import cpu, cpu_buffers
from normkit.backends.direct_apply import direct_apply
from normkit.backends.plan import Plan

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3}

_compiled = None


def _kernels(numel: int):
    global _compiled
    if _compiled is None:
        from normkit.backends import cpu_act_kernels

        _compiled = cpu_act_kernels
    return _compiled.serial if numel < cpu.SERIAL_BELOW else _compiled.parallel


def plan_for(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
             running_mean: Tensor | None, running_var: Tensor | None, act: str,
             dtype: torch.dtype | None = None) -> Plan | None:
    """The BatchNorm plan of x when the fused kernels cover the call, else None; `dtype` as in
    `cpu._plan` (float32 for float16 / bfloat16 x, whose parameters and statistics then are
    float32)."""
    if act not in ACT_CODES:
        return None
    dims, shape = batch_layout(x.dim(), x.shape[1])
    plan = cpu._plan(x, weight, bias, dims, running_mean, running_var, shape, dtype=dtype)
    if plan is None or plan.kind not in ("mid", "cols"):
        return None
    others = [t for t in (residual, running_mean, running_var) if t is not None]
    if any(t.device.type != "cpu" for t in others):
        return None
    return plan


_NO_BITS = torch.zeros((1, 1, 1), dtype=torch.uint8)  # the mask of acts that keep none (read-only)


def _bits_shape(plan: Plan, code: int, group: int) -> tuple[int, int, int]:
    """The 1-bit mask of z > 0 (relu / leaky_relu), else one byte: packed per sample and
    block of `group` channels for 'mid' (a block's rows of a sample are contiguous), per row
    for 'cols'."""
    if code not in (1, 2):
        return (1, 1, 1)
    if plan.kind == "mid":
        return (plan.A, (plan.M + group - 1) // group, (group * plan.S + 7) // 8)
    return (1, plan.A, (plan.M + 7) // 8)


def fused_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  residual: Tensor | None, call: tuple) -> tuple[Tensor, tuple]:
    """(out, saved) of act(batch_norm(x) + residual) on the kernels, with `call` =
    (running_mean, running_var, training, momentum, eps, act, slope, memory_efficient, plan);
    `saved` is what the backward reads: (x, weight, bias, kept residual, stats, mask, deriv,
    channel block)."""
    running_mean, running_var, training, momentum, eps, act, slope, memory_efficient, plan = call
    k = _kernels(x.numel())
    code = ACT_CODES[act]
    out = cpu_buffers.empty_like(x)
    stats = cpu._stats_buffer(plan.M)
    group = cpu._row_group(plan, x) if plan.kind == "mid" else 1
    bits_shape = _bits_shape(plan, code, group)
    bits = torch.empty(bits_shape, dtype=torch.uint8) if code in (1, 2) else _NO_BITS
    keep = code == 3 and not memory_efficient
    deriv = cpu_buffers.empty_like(x) if keep else None
    weight, bias = cpu._dense(weight), cpu._dense(bias)
    given = not training
    mean, var = (cpu._dense(running_mean), cpu._dense(running_var)) if given else (None, None)
    if residual is not None:
        residual = with_strides_of(residual, x)
    args = (x.data_ptr(), cpu._address(residual), residual is not None,
            cpu._address(weight), cpu._address(bias), weight is not None, bias is not None,
            given, cpu._address(mean), cpu._address(var), eps, code, slope, out.data_ptr(),
            bits.data_ptr(), keep, cpu._address(deriv), stats.data_ptr(), cpu._LIKE[x.dtype],
            plan.array_shape, bits_shape)
    if plan.kind == "mid":
        k.mid_act_forward(*args, group, *cpu._calc_tail(x))
    else:
        k.cols_act_forward(*args, cpu._blocks(plan.A, plan.M), *cpu._calc_tail(x))
    if training and running_mean is not None:
        cpu._update_from_stats(running_mean, running_var, stats, x.numel() // x.shape[1],
                               momentum)
    keep_residual = residual if code == 3 and not keep else None
    return out, (x, weight, bias, keep_residual, stats, bits, deriv, group)


class CpuBatchNormAct(torch.autograd.Function):
    """Fused act(batch_norm(x) + residual) on the numba kernels (first-order autograd);
    `call` as in `fused_forward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, call):
        out, (*saved, group) = fused_forward(x, weight, bias, residual, call)
        ctx.save_for_backward(*saved)
        _, _, training, _, _, act, slope, _, plan = call
        ctx.plan, ctx.code, ctx.slope, ctx.training = plan, ACT_CODES[act], slope, training
        ctx.group = group
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():
            raise RuntimeError("double backward is not supported by normkit's fused "
                               "BatchNormAct; use BatchNorm followed by the activation")
        x, weight, bias, residual, stats, bits, deriv = ctx.saved_tensors
        plan = ctx.plan
        k = _kernels(x.numel())
        dout = with_strides_of(dout, x)
        need_dx = ctx.needs_input_grad[0]
        need_dr = ctx.has_residual and ctx.needs_input_grad[3]
        dx = cpu_buffers.empty_like(x) if need_dx else None
        dr = cpu_buffers.empty_like(x) if need_dr else None
        # dL/dz goes to the residual's grad, or else to dx's memory (overwritten in place)
        dz = dr if need_dr else dx if need_dx else cpu_buffers.empty_like(x)
        dw = torch.empty(plan.M, dtype=torch.float32 if x.dtype in cpu._WIDENED else x.dtype)
        db = torch.empty_like(dw)
        args = (x.data_ptr(), cpu._address(residual), residual is not None, dout.data_ptr(),
                cpu._address(weight), cpu._address(bias), weight is not None, bias is not None,
                stats.data_ptr(), ctx.training, ctx.code, ctx.slope, bits.data_ptr(),
                deriv is not None, cpu._address(deriv), dz.data_ptr(), need_dx,
                cpu._address(dx), dw.data_ptr(), db.data_ptr(), cpu._LIKE[x.dtype],
                plan.array_shape, tuple(bits.shape))
        if plan.kind == "mid":
            k.mid_act_backward(*args, ctx.group, *cpu._calc_tail(x))
        else:
            k.cols_act_backward(*args, cpu._blocks(plan.A, plan.M), cpu._tasks(plan.A),
                                *cpu._calc_tail(x))
        dw = None if weight is None else dw  # (C,): the weight's own shape
        db = None if bias is None else db
        return dx, dw, db, dr, None


apply_batch_norm_act = direct_apply(CpuBatchNormAct)
