"""Helpers that run torch and normkit side by side and compare everything a user can see."""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Callable

import torch
import torch.nn as tnn
import torch.nn.functional as tF

import normkit
import normkit.functional as nF

TORCH = types.SimpleNamespace(nn=tnn, F=tF, name="torch")
NORMKIT = types.SimpleNamespace(nn=normkit, F=nF, name="normkit")

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of t's dtype at each of t's values (as float64)."""
    info = torch.finfo(t.dtype)
    mag = t.double().abs().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def assert_matches(actual, expected, oracle=None, what: str = "tensor", rtol=None) -> None:
    """normkit's `actual` against torch's `expected`, at the tolerance of the dtype.

    fp64 ~1e-12 and fp32 ~1e-6 relative to the tensor's scale; fp16/bf16 within one ulp of
    torch's value, or, given `oracle` (the same computation in float64), within one ulp plus
    torch's own error of the oracle.
    """
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {actual} vs {expected}"
        return
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    if actual.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    same_nan = torch.isnan(a) == torch.isnan(e)
    assert bool(same_nan.all()), f"{what}: NaN pattern differs"
    finite = torch.isfinite(e) & torch.isfinite(a)
    assert bool((a[~finite] == e[~finite]).all() | torch.isnan(e[~finite]).all()), (
        f"{what}: non-finite values differ"
    )
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return
    err = (a - e).abs()
    o = None
    if expected.dtype in LOW_PRECISION:
        bound = _ulp(torch.maximum(a.abs(), e.abs()).to(expected.dtype)) * 1.01
        if oracle is not None:
            o = oracle.detach().double()[finite]
            err, bound = (a - o).abs(), bound + (e - o).abs()
    else:
        base = {torch.float64: 1e-12, torch.float32: 1e-6}.get(expected.dtype, 0.0)
        bound = (rtol or base) * 4 * max(1.0, float(e.abs().max()))
        if oracle is not None:
            bound = bound + (e - oracle.detach().double()[finite]).abs()
    bad = err > bound
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what} ({expected.dtype}): {int(bad.sum())} of {err.numel()} values off; first at "
            f"flat index {i}: normkit {float(a.flatten()[i])} vs torch {float(e.flatten()[i])} "
            + ("" if o is None else f"and float64 {float(o.flatten()[i])} ")
            + f"(bound {float(torch.as_tensor(bound).flatten()[i if torch.as_tensor(bound).numel() > 1 else 0])})"
        )


def outcome(fn: Callable[[], object]) -> tuple[str, object]:
    """('ok', value) or ('raise', (type, message)) for calling fn, warnings recorded too."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn()
        return "ok", (value, [str(w.message) for w in caught])
    except Exception as exc:  # noqa: BLE001 - we compare whatever torch raises
        return "raise", (type(exc), str(exc))


def assert_same_exception(torch_fn: Callable[[], object], nk_fn: Callable[[], object]) -> str:
    """Both raise the same exception type and message, or both succeed; returns which."""
    t_kind, t_val = outcome(torch_fn)
    n_kind, n_val = outcome(nk_fn)
    assert t_kind == n_kind, f"torch: {t_kind} {t_val if t_kind == 'raise' else ''}; normkit: {n_kind} {n_val if n_kind == 'raise' else ''}"
    if t_kind == "raise":
        assert n_val == t_val, f"torch raised {t_val}, normkit raised {n_val}"
    else:
        assert n_val[1] == t_val[1], f"warnings differ: torch {t_val[1]} normkit {n_val[1]}"
    return t_kind


def twin(torch_module: tnn.Module, nk_cls: type) -> tnn.Module:
    """A normkit module of class nk_cls holding a deep copy of torch_module's state."""
    nk_module = copy.deepcopy(torch_module)
    nk_module.__class__ = nk_cls
    return nk_module


