"""CPU backend: numba kernels for float32/float64 CPU tensors (float16/bfloat16 ones: the same
kernels reading and writing the 16 bits, see `_sixteen_bit_plan`; float32 copies while
torch.compile traces).

`normalize` has the contract of `normkit.backends.reference.normalize`. Calls the kernels do not
cover (other dtypes or devices, layouts without a plan, empty tensors) are handed to the
reference backend. When no gradient is needed the kernels are called directly; otherwise
through an autograd Function whose first-order backward runs in the kernels and whose
create_graph=True backward is the differentiable reference one, so double backward works.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from normkit._layout import with_strides_of
from normkit.backends import cpu_buffers, reference
from normkit.backends.direct_apply import direct_apply
from normkit.backends.plan import Plan, plan_for_layout

name = "cpu"

_DTYPES = (torch.float32, torch.float64)
_WIDENED = (torch.float16, torch.bfloat16)  # computed as the float32 kernels compute
# Row blocks of the kernels that sum over rows (cols, rows backward): each block keeps float64
# partial sums (two per column) that are merged in block order, so results depend on the shape
# only, never on the thread count. At most MAX_BLOCKS blocks, at least MIN_BLOCK_ROWS rows each,
# and at most PARTIAL_BYTES of partials: allocating, zeroing and merging (blocks, columns)
# partials cost more than the sums themselves when the rows are few and wide (measured at
# 49x2048: 51 us with 2 blocks, 140 us with 49; at 1568x2048 0.90 against 1.41 ms with 64).
# Elementwise passes over the same rows (channels_last y and dx) are split without the
# partials bound (`_tasks`).
MAX_BLOCKS = 64
MIN_BLOCK_ROWS = 16
PARTIAL_BYTES = 128 << 10
SERIAL_BELOW = 1 << 16  # elements; smaller calls skip the thread pool
SCRATCH_ITEMS = 4096  # statistics items of the per-thread scratch (96 KB), see _scratch_stats
SHORT_ROW_BYTES = 4096  # BatchNorm rows shorter than a page are walked in memory order
# Per tensor, of one channel block of the short-row kernels: between a block's two passes its x
# (and dy) stay in cache (measured at 7x7..28x28: best from 380 KB to 1 MB, 12-22 % faster than
# channel by channel; the L2 is 512 KB per core, the L3 8 MB).
ROW_GROUP_BYTES = 512 << 10
# The parallel short-row kernels split the channels into at least this many blocks: with fewer,
# the threads' shares differ by a block (32x256x7x7 in 4 blocks of 83, 83, 83, 7 channels:
# forward / backward 121 / 212 us; 8 blocks of 32: 94 / 158; 8x32x16x16, one block against 8:
# 22.5 / 30.9 against 17.9 / 23.7).
MIN_ROW_BLOCKS = 8
_LIKE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64),
         torch.float16: np.empty(0, np.uint16), torch.bfloat16: np.empty(0, np.uint16)}


def _stats_buffer(items: int) -> Tensor:
    """An internal float64 (3, items) buffer: numpy allocates it in a third of the time
    torch.empty takes (measured 1.2 against 3.5 us)."""
    return torch.from_numpy(np.empty((3, items)))


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


def _dense(t: Tensor | None) -> Tensor | None:
    """A parameter or statistic as the kernels read it: contiguous (None stays None)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _address(t: Tensor | None) -> int:
    """Where the kernels find a dense tensor (0 for an absent one, never read)."""
    return 0 if t is None else t.data_ptr()


def _short_rows(plan: Plan, x: Tensor) -> bool:
    """BatchNorm over several samples whose per-channel rows are shorter than a page."""
    return (plan.kind == "mid" and plan.A > 1 and plan.J == 1 and plan.Wm == plan.M
            and plan.S * x.element_size() < SHORT_ROW_BYTES)


def _short_items(plan: Plan) -> bool:
    """Statistics per contiguous run shorter than ITEM_QUADS_BELOW elements (InstanceNorm and
    one-channel GroupNorm at small spatial sizes, a batch of one)."""
    return (plan.kind == "mid" and plan.A == 1 and plan.J == 1
            and plan.S < _kernel_module().ITEM_QUADS_BELOW)


