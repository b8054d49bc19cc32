"""GPU backend ("triton"): Triton kernels for CUDA tensors of float16/bfloat16/float32/float64.

`normalize` has the contract of `normkit.backends.reference.normalize`. Statistics accumulate in
float32 (float64 for float64 input). Calls no kernel covers (layouts without a plan, empty
tensors, LayerNorm rows longer than `gpu_launch.MAX_ROW`) are handed to the reference backend.
While torch.compile / torch.export trace CUDA tensors, the kernels are called as
torch.library.triton_op operators (`gpu_ops`); traced CPU tensors (interpreter) take the
reference path. First-order backward runs in the kernels; create_graph=True uses the
differentiable reference backward, so double backward works.

Triton is imported only when a kernel is first launched. With ``TRITON_INTERPRET=1`` the kernels
also run on CPU tensors (Triton's interpreter, slow): that is how the test suite checks them on
machines without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from normkit._layout import with_strides_of
from normkit.backends import reference
from normkit.backends.plan import Plan, plan_for

name = "triton"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache
def is_available() -> bool:
    """True when triton imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(t: Tensor) -> bool:
    """True when the kernels can run on t's device."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and interpreting())


def _launch():
    from normkit.backends import gpu_launch

    return gpu_launch


def _plan(x: Tensor, weight, bias, dims, mean, shape) -> Plan | None:
    if torch.compiler.is_compiling() and not (x.device.type == "cuda" and _ops_available()):
        return None
    if x.dtype not in _DTYPES or not runs_on(x) or not is_available():
        return None
    param = weight if weight is not None else bias
    param_shape = None
    if param is not None:
        if param.device != x.device:
            return None
        shape = param.shape if shape is None else shape
        param_shape = (1,) * (x.dim() - len(shape)) + tuple(shape)
    plan = plan_for(x, dims, param_shape)
    if plan is None or not _launch().rows_supported(plan):
        return None
    if mean is not None and (plan.kind not in ("mid", "cols") or plan.J != 1
                             or mean.device != x.device):
        return None
    return plan


def _stats_outputs(stats: Tensor | None, mean, var) -> tuple[Tensor, Tensor]:
    if stats is None:
        return mean, var
    return stats[0], stats[1]


class _TritonNormalize(torch.autograd.Function):
    """y of `reference.normalize`, computed by the Triton kernels; the statistics (or, for
    given statistics, the coefficients) stay in ctx for backward, and reach the caller through
    `call`'s last slot (they are no output: autograd keeps no record of them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, call):
        plan, _, eps, mean, var, _, running, out = call
        y, stats, coef = _launch().forward(plan, x, weight, bias, eps, mean, var, running)
        ctx.save_for_backward(x, weight, bias)
        ctx.call, ctx.stats, ctx.coef = call, stats, coef
        out.append(stats)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        stats, coef = ctx.stats, ctx.coef
        need_dx = ctx.needs_input_grad[0]
        if torch.is_grad_enabled():
            dx, dw, db = _reference_backward(ctx.call, dy, x, weight, bias, stats, coef, need_dx)
        else:
            dx, dw, db = _launch().backward(ctx.call[0], x, with_strides_of(dy, x), weight,
                                            stats, coef, need_dx)
        dw = None if weight is None else dw.reshape(weight.shape).to(weight.dtype)
        db = None if bias is None else db.reshape(bias.shape).to(bias.dtype)
        return dx, dw, db, None