def compare_modules(nk_module: tnn.Module, torch_module: tnn.Module, oracle: tnn.Module | None = None):
    """Every parameter, gradient and buffer of the two modules match."""
    t_state = dict(torch_module.named_parameters()) | dict(torch_module.named_buffers())
    n_state = dict(nk_module.named_parameters()) | dict(nk_module.named_buffers())
    o_state = dict(oracle.named_parameters()) | dict(oracle.named_buffers()) if oracle else {}
    assert list(n_state) == list(t_state)
    for name, t in t_state.items():
        n = n_state[name]
        if t.dtype == torch.int64:
            assert torch.equal(n, t), f"{name}: {n} vs {t}"
            continue
        o = o_state.get(name)
        assert_matches(n, t, None if o is None else o.double(), what=name)
        if isinstance(t, tnn.Parameter):
            og = None if o is None or o.grad is None else o.grad.double()
            assert_matches(n.grad, t.grad, og, what=f"{name}.grad")


def run_steps(
    torch_module: tnn.Module,
    nk_module: tnn.Module,
    inputs: list[tuple[str, torch.Tensor]],
    oracle: tnn.Module | None = None,
) -> None:
    """Feed (mode, input) steps to both modules: compare outputs, input grads, all state.

    mode is 'train' or 'eval'. The input grad of each step is a fixed random tensor. When an
    `oracle` (the torch module in float64) is given, low-precision results are judged against
    torch's own error relative to it.
    """
    for step, (mode, x) in enumerate(inputs):
        mods = [m for m in (torch_module, nk_module, oracle) if m is not None]
        for m in mods:
            m.train(mode == "train")
            m.zero_grad(set_to_none=False)
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for _ in mods]
        if oracle is not None:
            xs[-1] = x.detach().double().requires_grad_()
        outs = [m(xi) for m, xi in zip(mods, xs)]
        gen = torch.Generator().manual_seed(1000 + step)
        dy = torch.randn(outs[0].shape, generator=gen).to(outs[0].device, outs[0].dtype)
        for out, xi in zip(outs, xs):
            if out.requires_grad:
                out.backward(dy.to(out.dtype))
        o_out = outs[2].detach() if oracle is not None else None
        assert_matches(outs[1], outs[0], o_out, what=f"step {step} ({mode}) output")
        assert outs[1].is_contiguous(memory_format=_cpu_layout(torch_module, x)), (
            f"step {step}: layout")
        og = xs[2].grad if oracle is not None else None
        assert_matches(xs[1].grad, xs[0].grad, og, what=f"step {step} ({mode}) input grad")
        compare_modules(nk_module, torch_module, oracle)
        # Start the next step from identical state, so rounding differences cannot compound.
        nk_module.load_state_dict(torch_module.state_dict())
        if oracle is not None:
            oracle.load_state_dict(torch_module.state_dict())


def _cpu_layout(torch_module: tnn.Module, x: torch.Tensor) -> torch.memory_format:
    """The memory format of torch's output for x on the CPU: normkit keeps that rule on every
    device (torch's CUDA GroupNorm turns channels_last input into contiguous output)."""
    with torch.no_grad():  # on a copy: a training forward would move the running statistics
        return _format_of(copy.deepcopy(torch_module).cpu()(x.detach().cpu()))


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def make_pair(cls_name: str, *args, seed: int = 0, **kwargs) -> tuple[tnn.Module, tnn.Module]:
    """The same layer built from torch.nn and from normkit, with equal randomized state.

    Parameters and running statistics are randomized (weight around 1, positive variances) so
    that a wrong affine or a stale statistic cannot pass unnoticed.
    """
    torch_module = getattr(tnn, cls_name)(*args, **kwargs)
    nk_module = getattr(normkit, cls_name)(*args, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(torch_module.named_parameters()) + list(torch_module.named_buffers()):
            if t.dtype == torch.int64 or t.numel() == 0:
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            if name.endswith("running_var"):
                t.copy_(noise.abs() + 0.5)
            elif name.endswith("weight"):
                t.copy_(1 + 0.5 * noise)
            else:
                t.copy_(noise)
    nk_module.load_state_dict(torch_module.state_dict())
    return torch_module, nk_module


def float64_oracle(torch_module: tnn.Module) -> tnn.Module:
    """torch's own module in float64 with the same state: the yardstick for low precision."""
    return copy.deepcopy(torch_module).double()
