"""How a normalize call maps onto the kernels' memory shapes (mid, rows, cols, nsc); shared by
the CPU (numba) and GPU (Triton) backends.

A plan says which kernel family serves the call, the shape in which that family reads the
dense input's memory (in memory order), and how the broadcast weight lines up with it.
`plan_for` returns None for calls no kernel covers; plans are cached per (shape, strides, dims,
weight shape).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Plan:
    """kind 'mid': memory (A, M, J, S), stats per m, weight (Wm, J) indexed [m % Wm, j].
    kind 'rows': memory (M, J), stats per row, weight (J,).
    kind 'cols': memory (A, M), stats per column, weight (M,).
    kind 'nsc': memory (A, S, Wm, J) = (N, spatial, G, C/G), stats per (n, g), weight (G, C/G).
    """

    kind: str
    A: int
    M: int
    J: int
    S: int
    Wm: int
    array_shape: tuple[int, ...] = field(init=False)
    weight_shape: tuple[int, ...] = field(init=False)
    items: int = field(init=False)  # number of (mean, var) pairs produced
    weight_numel: int = field(init=False)
    # What a backend decided for this plan (kernel, launch sizes), keyed as it likes: plans are
    # cached per call shape, so the decision is made once per shape, not once per call.
    launches: dict = field(init=False, compare=False, repr=False, default_factory=dict)

    def __post_init__(self):
        shapes = {
            "mid": ((self.A, self.M, self.J, self.S), (self.Wm, self.J)),
            "rows": ((self.M, self.J), (self.J,)),
            "cols": ((self.A, self.M), (self.M,)),
            "nsc": ((self.A, self.S, self.Wm, self.J), (self.Wm, self.J)),
        }[self.kind]
        object.__setattr__(self, "array_shape", shapes[0])
        object.__setattr__(self, "weight_shape", shapes[1])
        object.__setattr__(self, "items", self.A * self.Wm if self.kind == "nsc" else self.M)
        object.__setattr__(self, "weight_numel", math.prod(shapes[1]))


def _varying_only_at(param_shape: tuple[int, ...], x_shape: tuple[int, ...], dims) -> bool:
    return all((n == x_shape[i]) if i in dims else n == 1 for i, n in enumerate(param_shape))


def _dense_strides(shape: tuple[int, ...], order: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a dense tensor of `shape` whose dims, slowest first, are `order`."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return tuple(strides)


def _same_strides(shape, strides, order) -> bool:
    """Dense in `order`, ignoring the strides of size-1 dims."""
    expected = _dense_strides(shape, order)
    return all(n == 1 or s == e for n, s, e in zip(shape, strides, expected))


@functools.lru_cache(maxsize=512)
def _plan(shape: tuple[int, ...], strides: tuple[int, ...], dims: tuple[int, ...],
          param_shape: tuple[int, ...] | None) -> Plan | None:
    d = len(shape)
    if d < 2 or math.prod(shape) == 0:
        return None
    contiguous = _same_strides(shape, strides, tuple(range(d)))
    batch_dims = (0,) + tuple(range(2, d))
    if dims == batch_dims and (param_shape is None or _varying_only_at(param_shape, shape, {1})):
        spatial = math.prod(shape[2:])
        if contiguous and spatial > 1:
            return Plan("mid", shape[0], shape[1], 1, spatial, shape[1])
        if contiguous or _same_strides(shape, strides, (0, *range(2, d), 1)):
            return Plan("cols", shape[0] * spatial, shape[1], 1, 1, shape[1])
        return None
    if (d >= 4 and dims == tuple(range(2, d)) and not contiguous
            and _same_strides(shape, strides, (0, *range(3, d), 1, 2))
            and (param_shape is None or _varying_only_at(param_shape, shape, {1, 2}))):
        return Plan("nsc", shape[0], shape[0] * shape[1], shape[2], math.prod(shape[3:]), shape[1])
    k = dims[0] if dims else d
    if not contiguous or dims != tuple(range(k, d)):
        return None
    lead, trail = shape[:k], shape[k:]
    rows = math.prod(lead)
    if param_shape is None:
        return Plan("mid", 1, rows, 1, math.prod(trail), 1)
    p = k
    while p > 0 and param_shape[p - 1] == lead[p - 1]:
        p -= 1
    t = 0
    while t < len(trail) and param_shape[k + t] == trail[t]:
        t += 1
    if any(n != 1 for n in param_shape[:p]) or any(n != 1 for n in param_shape[k + t :]):
        return None
    w_rows, inner, rest = math.prod(lead[p:]), math.prod(trail[:t]), math.prod(trail[t:])
    if w_rows == 1 and rest == 1:
        return Plan("rows", 1, rows, inner, 1, 1)
    return Plan("mid", 1, rows, inner, rest, w_rows)


def grouped(shape: tuple[int, ...], strides: tuple[int, ...],
            groups: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shape and strides of `x.unflatten(1, (groups, C // groups))` for x of these."""
    per_group = shape[1] // groups
    return ((shape[0], groups, per_group, *shape[2:]),
            (strides[0], strides[1] * per_group, strides[1], *strides[2:]))


def plan_for(x: Tensor, dims: tuple[int, ...], param_shape: tuple[int, ...] | None,
             groups: int | None = None) -> Plan | None:
    """The kernel plan for normalizing dense `x` over `dims` with weights of `param_shape`
    (right-aligned to x's rank), or None. With `groups`, x's dim 1 counts as the two dims
    (groups, C // groups), as `grouped` says, and dims / param_shape refer to that view."""
    return plan_for_layout(x.shape, x.stride(), dims, param_shape, groups)


def plan_for_layout(shape: tuple[int, ...], strides: tuple[int, ...], dims: tuple[int, ...],
                    param_shape: tuple[int, ...] | None,
                    groups: int | None = None) -> Plan | None:
    """`plan_for` of a dense tensor of these sizes and strides."""
    if groups is not None:
        shape, strides = grouped(shape, strides, groups)
    if torch.compiler.is_compiling():  # traced code calls the plain function
        return _plan.__wrapped__(tuple(shape), tuple(strides), dims, param_shape)
    return _plan(shape, strides, dims, param_shape)