def _reference_backward(call, dy, x, weight, bias, stats, coef, need_dx):
    """Differentiable backward (create_graph=True) from the saved statistics."""
    _, dims, eps, _, _, shape, _, _ = call
    stat_shape = [1 if i in dims else n for i, n in enumerate(x.shape)]
    # Given statistics have one sub per item (J == 1): the coefficients hold mean and rstd.
    mean, rstd = (coef[0], coef[2]) if stats is None else (stats[0], stats[2])
    w, b = (t if t is None or shape is None else t.view(shape) for t in (weight, bias))
    return reference.differentiable_backward(
        dy, x, w, b, mean.view(stat_shape), rstd.view(stat_shape), dims, eps,
        stats is not None, need_dx)


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: tuple[int, ...],
    eps: float,
    mean: Tensor | None = None,
    var: Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    running: tuple[Tensor, Tensor, float] | None = None,
    with_stats: bool = False,
    groups: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`reference.normalize`, on the Triton kernels when a plan covers the call; a BatchNorm
    running-statistics update rides in the statistics kernels."""
    if groups is not None:
        y, mean, var = normalize(x.unflatten(1, (groups, x.shape[1] // groups)), weight, bias,
                                 dims, eps, mean, var, shape, running, with_stats)
        return y.flatten(1, 2), mean, var
    plan = _plan(x, weight, bias, dims, mean, shape)
    if plan is None:
        return reference.normalize(x, weight, bias, dims, eps, mean, var, shape, running,
                                   with_stats)
    if torch.compiler.is_compiling():
        out = _traced_normalize(plan, x, weight, bias, eps, mean, var)
        reference.update_after(running, out[1], out[2], x.numel(), update_running_stats)
        return out if with_stats else (out[0], None, None)
    fused = running if _fusable(running, plan, x) else None
    if reference.needs_grad(x, weight, bias):
        out: list = []
        y = _TritonNormalize.apply(x, weight, bias,
                                   (plan, dims, eps, mean, var, shape, fused, out))
        stats = out[0]
    else:
        y, stats, _ = _launch().forward(plan, x, weight, bias, eps, mean, var, fused)
    if fused is not None:
        torch.autograd.graph.increment_version(fused[:2])
    elif running is not None:
        reference.update_after(running, *_stats_outputs(stats, mean, var), x.numel(),
                               update_running_stats)
    if not with_stats:
        return y, None, None
    return (y, *_stats_outputs(stats, mean, var))


def _ops_available() -> bool:
    """True when torch can trace Triton kernels (torch.library.triton_op, torch >= 2.6)."""
    return hasattr(torch.library, "triton_op") and is_available()


def _traced_normalize(plan: Plan, x, weight, bias, eps, mean, var):
    """The kernels as triton_op operators: what torch.compile / torch.export put in graphs."""
    from normkit.backends import gpu_ops

    sizes = [plan.A, plan.M, plan.J, plan.S, plan.Wm]
    y, stats, _ = gpu_ops.normalize_forward(x, weight, bias, mean, var, eps, plan.kind, sizes)
    return (y, *_stats_outputs(stats if mean is None else None, mean, var))


def _fusable(running, plan: Plan, x: Tensor) -> bool:
    """True when the statistics kernels can update these running buffers: one entry per item,
    dense, on x's device, outside autograd."""
    if running is None or plan.kind not in ("mid", "cols") or plan.J != 1:
        return False
    return all(t.device == x.device and t.dim() == 1 and t.numel() == plan.items
               and t.is_contiguous() and not t.requires_grad for t in running[:2])


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float) -> None:
    """`reference.update_running_stats`, in one kernel for contiguous buffers."""
    buffers = (running_mean, running_var, mean, var)
    if (torch.compiler.is_compiling() or not is_available()
            or any(not runs_on(t) or t.device != mean.device or t.requires_grad for t in buffers)
            or not (running_mean.is_contiguous() and running_var.is_contiguous())):
        reference.update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return
    correction = count / (count - 1) if count > 1 else 1.0
    with torch.no_grad():
        _launch().update_running_stats(running_mean, running_var, mean, var, correction, momentum)
    torch.autograd.graph.increment_version((running_mean, running_var))


def batch_norm_act(x, weight, bias, residual, running_mean, running_var, training, momentum,
                   eps, act, negative_slope, memory_efficient) -> Tensor:
    """`reference.batch_norm_act`: its composition calls this backend's `normalize`."""
    return reference.batch_norm_act(x, weight, bias, residual, running_mean, running_var,
                                    training, momentum, eps, act, negative_slope,
                                    memory_efficient)
