"""How a normalize call maps onto the CPU kernels' memory shapes (mid, rows, cols).

A plan says how to view the dense input's memory, which kernel family serves it, and how the
broadcast weight lines up with that view; `plan_for` returns None for calls no kernel covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Plan:
    """kind 'mid': memory (A, M, J, S), stats per m, weight (Wm, J) indexed [m % Wm, j].
    kind 'rows': memory (M, J), stats per row, weight (J,). kind 'cols': memory (A, M), stats per
    column, weight (M,)."""

    kind: str
    A: int
    M: int
    J: int
    S: int
    Wm: int

    def memory_view(self, t: Tensor) -> Tensor:
        """t (laid out like the planned input) as the kernel's array shape, without a copy."""
        if self.kind == "cols" and t.dim() > 2:
            t = t.movedim(1, -1)
        shape = {"mid": (self.A, self.M, self.J, self.S), "rows": (self.M, self.J),
                 "cols": (self.A, self.M)}[self.kind]
        return t.view(shape)


def _channels_last_like(x: Tensor) -> bool:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and x.is_contiguous(memory_format=fmt)


def _varying_only_at(param_shape: tuple[int, ...], x_shape: torch.Size, dims: set[int]) -> bool:
    return all((n == x_shape[i]) if i in dims else n == 1 for i, n in enumerate(param_shape))


def plan_for(x: Tensor, dims: tuple[int, ...], param_shape: tuple[int, ...] | None) -> Plan | None:
    """The kernel plan for normalizing dense `x` over `dims` with weights of `param_shape`."""
    d = x.dim()
    shape = x.shape
    if d < 2 or x.numel() == 0:
        return None
    batch_dims = (0,) + tuple(range(2, d))
    if dims == batch_dims and (param_shape is None or _varying_only_at(param_shape, shape, {1})):
        spatial = math.prod(shape[2:])
        if x.is_contiguous() and spatial > 1:
            return Plan("mid", shape[0], shape[1], 1, spatial, shape[1])
        if x.is_contiguous() or _channels_last_like(x):
            return Plan("cols", shape[0] * spatial, shape[1], 1, 1, shape[1])
        return None
    k = dims[0] if dims else d
    if not x.is_contiguous() or dims != tuple(range(k, d)):
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
