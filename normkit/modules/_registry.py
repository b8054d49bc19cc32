"""A normalization module's own tensors, read straight from its parameter / buffer registries.

`nn.Module.__getattr__` (the path `self.weight` takes for a registered parameter) costs about a
microsecond per name, which small inputs notice. A name missing from its registry (deleted by
the user) falls back to the attribute, so the error is torch's.
"""

from __future__ import annotations

from torch import Tensor, nn


def affine(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """(weight, bias)."""
    try:
        parameters = module._parameters
        return parameters["weight"], parameters["bias"]
    except KeyError:
        return module.weight, module.bias


def running_stats(module: nn.Module) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(running_mean, running_var, num_batches_tracked)."""
    try:
        buffers = module._buffers
        return (buffers["running_mean"], buffers["running_var"],
                buffers["num_batches_tracked"])
    except KeyError:
        return module.running_mean, module.running_var, module.num_batches_tracked
