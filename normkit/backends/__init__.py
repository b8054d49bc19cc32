"""The single dispatch point between normkit.functional and the compute backends.

`normkit.functional` calls `backend_for(x).normalize(...)` (which also moves BatchNorm's
running statistics when asked, in the statistics kernels where a backend can),
`.update_running_stats(...)` and `.batch_norm_act(...)`; a backend is a module exposing `name`
and those three functions with the contracts of `normkit.backends.reference` (a backend hands
calls
it has no kernel for to the reference). Automatic choice: `cpu` (numba kernels; custom ops while
torch.compile / torch.export trace) for CPU tensors when numba imports, `triton` (Triton kernels)
for CUDA tensors when triton imports, else `reference`.
The choice can be forced with `set_backend(name)`, the `use_backend(name)` context manager,
or the environment variable ``NORMKIT_BACKEND`` (read at import).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

from torch import Tensor

from normkit.backends import cpu, gpu, reference

_BACKENDS: dict[str, ModuleType] = {reference.name: reference, cpu.name: cpu, gpu.name: gpu}
_forced: str | None = os.environ.get("NORMKIT_BACKEND") or None


def available_backends() -> list[str]:
    """Names accepted by `set_backend` / `use_backend`."""
    return list(_BACKENDS)


def _check_name(name: str | None) -> None:
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown normkit backend {name!r}; choose from {available_backends()}")


def set_backend(name: str | None) -> None:
    """Force every normkit op to use backend `name`; None restores automatic choice."""
    global _forced
    _check_name(name)
    _forced = name


_check_name(_forced)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of `set_backend`; restores the previous choice on exit."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backend_for(x: Tensor) -> ModuleType:
    """The backend that computes normalization of `x`."""
    if _forced is not None:
        return _BACKENDS[_forced]
    if x.is_cpu and cpu.is_available():
        return cpu
    if x.is_cuda and gpu.is_available():
        return gpu
    return reference