def _row_group(plan: Plan, x: Tensor) -> int:
    """Channels per block of the short-row kernels: ROW_GROUP_BYTES of each tensor, and for the
    parallel kernels at most a MIN_ROW_BLOCKS-th of the channels (rounded up)."""
    group = max(1, min(plan.M, ROW_GROUP_BYTES // (plan.A * plan.S * x.element_size())))
    if x.numel() >= SERIAL_BELOW:
        group = min(group, -(-plan.M // MIN_ROW_BLOCKS))
    return group


def _blocks(rows: int, columns: int) -> int:
    """Row blocks for partial sums over (rows, columns) (see MAX_BLOCKS)."""
    return max(1, min(_tasks(rows), PARTIAL_BYTES // (16 * max(1, columns))))


def _tasks(rows: int) -> int:
    """Row ranges of an elementwise pass over rows: no partials to bound, so as many as
    MAX_BLOCKS and MIN_BLOCK_ROWS allow (parallelism for machines with more cores)."""
    return max(1, min(MAX_BLOCKS, rows // MIN_BLOCK_ROWS))


def _calc_tail(x: Tensor) -> tuple:
    """The trailing (calc, half) arguments of the kernels that read 16-bit data: an empty
    array of the arithmetic's dtype and which 16-bit format x is stored in (see
    `cpu_kernels.rows_forward_train`)."""
    if x.dtype in _WIDENED:
        return _LIKE[torch.float32], x.dtype == torch.float16
    return _LIKE[x.dtype], None


def _forward_launch(plan: Plan, x: Tensor, given: bool) -> tuple:
    """(kernel, trailing arguments, whether it takes the given statistics' count) of the
    forward for this plan, x's dtype and statistics given or not; decided once per plan."""
    key = (x.dtype, given)
    launch = plan.launches.get(key)
    if launch is None:
        k = _kernels(x.numel())
        tail = (_LIKE[x.dtype], plan.array_shape)
        calc_tail = _calc_tail(x)
        if given and plan.kind == "cols":
            launch = (k.cols_forward_given, (*tail, _tasks(plan.A), *calc_tail), False)
        elif given:
            launch = (k.mid_forward_given, (*tail, plan.Wm, *calc_tail), True)
        elif plan.kind == "cols":
            launch = (k.cols_forward_train,
                      (*tail, _blocks(plan.A, plan.M), _tasks(plan.A), *calc_tail), False)
        elif _short_rows(plan, x):
            launch = (k.rowwise_forward_train, (*tail, _row_group(plan, x), *calc_tail),
                      False)
        elif _short_items(plan):
            launch = (k.items_forward_train, (*tail, plan.Wm, *calc_tail), False)
        elif plan.kind == "mid":
            launch = (k.mid_forward_train, (*tail, plan.Wm, *calc_tail), False)
        elif plan.kind == "rows":
            launch = (k.rows_forward_train, (*tail, *calc_tail), False)
        else:
            launch = (k.nsc_forward_train, (*tail, *calc_tail), False)
        plan.launches[key] = launch
    return launch


def _forward(plan: Plan, x: Tensor, weight, bias, eps, mean, var) -> tuple[Tensor, Tensor]:
    """(y, stats) where stats is float64 (3, items): mean, biased var, rstd per item."""
    stats = _stats_buffer(plan.items)
    return _forward_into(plan, x, weight, bias, eps, mean, var, stats.data_ptr()), stats


def _forward_into(plan: Plan, x: Tensor, weight, bias, eps, mean, var,
                  stats_address: int) -> Tensor:
    """y, the statistics written as float64 (3, items) at `stats_address`: mean, biased var,
    rstd per item."""
    kernel, tail, counts_given = _forward_launch(plan, x, mean is not None)
    y = cpu_buffers.empty_like(x)
    weight, bias = _dense(weight), _dense(bias)
    params = (x.data_ptr(), _address(weight), _address(bias), weight is not None,
              bias is not None)
    if mean is None:
        kernel(*params, eps, y.data_ptr(), stats_address, *tail)
    else:
        mean, var = _dense(mean), _dense(var)
        given = (mean.data_ptr(), var.data_ptr(), mean.numel()) if counts_given else \
            (mean.data_ptr(), var.data_ptr())
        kernel(*params, *given, eps, y.data_ptr(), stats_address, *tail)
    return y


_scratch = threading.local()


def _scratch_stats(items: int) -> int | None:
    """The address of this thread's float64 scratch for (3, items) statistics that nobody reads
    once the kernel returns (no-grad calls without running statistics: a fresh buffer costs
    microseconds there); None above SCRATCH_ITEMS items (a fresh buffer costs nothing
    noticeable beside such a call, and the scratch stays small)."""
    if items > SCRATCH_ITEMS:
        return None
    address = getattr(_scratch, "address", None)
    if address is None:
        _scratch.buffer = np.empty(3 * SCRATCH_ITEMS)
        address = _scratch.address = _scratch.buffer.ctypes.data
    return address


def _backward_launch(plan: Plan, x: Tensor) -> tuple:
    """(kernel, whether it takes batch_stats, trailing arguments) of the backward for this
    plan and x's dtype; decided once per plan."""
    key = (x.dtype, "backward")
    launch = plan.launches.get(key)
    if launch is None:
        k = _kernels(x.numel())
        tail = (_LIKE[x.dtype], plan.array_shape)
        if plan.kind == "cols":
            launch = (k.cols_backward, True,
                      (*tail, _blocks(plan.A, plan.M), _tasks(plan.A), *_calc_tail(x)))
        elif plan.kind == "rows":
            launch = (k.rows_backward, False, (*tail, _blocks(plan.M, plan.J), *_calc_tail(x)))
        elif plan.kind == "nsc":
            launch = (k.nsc_backward, False, (*tail, *_calc_tail(x)))
        elif _short_rows(plan, x):
            launch = (k.rowwise_backward, True, (*tail, _row_group(plan, x), *_calc_tail(x)))
        else:
            launch = (k.mid_backward, True, (*tail, plan.Wm, *_calc_tail(x)))
        plan.launches[key] = launch
    return launch


def _backward(plan: Plan, x: Tensor, dy: Tensor, weight: Tensor | None, stats: Tensor,
              batch_stats: bool, need_dx: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx, dw, db); dw / db have the arithmetic's dtype (x's; float32 for 16-bit x) and are
    flat: the plan's weight shape's values (summed over the dims the weight is broadcast along)
    in order. Flat because a tensor made or viewed with a shape tuple costs 2-4 us more than
    one of a single size (measured)."""
    kernel, takes_batch_stats, tail = _backward_launch(plan, x)
    dy = with_strides_of(dy, x)
    dx = cpu_buffers.empty_like(x) if need_dx else None
    dw = torch.empty(plan.weight_numel, dtype=torch.float32 if x.dtype in _WIDENED else x.dtype)
    db = torch.empty_like(dw)
    weight = _dense(weight)
    args = (x.data_ptr(), dy.data_ptr(), _address(weight), weight is not None, stats.data_ptr())
    out = (need_dx, _address(dx), dw.data_ptr(), db.data_ptr())
    if takes_batch_stats:
        kernel(*args, batch_stats, *out, *tail)
    else:
        kernel(*args, *out, *tail)
    return dx, dw, db


def _differentiable_backward(call, x, dy, weight, bias, need_dx):
    """The reference's create_graph=True backward from the saved statistics (x and dy in the
    grouped view when the call has groups; float16 / bfloat16 x and dy in float32, as the
    kernels compute, dx rounded back)."""
    _, dims, eps, mean, _, shape, stats, groups = call
    dtype = x.dtype
    if dtype in _WIDENED:
        x, dy = x.float(), dy.float()
    if groups is not None:
        x, dy = (t.unflatten(1, (groups, t.shape[1] // groups)) for t in (x, dy))
    stat_shape = [1 if i in dims else n for i, n in enumerate(x.shape)]
    w, b = (t if t is None or shape is None else t.view(shape) for t in (weight, bias))
    dx, dw, db = reference.differentiable_backward(
        dy, x, w, b, stats[0].view(stat_shape), stats[2].view(stat_shape), dims, eps,
        mean is None, need_dx,
    )
    if groups is not None and dx is not None:
        dx = dx.flatten(1, 2)
    if dx is not None and dx.dtype != dtype:
        dx = dx.to(dtype)
    return dx, dw, db


class _CpuNormalize(torch.autograd.Function):
    """y of `reference.normalize`, computed by the numba kernels; the statistics go into the
    call's float64 (3, items) buffer, which backward reads (it is no output: autograd keeps
    no record of it). float16 / bfloat16 weight and bias (of 16-bit x) are converted to
    float32 inside, and their grads back, so the graph holds no conversion nodes."""

    @staticmethod
    def forward(ctx, x, weight, bias, call):
        plan, _, eps, mean, var, _, stats, _ = call
        y = _forward_into(plan, x, _float32(weight), _float32(bias), eps, mean, var,
                          stats.data_ptr())
        ctx.save_for_backward(x, weight, bias)
        ctx.call = call
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        plan, dims, eps, mean, _, shape, stats, groups = ctx.call
        need_dx = ctx.needs_input_grad[0]
        w32 = _float32(weight)
        if torch.is_grad_enabled():
            dx, dw, db = _differentiable_backward(ctx.call, x, dy, w32, _float32(bias), need_dx)
        else:
            dx, dw, db = _backward(plan, x, dy, w32, stats, mean is None, need_dx)
        return dx, _grad_as(dw, weight), _grad_as(db, bias), None


def _grad_as(grad: Tensor, param: Tensor | None) -> Tensor | None:
    """A parameter's grad (flat, float32 for a 16-bit parameter) in its shape and dtype."""
    if param is None:
        return None
    if grad.dim() != param.dim():
        grad = grad.view_as(param)
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


_apply_cpu_normalize = direct_apply(_CpuNormalize)


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
    """`reference.normalize`, on the numba kernels when a plan covers the call (with `groups`
    the kernels read x's memory as the grouped view: autograd sees x itself, no views)."""
    given = mean, var  # returned as passed
    if x.dtype in _WIDENED and x.is_cpu:
        direct = _sixteen_bit_plan(x, weight, bias, dims, mean, var, shape, groups)
        if direct is None:
            return _widened(x, weight, bias, dims, eps, mean, var, shape, running, with_stats,
                            groups)
        plan, (mean, var) = direct
    else:
        plan = _plan(x, weight, bias, dims, mean, var, shape, groups)
        if plan is None:
            return reference.normalize(x, weight, bias, dims, eps, mean, var, shape, running,
                                       with_stats, groups)
    if torch.compiler.is_compiling():
        y, stats = _traced_normalize(plan, x, weight, bias, eps, mean, var)
    elif reference.needs_grad(x, weight, bias):
        stats = _stats_buffer(plan.items)
        y = _apply_cpu_normalize(x, weight, bias,
                                 (plan, dims, eps, mean, var, shape, stats, groups))
    else:
        weight, bias = _float32(weight), _float32(bias)
        read_later = with_stats or (running is not None and mean is None)
        scratch = None if read_later else _scratch_stats(plan.items)
        if scratch is not None:
            return _forward_into(plan, x, weight, bias, eps, mean, var, scratch), None, None
        y, stats = _forward(plan, x, weight, bias, eps, mean, var)
    if running is not None and mean is None:
        running_mean, running_var, momentum = running
        _update_from_stats(running_mean, running_var, stats, x.numel() // plan.items, momentum)
    if not with_stats:
        return y, None, None
    return (y, *given) if mean is not None else (y, stats[0], stats[1])


def _sixteen_bit_plan(x, weight, bias, dims, mean, var, shape, groups):
    """(plan, float32 (mean, var)) of a call whose kernels read and write float16 / bfloat16
    x's own 16 bits, computing as the float32 kernels would (every plan, forward and backward);
    None while torch.compile traces (the traced graph casts) and for calls no plan covers.
    16-bit weight and bias are converted where they are used (`_CpuNormalize` does it inside,
    so autograd records no conversion)."""
    if torch.compiler.is_compiling():
        return None
    m, v = _float32(mean), _float32(var)
    plan = _plan(x, weight, bias, dims, m, v, shape, groups, torch.float32)
    return None if plan is None else (plan, (m, v))


def _widened(x, weight, bias, dims, eps, mean, var, shape, running, with_stats, groups):
    """`normalize` of float16 / bfloat16 x: the float32 kernels on float32 copies of x and of
    the float16 / bfloat16 parameters and given statistics, y rounded back to x's dtype (torch's
    own low-precision norms compute in float32 as well). The casts are autograd ops: the
    output grad reaches the kernels in float32, dx returns in x's dtype and each parameter's
    grad in its own. x's and y's copies come from the buffer pool (a fresh 100 MB tensor costs
    tens of ms of page faults); the float32 copy of x is kept for the backward. Serves what
    `_sixteen_bit_plan` does not: traced calls (the graph's casts and float32 custom ops) and
    calls no plan covers (the reference then runs on the copies)."""
    y, batch_mean, batch_var = normalize(
        cpu_buffers.converted(x, torch.float32), *(_float32(t) for t in (weight, bias)), dims,
        eps, *(_float32(t) for t in (mean, var)), shape, running, with_stats, groups)
    y = cpu_buffers.converted(y, x.dtype)
    if not with_stats:
        return y, None, None
    return (y, mean, var) if mean is not None else (y, batch_mean, batch_var)


def _float32(t: Tensor | None) -> Tensor | None:
    """A float16 / bfloat16 parameter's or statistic's float32 copy; others as they are."""
    return t.float() if t is not None and t.dtype in _WIDENED else t


def _traced_normalize(plan: Plan, x, weight, bias, eps, mean, var):
    """The kernels as custom ops: what torch.compile / torch.export put in their graphs."""
    from normkit.backends import cpu_ops

    sizes = [plan.A, plan.M, plan.J, plan.S, plan.Wm]
    return cpu_ops.normalize_forward(x, weight, bias, mean, var, eps, plan.kind, sizes)


def _plan(x, weight, bias, dims, mean, var, shape, groups=None,
          dtype: torch.dtype | None = None) -> Plan | None:
    """The kernels' plan for the call: float32/float64 CPU data (or data computed in `dtype`),
    parameters and given statistics of that dtype (or x's) on the CPU; None otherwise."""
    dtype = x.dtype if dtype is None else dtype
    if not x.is_cpu or dtype not in _DTYPES:
        return None
    for t in (weight, bias, mean, var):
        if t is not None and (t.dtype not in (dtype, x.dtype) or not t.is_cpu):
            return None
    param = weight if weight is not None else bias
    layout = (x.shape, x.stride(), dims, None if param is None else param.shape, shape, groups,
              mean is not None)
    if torch.compiler.is_compiling():
        return _layout_plan.__wrapped__(*layout)
    return _layout_plan(*layout)


@functools.lru_cache(maxsize=1024)
def _layout_plan(sizes, strides, dims, param_sizes, shape, groups, given) -> Plan | None:
    """The plan of a call by its layout: x's sizes and strides, the normalized dims, the
    parameters' sizes (None without parameters) and `shape`, groups, statistics given or not.
    Memoized here as a whole (a lookup; the steps cost 1 µs a call)."""
    param_shape = None
    if param_sizes is not None:
        shape = param_sizes if shape is None else shape
        rank = len(sizes) + (groups is not None)
        param_shape = (1,) * (rank - len(shape)) + tuple(shape)
    plan = plan_for_layout(sizes, strides, dims, param_shape, groups)
    if plan is None or (given and plan.kind not in ("mid", "cols")):
        return None  # no op normalizes rows / grouped channels_last with given statistics
    return plan


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float) -> None:
    """`reference.update_running_stats`, in a kernel for contiguous CPU buffers."""
    stats = torch.stack((mean, var)).to(torch.float64)
    _update_from_stats(running_mean, running_var, stats, count, momentum)


def _update_from_stats(running_mean: Tensor, running_var: Tensor, stats: Tensor, count: int,
                       momentum: float) -> None:
    """Move the running buffers towards rows 0 (mean) and 1 (biased var) of the contiguous
    float64 `stats`."""
    if (running_mean.requires_grad or running_var.requires_grad
            or torch.compiler.is_compiling()
            or not _kernel_buffers(running_mean, running_var, stats.shape[1])):
        reference.update_running_stats(running_mean, running_var, stats[0], stats[1], count,
                                       momentum)
        return
    correction = count / (count - 1) if count > 1 else 1.0
    address = stats.data_ptr()
    dtype = running_mean.dtype
    _kernel_module().running_update(running_mean.data_ptr(), running_var.data_ptr(),
                                    _LIKE[dtype], address, address + 8 * stats.shape[1],
                                    running_mean.numel(), momentum, correction,
                                    None if dtype in _DTYPES else dtype == torch.float16)
    increment_version((running_mean, running_var))  # autograd must see the in-place update


def _kernel_buffers(running_mean: Tensor, running_var: Tensor, n: int) -> bool:
    """Contiguous floating CPU buffers (float16 to float64) of one dtype and n values, as the
    running-statistics kernel needs."""
    return (running_mean.is_cpu and running_mean.dtype in _LIKE
            and running_var.dtype == running_mean.dtype and running_var.is_cpu
            and running_mean.is_contiguous() and running_var.is_contiguous()
            and running_mean.numel() == n and running_var.numel() == n)


def batch_norm_act(x, weight, bias, residual, running_mean, running_var, training, momentum,
                   eps, act, negative_slope, memory_efficient) -> Tensor:
    """`reference.batch_norm_act`, on the fused kernels of `cpu_act` when they cover the call
    (float16 / bfloat16 x: on its 16 bits with float32 parameters, or float32 copies where
    the kernels cannot, as `normalize` does)."""
    from normkit.backends import cpu_act

    sixteen_bit = x.dtype in _WIDENED and x.is_cpu
    if sixteen_bit:
        if not training:  # the statistics are only read: float32 copies serve
            running_mean, running_var = _float32(running_mean), _float32(running_var)
        weight, bias = _float32(weight), _float32(bias)
    plan = None
    if not torch.compiler.is_compiling():  # the fused kernels have no custom op (yet)
        plan = cpu_act.plan_for(x, weight, bias, residual, None if training else running_mean,
                                None if training else running_var, act,
                                torch.float32 if sixteen_bit else None)
    if plan is None and sixteen_bit:
        return _widened_batch_norm_act(x, weight, bias, residual, running_mean, running_var,
                                       training, momentum, eps, act, negative_slope,
                                       memory_efficient)
    if plan is None:
        return reference.batch_norm_act(x, weight, bias, residual, running_mean, running_var,
                                        training, momentum, eps, act, negative_slope,
                                        memory_efficient)
    call = (running_mean, running_var, training, momentum, eps, act, negative_slope,
            memory_efficient, plan)
    if reference.needs_grad(x, weight, bias, residual):
        return cpu_act.apply_batch_norm_act(x, weight, bias, residual, call)
    return cpu_act.fused_forward(x, weight, bias, residual, call)[0]


def _widened_batch_norm_act(x, weight, bias, residual, running_mean, running_var, training,
                            momentum, eps, act, negative_slope, memory_efficient) -> Tensor:
    """`batch_norm_act` of float16 / bfloat16 x on float32 copies of x and the residual
    (weight, bias and read statistics already float32), the output rounded back; serves traced
    calls and those the 16-bit kernels do not cover."""
    if residual is not None:
        residual = (cpu_buffers.converted(residual, torch.float32)
                    if residual.stride() == x.stride() else residual.float())
    out = batch_norm_act(cpu_buffers.converted(x, torch.float32), weight, bias, residual,
                         running_mean, running_var, training, momentum, eps, act,
                         negative_slope, memory_efficient)
    return cpu_buffers.converted(out, x.dtype)
