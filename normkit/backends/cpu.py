"""CPU backend: numba kernels for float32/float64 CPU tensors.

`normalize` has the contract of `normkit.backends.reference.normalize`. Calls the kernels do not
cover (other dtypes or devices, layouts without a plan, empty tensors) are handed to the
reference backend. When no gradient is needed the kernels are called directly; otherwise
through an autograd Function whose first-order backward runs in the kernels and whose
create_graph=True backward is the differentiable reference one, so double backward works.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from normkit._layout import with_strides_of
from normkit.backends import cpu_buffers, reference
from normkit.backends.plan import Plan, plan_for

name = "cpu"

_DTYPES = (torch.float32, torch.float64)
_BLOCKS = 64  # fixed number of row blocks for partial sums: results never depend on threads
SERIAL_BELOW = 1 << 16  # elements; smaller calls skip the thread pool
SHORT_ROW_BYTES = 4096  # BatchNorm rows shorter than a page are walked in memory order
# Per tensor, of one channel block of the short-row kernels: between a block's two passes its x
# (and dy) stay in cache (measured at 7x7..28x28: best from 380 KB to 1 MB, 12-22 % faster than
# channel by channel; the L2 is 512 KB per core, the L3 8 MB).
ROW_GROUP_BYTES = 512 << 10
_NO_PARAM = {1: np.ones(1), 2: np.ones((1, 1))}


@functools.cache
def is_available() -> bool:
    """True when numba imports."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


_compiled = None


def _kernel_module():
    """normkit.backends.cpu_kernels (numba is imported on first use)."""
    global _compiled
    if _compiled is None:
        from normkit.backends import cpu_kernels

        _compiled = cpu_kernels
    return _compiled


def _kernels(numel: int):
    """The serial or parallel kernel set."""
    k = _kernel_module()
    return k.serial if numel < SERIAL_BELOW else k.parallel


def _array(t: Tensor | None, shape: tuple[int, ...]) -> np.ndarray:
    """A parameter as a numpy array of the plan's shape (a placeholder when None)."""
    if t is None:
        return _NO_PARAM[len(shape)]
    if t.dtype not in _DTYPES:
        t = t.double()
    return t.detach().numpy().reshape(shape)


def _short_rows(plan: Plan, x: Tensor) -> bool:
    """BatchNorm over several samples whose per-channel rows are shorter than a page."""
    return (plan.kind == "mid" and plan.A > 1 and plan.J == 1 and plan.Wm == plan.M
            and plan.S * x.element_size() < SHORT_ROW_BYTES)


