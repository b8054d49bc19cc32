"""Launchers of the GPU backend's Triton kernels: geometry, split counts, block sizes.

`forward` and `backward` take a `Plan` (normkit.backends.plan) and dense tensors laid out as the
plan says; they allocate outputs and launch `gpu_kernels`. Every size below is chosen from the
shape alone (never from the device), so results are bitwise identical run to run and machine to
machine. The tuning knobs are the module constants.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass

import numpy as np
import torch
import triton
from torch import Tensor

from normkit.backends import gpu_kernels
from normkit.backends.plan import Plan

SPLIT_ELEMENTS = 16384  # elements one program reduces before its partial is merged
MAX_SPLITS = 1024
REDUCE_BLOCK = 1024  # mid_partials block
APPLY_BLOCK = 2048  # elements per program of the elementwise pass
APPLY_WARPS = 8
COLS_TILE = 2048  # elements of one cols_partials tile
ROWS_PROGRAMS = 1024  # most programs sharing one LayerNorm backward's dweight / dbias
MAX_ROW = 16384  # longest LayerNorm row held in registers
ITEM_MAX_BYTES = 32 << 10  # largest 'mid' item normalized whole by one program (mid_item_*)
ITEM_L2_BYTES = 32 << 20  # bytes of items in flight at once in mid_item_*: they must stay in L2
ITEM_TILE = 4096  # elements of one mid_item_* block
ITEM_WARPS = 8
INT32_LIMIT = 2**31 - 1


_traced_launches = threading.local()


@contextlib.contextmanager
def traceable_launches():
    """Within this block kernels launch through torch.library.wrap_triton, so that a
    torch.library.triton_op launching them can be traced (normkit.backends.gpu_ops). Outside
    it they launch directly: some torch versions make a wrapper object per launch, costly."""
    _traced_launches.on = True
    try:
        yield
    finally:
        _traced_launches.on = False


def _kernel(fn):
    """A kernel of gpu_kernels, as `traceable_launches` says it is launched."""
    wrap = getattr(torch.library, "wrap_triton", None)  # torch >= 2.6
    if wrap is not None and getattr(_traced_launches, "on", False) and isinstance(
            fn, triton.runtime.jit.JITFunction):
        return wrap(fn)
    return fn


@dataclass(frozen=True)
class Geometry:
    """A plan as sub-items (see gpu_kernels): `nsub` subs, `J` per item, weight channel
    sub % C, `count` elements per item; 'mid' memory (A, nsub, S), 'cols' memory (P, Q, L);
    the elementwise pass finds element e's sub as (e // d1) % m1 + (e // d2) * k2; item i's
    first element is at (i // ipp) * pstride + (i % ipp) * istride."""

    family: str
    numel: int
    nsub: int
    J: int
    C: int
    items: int
    count: int
    span: int  # elements (mid) or rows (cols) one sub reduces over
    A: int = 1
    S: int = 1
    P: int = 1
    Q: int = 1
    L: int = 1
    d1: int = 1
    m1: int = 1
    d2: int = 1
    k2: int = 0
    ipp: int = 1
    pstride: int = 0
    istride: int = 0

    @property
    def int64(self) -> bool:
        return self.numel > INT32_LIMIT


@functools.lru_cache(maxsize=512)
def geometry(plan: Plan) -> Geometry:
    """The sub-item view of a plan."""
    if plan.kind == "mid":
        numel = plan.A * plan.M * plan.J * plan.S
        nsub = plan.M * plan.J
        return Geometry("mid", numel, nsub, plan.J, plan.Wm * plan.J, plan.M,
                        plan.A * plan.J * plan.S, plan.A * plan.S, A=plan.A, S=plan.S,
                        d1=plan.S, m1=nsub, d2=numel, ipp=plan.M, istride=plan.J * plan.S)
    if plan.kind == "rows":
        return Geometry("rows", plan.M * plan.J, plan.M, 1, plan.J, plan.M, plan.J, plan.J,
                        Q=plan.M, L=plan.J)
    if plan.kind == "cols":
        P, Q, L, J, items = 1, plan.A, plan.M, 1, plan.M
    else:  # nsc: (N, spatial, G, C/G)
        P, Q, L, J, items = plan.A, plan.S, plan.Wm * plan.J, plan.J, plan.A * plan.Wm
    return Geometry("cols", P * Q * L, P * L, J, L, items, Q * J, Q, P=P, Q=Q, L=L,
                    m1=L, d2=Q * L, k2=L, ipp=L // J, pstride=Q * L, istride=J)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, cap: int) -> int:
    """The smallest power of two >= n (and >= 1), at most cap. Plain Python: triton's own
    helpers are compile-time functions whose host-side call costs microseconds."""
    return min(1 << (max(n, 1) - 1).bit_length(), cap)


def _float_pair(value: float) -> tuple[float, float]:
    """value as float32 hi + lo (exact to ~48 bits once summed in float64)."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Splits:
    count: int
    chunk: int  # elements (mid) or rows (cols) per split
    block_q: int = 1
    block_l: int = 1


def _splits(geo: Geometry) -> _Splits:
    if geo.family == "mid":
        chunk = max(SPLIT_ELEMENTS, _cdiv(geo.span, MAX_SPLITS))
        chunk = _cdiv(chunk, REDUCE_BLOCK) * REDUCE_BLOCK
        return _Splits(_cdiv(geo.span, chunk), chunk)
    block_l = _pow2(geo.L, 64)
    block_q = max(1, COLS_TILE // block_l)
    chunk = max(_cdiv(SPLIT_ELEMENTS, block_l), _cdiv(geo.Q, MAX_SPLITS))
    chunk = _cdiv(chunk, block_q) * block_q
    return _Splits(_cdiv(geo.Q, chunk), chunk, block_q, block_l)


def _partials(geo: Geometry, splits: _Splits, x: Tensor, dy: Tensor | None,
              coef: Tensor | None, part: Tensor) -> None:
    """Welford partials of x - K (dy None) or the backward sums (dy and the forward
    coefficients given), per (sub, split)."""
    backward = dy is not None
    dy = x if dy is None else dy
    coef = part if coef is None else coef
    firsts = (geo.ipp, geo.pstride, geo.istride)
    if geo.family == "mid":
        _kernel(gpu_kernels.mid_partials)[(geo.nsub, splits.count)](
            x, dy, coef, part, geo.nsub, geo.J, geo.S, geo.span, splits.chunk, splits.count,
            *firsts, BACKWARD=backward, BLOCK=REDUCE_BLOCK, INT64=geo.int64, num_warps=4)
    else:
        grid = (geo.P, _cdiv(geo.L, splits.block_l), splits.count)
        _kernel(gpu_kernels.cols_partials)[grid](
            x, dy, coef, part, geo.Q, geo.L, geo.nsub, geo.J, splits.chunk, splits.count,
            *firsts, BACKWARD=backward, BLOCK_Q=splits.block_q, BLOCK_L=splits.block_l,
            INT64=geo.int64, num_warps=4)


def _apply(geo: Geometry, x: Tensor, dy: Tensor | None, coef: Tensor, out: Tensor) -> None:
    _kernel(gpu_kernels.apply_coefficients)[(_cdiv(geo.numel, APPLY_BLOCK),)](
        x, x if dy is None else dy, coef, out, geo.numel, geo.nsub, geo.d1, geo.m1, geo.d2,
        geo.k2, HAS_DY=dy is not None, BLOCK=APPLY_BLOCK, INT64=geo.int64,
        num_warps=APPLY_WARPS)


def _flat(t: Tensor | None, fallback: Tensor) -> Tensor:
    return fallback if t is None else t.reshape(-1).contiguous()


def _column_sums(parts: Tensor, rows: int, columns: int) -> Tensor:
    """(2, rows, columns) -> (2, columns), summed over rows in a fixed order."""
    sums = parts.new_empty(2, columns)
    block_c = _pow2(columns, 128)
    _kernel(gpu_kernels.column_sums)[(_cdiv(columns, block_c), 2)](
        parts, sums, rows, columns, BLOCK_R=_pow2(rows, 32), BLOCK_C=block_c)
    return sums


def _item_tile(geo: Geometry, itemsize: int) -> tuple[int, int, int] | None:
    """(BLOCK_A, BLOCK_J, BLOCK_S) when one program normalizes each whole 'mid' item."""
    if geo.family != "mid" or geo.count * itemsize > ITEM_MAX_BYTES:
        return None
    block_s = _pow2(geo.S, ITEM_TILE)
    block_j = _pow2(geo.J, ITEM_TILE // block_s)
    return _pow2(geo.A, ITEM_TILE // (block_s * block_j)), block_j, block_s


def _item_programs(geo: Geometry, itemsize: int) -> int:
    """Programs of mid_item_*: as many as keep ITEM_L2_BYTES of items in flight. Each item is
    computed the same way whichever program takes it, so results do not depend on this."""
    return max(1, min(geo.items, ITEM_L2_BYTES // max(1, geo.count * itemsize)))


def rows_supported(plan: Plan) -> bool:
    return plan.kind != "rows" or plan.J <= MAX_ROW


def _running_args(running: tuple[Tensor, Tensor, float] | None, count: int,
                  fallback: Tensor) -> tuple[list, list, bool]:
    """Kernel arguments of the fused running-statistics update: the buffers, then momentum and
    the unbiasing correction count / (count - 1) as float pairs; and whether to update."""
    if running is None:
        return [fallback, fallback], [0.0] * 4, False
    running_mean, running_var, momentum = running
    correction = count / (count - 1) if count > 1 else 1.0
    return ([running_mean, running_var], [*_float_pair(momentum), *_float_pair(correction)],
            True)


def forward(plan: Plan, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
            mean: Tensor | None, var: Tensor | None,
            running: tuple[Tensor, Tensor, float] | None = None,
            ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, stats, coef): stats (5, items) = batch mean, biased var, rstd, shift K,
    mean(x - K) (None when mean / var were given); coef (5, nsub) = per-sub K, mean(x - K),
    rstd, scale, bias (None when one program normalized each whole item: 'rows', and 'mid'
    items of at most ITEM_MAX_BYTES). `running` = (running_mean, running_var, momentum):
    buffers with one entry per item (BatchNorm), moved towards the batch statistics in the same
    kernels."""
    geo = geometry(plan)
    acc = accumulation_dtype(x.dtype)
    eps_pair = _float_pair(eps)
    y = torch.empty_like(x)
    w, b = _flat(weight, x), _flat(bias, x)
    flags = {"HAS_W": weight is not None, "HAS_B": bias is not None}
    if geo.family == "rows":
        stats = x.new_empty(5, geo.items, dtype=acc)
        block_l = _pow2(geo.L, MAX_ROW)
        _kernel(gpu_kernels.rows_forward)[(geo.items,)](
            x, w, b, y, stats, geo.items, geo.L, *eps_pair, **flags, BLOCK_L=block_l,
            INT64=geo.int64, num_warps=min(16, max(1, block_l // 256)))
        return y, stats, None
    buffers, scalars, update = _running_args(running, geo.count, x)
    tile = _item_tile(geo, x.element_size())
    if mean is None and tile is not None:
        stats = x.new_empty(5, geo.items, dtype=acc)
        _kernel(gpu_kernels.mid_item_forward)[(_item_programs(geo, x.element_size()),)](
            x, w, b, y, stats, *buffers, geo.items, geo.nsub, geo.J, geo.C, geo.S, geo.A,
            *eps_pair, *scalars, **flags, UPDATE=update, BLOCK_A=tile[0], BLOCK_J=tile[1],
            BLOCK_S=tile[2], INT64=geo.int64, num_warps=ITEM_WARPS)
        return y, stats, None
    coef = x.new_empty(5, geo.nsub, dtype=acc)
    stats = None
    if mean is None:
        splits = _splits(geo)
        part = x.new_empty(3, geo.nsub * splits.count, dtype=acc)
        _partials(geo, splits, x, None, None, part)
        stats = x.new_empty(5, geo.items, dtype=acc)
        entries = geo.J * splits.count
        _kernel(gpu_kernels.merge_stats)[(geo.items,)](
            part, x, w, b, stats, coef, *buffers, geo.items, entries, geo.nsub, geo.J, geo.C,
            geo.ipp, geo.pstride, geo.istride, *eps_pair, *scalars, **flags, UPDATE=update,
            BLOCK=_pow2(entries, 1024), BLOCK_J=_pow2(geo.J, 64))
    else:
        _kernel(gpu_kernels.given_coefficients)[(_cdiv(geo.nsub, 1024),)](
            mean.contiguous(), var.contiguous(), w, b, coef, geo.nsub, geo.J, geo.C,
            mean.numel(), *eps_pair, **flags, BLOCK=1024)
    _apply(geo, x, None, coef, y)
    return y, stats, coef


def backward(plan: Plan, x: Tensor, dy: Tensor, weight: Tensor | None, stats: Tensor | None,
             coef: Tensor | None, need_dx: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx, dweight, dbias) of `forward`'s call; dy has x's strides. dweight / dbias are
    flat, in the accumulation dtype, one per weight channel. Batch statistics were used
    exactly when `stats` is not None."""
    geo = geometry(plan)
    acc = accumulation_dtype(x.dtype)
    w = _flat(weight, x)
    dx = torch.empty_like(x) if need_dx else None
    if geo.family == "rows":
        per_program = _cdiv(geo.items, ROWS_PROGRAMS)
        programs = _cdiv(geo.items, per_program)
        part = x.new_empty(2, programs, geo.L, dtype=acc)
        block_l = _pow2(geo.L, MAX_ROW)
        _kernel(gpu_kernels.rows_backward)[(programs,)](
            x, dy, w, stats, x if dx is None else dx, part, geo.items, geo.L, per_program,
            HAS_W=weight is not None, NEED_DX=need_dx, BLOCK_L=block_l, INT64=geo.int64,
            num_warps=min(16, max(1, block_l // 256)))
        sums = _column_sums(part, programs, geo.L)
        return dx, sums[0], sums[1]
    if coef is None:  # mid_item_forward ran
        tile = _item_tile(geo, x.element_size())
        sub_sums = x.new_empty(2, geo.nsub, dtype=acc)
        _kernel(gpu_kernels.mid_item_backward)[(_item_programs(geo, x.element_size()),)](
            x, dy, w, stats, x if dx is None else dx, sub_sums, geo.items, geo.nsub, geo.J,
            geo.C, geo.S, geo.A, HAS_W=weight is not None, NEED_DX=need_dx, BLOCK_A=tile[0],
            BLOCK_J=tile[1], BLOCK_S=tile[2], INT64=geo.int64, num_warps=ITEM_WARPS)
        return (dx, *_channel_sums(geo, sub_sums))
    splits = _splits(geo)
    part = x.new_empty(2, geo.nsub * splits.count, dtype=acc)
    _partials(geo, splits, x, dy, coef, part)
    bcoef = x.new_empty(5, geo.nsub, dtype=acc)
    sub_sums = x.new_empty(2, geo.nsub, dtype=acc)
    _kernel(gpu_kernels.backward_coefficients)[(geo.items,)](
        part, coef, w, bcoef, sub_sums, geo.nsub, geo.J, geo.C, splits.count, geo.count,
        HAS_W=weight is not None, BATCH_STATS=stats is not None,
        BLOCK_J=_pow2(geo.J, 64), BLOCK_S=_pow2(splits.count, 64))
    if need_dx:
        _apply(geo, x, dy, bcoef, dx)
    return (dx, *_channel_sums(geo, sub_sums))


def _channel_sums(geo: Geometry, sub_sums: Tensor) -> tuple[Tensor, Tensor]:
    """dweight, dbias from each sub's (2, nsub) contributions (subs are (outer, C))."""
    outer = geo.nsub // geo.C
    sums = sub_sums if outer == 1 else _column_sums(sub_sums, outer, geo.C)
    return sums[0], sums[1]


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         correction: float, momentum: float) -> None:
    """In-place lerp of contiguous running buffers towards (mean, var * correction)."""
    channels = running_mean.numel()
    _kernel(gpu_kernels.running_stats_update)[(_cdiv(channels, 1024),)](
        running_mean, running_var, mean.contiguous(), var.contiguous(), channels,
        *_float_pair(momentum), *_float_pair(correction), BLOCK=1024)
