"""CPU backend: numba kernels for float32/float64 CPU tensors.

`normalize` has the contract of `normkit.backends.reference.normalize`. Calls the kernels do not
cover (other dtypes or devices, layouts without a plan, empty tensors) are handed to the
reference backend. First-order backward runs in the kernels; under create_graph=True the
differentiable reference backward is used, so double backward still works.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normkit._layout import with_strides_of
from normkit.backends import cpu_buffers, reference
from normkit.backends.cpu_plan import Plan, plan_for

name = "cpu"

_DTYPES = (torch.float32, torch.float64)
_BLOCKS = 64  # fixed number of row blocks for partial sums: results never depend on threads


def is_available() -> bool:
    """True when numba imports."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    from normkit.backends import cpu_kernels

    return cpu_kernels


def _np(t: Tensor):
    return t.detach().numpy()


def _affine_arrays(plan: Plan, weight: Tensor | None, bias: Tensor | None):
    """weight / bias as float64 arrays of the plan's affine shape (ones / zeros when None)."""
    shape = {"mid": (plan.Wm, plan.J), "rows": (plan.J,), "cols": (plan.M,)}[plan.kind]
    w = torch.ones(shape, dtype=torch.float64) if weight is None else weight.detach().reshape(shape).double()
    b = torch.zeros(shape, dtype=torch.float64) if bias is None else bias.detach().reshape(shape).double()
    return w.contiguous(), b.contiguous()


def _blocks(rows: int) -> int:
    return max(1, min(rows, _BLOCKS))