def _row_group(plan: Plan, x: Tensor) -> int:
    """Channels per block of the short-row kernels: ROW_GROUP_BYTES of each tensor."""
    return max(1, min(plan.M, ROW_GROUP_BYTES // (plan.A * plan.S * x.element_size())))


def _blocks(rows: int) -> int:
    return max(1, min(rows, _BLOCKS))


def _forward(plan: Plan, x: Tensor, weight, bias, eps, mean, var) -> tuple[Tensor, Tensor]:
    """(y, stats) where stats is float64 (3, items): mean, biased var, rstd per item."""
    k = _kernels(x.numel())
    y = cpu_buffers.empty_like(x)
    stats = np.empty((3, plan.items))
    xv, yv = plan.memory_view(x), plan.memory_view(y)
    w, b = _array(weight, plan.weight_shape), _array(bias, plan.weight_shape)
    flags = (weight is not None, bias is not None)
    if mean is not None:
        m, v = _array(mean, (mean.numel(),)), _array(var, (var.numel(),))
        if plan.kind == "cols":
            k.cols_forward_given(xv, w, b, *flags, m, v, eps, yv, stats, _blocks(plan.A))
        else:
            k.mid_forward_given(xv, w, b, *flags, m, v, eps, yv, stats)
    elif plan.kind == "cols":
        k.cols_forward_train(xv, w, b, *flags, eps, yv, stats, _blocks(plan.A))
    elif _short_rows(plan, x):
        k.rowwise_forward_train(xv, w, b, *flags, eps, yv, stats, _row_group(plan, x))
    else:
        kernel = {"mid": k.mid_forward_train, "rows": k.rows_forward_train,
                  "nsc": k.nsc_forward_train}[plan.kind]
        kernel(xv, w, b, *flags, eps, yv, stats)
    return y, torch.from_numpy(stats)


def _backward(plan: Plan, x: Tensor, dy: Tensor, weight: Tensor | None, stats: Tensor,
              batch_stats: bool, need_dx: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx, dw, db) with dw / db float64 in the plan's weight shape."""
    k = _kernels(x.numel())
    dy = with_strides_of(dy, x)
    xv, dyv = plan.memory_view(x), plan.memory_view(dy)
    dx = cpu_buffers.empty_like(x) if need_dx else None
    dxv = plan.memory_view(dx) if need_dx else xv[:0]
    w, has_w, st = _array(weight, plan.weight_shape), weight is not None, stats.numpy()
    if plan.kind == "cols":
        dw, db = np.empty(plan.M), np.empty(plan.M)
        k.cols_backward(xv, dyv, w, has_w, st, batch_stats, need_dx, dxv, dw, db, _blocks(plan.A))
    elif plan.kind == "rows":
        dw_part = np.empty((_blocks(plan.M), plan.J))
        db_part = np.empty_like(dw_part)
        k.rows_backward(xv, dyv, w, has_w, st, need_dx, dxv, dw_part, db_part)
        dw, db = dw_part.sum(0), db_part.sum(0)
    elif plan.kind == "nsc":
        dw_part = np.empty((plan.A, plan.Wm, plan.J))
        db_part = np.empty_like(dw_part)
        k.nsc_backward(xv, dyv, w, has_w, st, need_dx, dxv, dw_part, db_part)
        dw, db = dw_part.sum(0), db_part.sum(0)
    else:
        dw_part = np.empty((plan.M, plan.J))
        db_part = np.empty_like(dw_part)
        if _short_rows(plan, x):
            k.rowwise_backward(xv, dyv, w, has_w, st, batch_stats, need_dx, dxv, dw_part,
                               db_part, _row_group(plan, x))
        else:
            k.mid_backward(xv, dyv, w, has_w, st, batch_stats, need_dx, dxv, dw_part, db_part)
        # Items sharing an affine row (m % Wm) are summed in a fixed order.
        dw = dw_part.reshape(-1, plan.Wm, plan.J).sum(0)
        db = db_part.reshape(-1, plan.Wm, plan.J).sum(0)
    return dx, torch.from_numpy(dw), torch.from_numpy(db)


def _stat_shape(x: Tensor, dims: tuple[int, ...]) -> list[int]:
    return [1 if i in dims else n for i, n in enumerate(x.shape)]


class _CpuNormalize(torch.autograd.Function):
    """`reference._Normalize`'s contract, computed by the numba kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, dims, eps, plan, shape):
        y, stats = _forward(plan, x, weight, bias, eps, mean, var)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.dims, ctx.eps, ctx.plan, ctx.batch_stats = dims, eps, plan, mean is None
        ctx.shape = shape
        mean_out, var_out = _stats_outputs(stats, mean, var)
        ctx.mark_non_differentiable(mean_out, var_out)
        return y, mean_out, var_out

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, bias, stats = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        if torch.is_grad_enabled():
            stat_shape = _stat_shape(x, ctx.dims)
            w, b = (t if t is None or ctx.shape is None else t.view(ctx.shape)
                    for t in (weight, bias))
            dx, dw, db = reference.differentiable_backward(
                dy, x, w, b, stats[0].view(stat_shape), stats[2].view(stat_shape), ctx.dims,
                ctx.eps, ctx.batch_stats, need_dx,
            )
        else:
            dx, dw, db = _backward(ctx.plan, x, dy, weight, stats, ctx.batch_stats, need_dx)
        dw = None if weight is None else dw.reshape(weight.shape).to(weight.dtype)
        db = None if bias is None else db.reshape(bias.shape).to(bias.dtype)
        return dx, dw, db, None, None, None, None, None, None


def _stats_outputs(stats: Tensor, mean, var) -> tuple[Tensor, Tensor]:
    """Batch statistics, one per item (the given ones when statistics were given)."""
    if mean is not None:
        return mean, var
    batch_mean, batch_var, _ = stats.unbind(0)
    return batch_mean, batch_var


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
) -> tuple[Tensor, Tensor, Tensor]:
    """`reference.normalize`, on the numba kernels when a plan covers the call."""
    plan = _plan(x, weight, bias, dims, mean, shape)
    if plan is None:
        return reference.normalize(x, weight, bias, dims, eps, mean, var, shape, running)
    if torch.compiler.is_compiling():
        out = _traced_normalize(plan, x, weight, bias, eps, mean, var)
    elif reference.needs_grad(x, weight, bias):
        out = _CpuNormalize.apply(x, weight, bias, mean, var, dims, eps, plan, shape)
    else:
        y, stats = _forward(plan, x, weight, bias, eps, mean, var)
        out = (y, *_stats_outputs(stats, mean, var))
    reference.update_after(running, out[1], out[2], x.numel(), update_running_stats)
    return out


def _traced_normalize(plan: Plan, x, weight, bias, eps, mean, var):
    """The kernels as custom ops: what torch.compile / torch.export put in their graphs."""
    from normkit.backends import cpu_ops

    sizes = [plan.A, plan.M, plan.J, plan.S, plan.Wm]
    y, stats = cpu_ops.normalize_forward(x, weight, bias, mean, var, eps, plan.kind, sizes)
    return (y, *_stats_outputs(stats, mean, var))


def _plan(x, weight, bias, dims, mean, shape) -> Plan | None:
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        return None
    param = weight if weight is not None else bias
    param_shape = None
    if param is not None:
        if param.device.type != "cpu":
            return None
        shape = param.shape if shape is None else shape
        param_shape = (1,) * (x.dim() - len(shape)) + tuple(shape)
    plan = plan_for(x, dims, param_shape)
    if plan is None or (mean is not None and (
            plan.kind not in ("mid", "cols") or mean.device.type != "cpu")):
        return None  # no op normalizes rows / grouped channels_last with given statistics
    return plan


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float) -> None:
    """`reference.update_running_stats`, in numpy for float32/float64 CPU buffers."""
    buffers = (running_mean, running_var, mean, var)
    if (torch.compiler.is_compiling() or not _kernel_buffers(buffers)
            or running_mean.requires_grad or running_var.requires_grad):
        reference.update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return
    correction = count / (count - 1) if count > 1 else 1.0
    _kernel_module().running_update(*(t.numpy() for t in buffers), momentum, correction)
    increment_version((running_mean, running_var))  # autograd must see the in-place update


def _kernel_buffers(buffers: tuple[Tensor, ...]) -> bool:
    """Contiguous 1-D float32/float64 CPU tensors, as the running-statistics kernel needs."""
    return all(t.device.type == "cpu" and t.dtype in _DTYPES and t.dim() == 1
               and t.is_contiguous() for t in buffers)


def batch_norm_act(x, weight, bias, residual, running_mean, running_var, training, momentum,
                   eps, act, negative_slope, memory_efficient) -> Tensor:
    """`reference.batch_norm_act`, on the fused kernels of `cpu_act` when they cover the call."""
    from normkit.backends import cpu_act

    plan = None
    if not torch.compiler.is_compiling():  # the fused kernels have no custom op (yet)
        plan = cpu_act.plan_for(x, weight, bias, residual, None if training else running_mean)
    if plan is None:
        return reference.batch_norm_act(x, weight, bias, residual, running_mean, running_var,
                                        training, momentum, eps, act, negative_slope,
                                        memory_efficient)
    return cpu_act.CpuBatchNormAct.apply(x, weight, bias, residual, running_mean, running_var,
                                         training, momentum, eps, act, negative_slope, plan)
