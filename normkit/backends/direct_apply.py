"""Applying an autograd Function without the Python layer of `torch.autograd.Function.apply`.

`Function.apply` is a Python classmethod: it binds default arguments for Functions that define
`setup_context`, unwraps functorch tensors whose transform has ended ("dead wrappers"), and
routes calls made inside functorch transforms (vmap, grad, ...) elsewhere, before it reaches
`torch._C._FunctionBase.apply`, which runs `forward` and builds the graph node. For normkit's
Functions (no `setup_context`) called on plain tensors outside any transform only that last step
does anything, and the layer costs microseconds that small inputs notice (an 8x32x8x8 BatchNorm
forward takes ~50 us in all). Every other call still goes through `Function.apply`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor


def direct_apply(function: type[torch.autograd.Function]) -> Callable[..., Tensor]:
    """A callable equal to `function.apply` for a Function without `setup_context`."""
    node_apply = super(torch.autograd.Function, function).apply  # torch._C._FunctionBase.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args):
        if transforms_active():
            return function.apply(*args)
        for arg in args:
            if isinstance(arg, Tensor) and is_functorch_wrapped_tensor(arg):
                return function.apply(*args)
        return node_apply(*args)

    return apply