def _forward(plan: Plan, x: Tensor, w: Tensor, b: Tensor, eps: float,
             mean: Tensor | None, rstd: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y and per-item (mean, biased var, rstd) float64 vectors of length plan.M."""
    k = _kernels()
    y = cpu_buffers.empty_like(x)
    xv, yv = _np(plan.memory_view(x)), _np(plan.memory_view(y))
    given = mean is not None
    if not given:
        mean = torch.empty(plan.M, dtype=torch.float64)
        rstd = torch.empty(plan.M, dtype=torch.float64)
    var = torch.empty(plan.M, dtype=torch.float64)
    if plan.kind == "cols":
        if not given:
            shift = xv[0].astype("float64")
            s1 = torch.empty(_blocks(plan.A), plan.M, dtype=torch.float64)
            s2 = torch.empty_like(s1)
            k.cols_sums(xv, shift, _np(s1), _np(s2))
            s1, s2 = s1.sum(0), s2.sum(0)
            mu = s1 / plan.A
            var = ((s2 - s1 * mu) / plan.A).clamp(min=0)
            mean = torch.from_numpy(shift) + mu
            rstd = (var + eps).rsqrt()
        alpha = rstd * w
        k.cols_affine(xv, _np(alpha), _np(b - mean * alpha), yv, _blocks(plan.A))
    elif plan.kind == "rows":
        k.rows_forward_train(xv, _np(w), _np(b), eps, yv, _np(mean), _np(var), _np(rstd))
    elif given:
        k.mid_forward_given(xv, _np(w), _np(b), _np(mean), _np(rstd), yv)
    else:
        k.mid_forward_train(xv, _np(w), _np(b), eps, yv, _np(mean), _np(var), _np(rstd))
    return y, mean, var, rstd


def _backward(plan: Plan, x: Tensor, dy: Tensor, w: Tensor, mean: Tensor, rstd: Tensor,
              batch_stats: bool, need_dx: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx, dw, db) with dw / db in the plan's affine shape (float64)."""
    k = _kernels()
    dy = with_strides_of(dy, x)
    xv, dyv = _np(plan.memory_view(x)), _np(plan.memory_view(dy))
    dx = cpu_buffers.empty_like(x) if need_dx else None
    if plan.kind == "cols":
        blocks = _blocks(plan.A)
        sdy = torch.empty(blocks, plan.M, dtype=torch.float64)
        sdyx = torch.empty_like(sdy)
        k.cols_grad_sums(xv, dyv, _np(mean), _np(sdy), _np(sdyx))
        sdy, sdyx = sdy.sum(0), sdyx.sum(0)
        if need_dx:
            p = rstd * w
            q = -p * rstd * rstd * sdyx / plan.A if batch_stats else torch.zeros_like(p)
            z = (-p * sdy / plan.A if batch_stats else torch.zeros_like(p)) - q * mean
            k.cols_affine2(xv, dyv, _np(p), _np(q), _np(z), _np(plan.memory_view(dx)), blocks)
        return dx, sdyx * rstd, sdy
    if plan.kind == "rows":
        blocks = _blocks(plan.M)
        dw = torch.zeros(blocks, plan.J, dtype=torch.float64)
        db = torch.zeros_like(dw)
        dxv = _np(plan.memory_view(dx)) if need_dx else xv[:0]
        k.rows_backward(xv, dyv, _np(w), _np(mean), _np(rstd), need_dx, dxv, _np(dw), _np(db))
        return dx, dw.sum(0), db.sum(0)
    dw = torch.empty(plan.M, plan.J, dtype=torch.float64)
    db = torch.empty_like(dw)
    dxv = _np(plan.memory_view(dx)) if need_dx else xv[:0]
    k.mid_backward(xv, dyv, _np(w), _np(mean), _np(rstd), batch_stats, need_dx, dxv,
                   _np(dw), _np(db))
    # Items sharing an affine row (m % Wm) are summed in a fixed order.
    return dx, dw.view(-1, plan.Wm, plan.J).sum(0), db.view(-1, plan.Wm, plan.J).sum(0)


class _CpuNormalize(torch.autograd.Function):
    """`reference._Normalize`'s contract, computed by the numba kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, dims, eps, plan):
        batch_stats = mean is None
        w, b = _affine_arrays(plan, weight, bias)
        stat_shape = [1 if i in dims else n for i, n in enumerate(x.shape)]
        given_mean = given_rstd = None
        if not batch_stats:  # broadcast statistics (e.g. per channel) expanded to one per item
            given_mean = mean.detach().double().expand(stat_shape).reshape(-1)
            given_rstd = (var.detach().double().expand(stat_shape).reshape(-1) + eps).rsqrt()
        y, mean_v, var_v, rstd_v = _forward(plan, x, w, b, eps, given_mean, given_rstd)
        ctx.save_for_backward(x, weight, bias, mean_v, rstd_v)
        ctx.dims, ctx.eps, ctx.plan, ctx.batch_stats, ctx.stat_shape = (
            dims, eps, plan, batch_stats, stat_shape)
        mean_out = mean_v.view(stat_shape) if batch_stats else mean
        var_out = var_v.view(stat_shape) if batch_stats else var
        ctx.mark_non_differentiable(mean_out, var_out)
        return y, mean_out, var_out

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, bias, mean_v, rstd_v = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        if torch.is_grad_enabled():
            shape = ctx.stat_shape
            dx, dw, db = reference.differentiable_backward(
                dy, x, weight, bias, mean_v.view(shape), rstd_v.view(shape), ctx.dims, ctx.eps,
                ctx.batch_stats, need_dx,
            )
            return dx, dw, db, None, None, None, None, None
        w, _ = _affine_arrays(ctx.plan, weight, None)
        dx, dw, db = _backward(ctx.plan, x, dy, w, mean_v, rstd_v, ctx.batch_stats, need_dx)
        dw = None if weight is None else dw.reshape(weight.shape).to(weight.dtype)
        db = None if bias is None else db.reshape(bias.shape).to(bias.dtype)
        return dx, dw, db, None, None, None, None, None


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: tuple[int, ...],
    eps: float,
    mean: Tensor | None = None,
    var: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`reference.normalize`, on the numba kernels when a plan covers the call."""
    plan = None
    if x.device.type == "cpu" and x.dtype in _DTYPES and not _other_device(weight, bias, mean):
        param = weight if weight is not None else bias
        param_shape = None
        if param is not None:  # right-aligned broadcast shape, as long as x's
            param_shape = (1,) * (x.dim() - param.dim()) + tuple(param.shape)
        plan = plan_for(x, dims, param_shape)
        if plan is not None and plan.kind == "rows" and mean is not None:
            plan = None  # no op normalizes rows with given statistics; the reference can
    if plan is None:
        return reference.normalize(x, weight, bias, dims, eps, mean, var)
    return _CpuNormalize.apply(x, weight, bias, mean, var, dims, eps, plan)


def _other_device(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.device.type != "cpu" for t in tensors)

