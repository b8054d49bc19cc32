"""Input validation that raises exactly what torch raises, with torch's messages.

Each function checks one rule; `normkit.functional` calls them in torch's order, before any
statistic is computed or buffer touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_C10_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}
_REDUCED_FLOATS = (torch.float16, torch.bfloat16)


def c10_name(dtype: torch.dtype) -> str:
    """The scalar-type name torch prints in its error messages ('Float', 'Half', ...)."""
    return _C10_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def plain_batch_norm_call(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                          weight: Tensor | None, bias: Tensor | None, training: bool,
                          eps: float) -> bool:
    """True for a batch-norm call that passes every check below, found with a few cheap tests:
    floating non-empty input of at least 2 dims (and more than one value per channel in
    training), eps > 0, running statistics both given (or both absent in training), per-channel
    tensors with one value per channel, all of x's dtype (or all float32 for float16 / bfloat16
    x: torch's mixed mode), running statistics not requiring grad. False says nothing: the full
    checks then run and raise torch's error."""
    if eps <= 0.0 or x.dim() < 2 or not x.dtype.is_floating_point:
        return False
    channels, numel = x.shape[1], x.numel()
    if numel == 0 or (training and numel == channels):
        return False
    if running_mean is None or running_var is None:
        if not (training and running_mean is None and running_var is None):
            return False
    elif (running_mean.requires_grad or running_var.requires_grad) and torch.is_grad_enabled():
        return False
    dtype = x.dtype
    param_dtype = None
    for t in (running_mean, running_var, weight, bias):
        if t is not None:
            if t.numel() != channels or (param_dtype is not None and t.dtype != param_dtype):
                return False
            param_dtype = t.dtype
    return param_dtype in (None, dtype) or (param_dtype == torch.float32
                                            and dtype in _REDUCED_FLOATS)


def plain_group_norm_call(x: Tensor, num_groups, weight: Tensor | None,
                          bias: Tensor | None) -> bool:
    """True for a group-norm call that passes every GroupNorm check, found with a few cheap
    tests (non-empty floating input of at least 2 dims, an int number of groups dividing the
    channels, more than one value per group, weight / bias vectors of x's dtype with one value
    per channel). False says nothing: the full checks then run and raise torch's error."""
    if type(num_groups) is not int or num_groups <= 0 or x.dim() < 2:
        return False
    channels, numel, dtype = x.shape[1], x.numel(), x.dtype
    if not dtype.is_floating_point or channels % num_groups or numel in (0, num_groups):
        return False
    for t in (weight, bias):
        if t is not None and (t.dtype != dtype or t.dim() != 1 or t.numel() != channels):
            return False
    return True


def verify_batch_size(size: Sequence[int]) -> None:
    """ValueError when a channel would be normalized over a single value (size[0]*size[2:])."""
    count = size[0]
    for extent in size[2:]:
        count *= extent
    if count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def verify_spatial_size(size: Sequence[int]) -> None:
    """ValueError when an instance would be normalized over a single spatial element."""
    count = 1
    for extent in size[2:]:
        count *= extent
    if count == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {size}"
        )


def check_eps(eps: float, training: bool) -> None:
    """BatchNorm's eps rule: positive in training, non-negative in eval."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_running_pair(running_mean: Tensor | None, running_var: Tensor | None) -> None:
    """Both running statistics or neither."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")


def check_running_stats_not_differentiable(*running: Tensor | None) -> None:
    """Running statistics are buffers: autograd refuses them when they require grad."""
    if not torch.is_grad_enabled():
        return
    for name, t in zip(("running_mean", "running_var"), running):
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"The function 'native_batch_norm' is not differentiable with respect to "
                f"argument '{name}'. This input cannot have requires_grad True."
            )


def check_per_channel_sizes(num_features: int, scale: int = 1, **tensors: Tensor | None) -> None:
    """Each given per-channel tensor must hold num_features elements (InstanceNorm: scale=N)."""
    for name, t in tensors.items():
        if t is not None and t.numel() * scale != num_features:
            raise RuntimeError(
                f"{name} should contain {num_features} elements not {t.numel() * scale}"
            )


def check_dtypes(kernel: str, x: Tensor, *params: Tensor | None, dispatch_first: bool) -> None:
    """torch's CPU dtype rules for (input, params...).

    Integer input is not implemented. Parameters either share the input's dtype, or (mixed mode)
    are all float32 while the input is float16/bfloat16. Whether the call is mixed is decided by
    the first defined parameter, as torch does. BatchNorm rejects a non-float input before it
    looks at parameters (`dispatch_first`); GroupNorm and LayerNorm check mixing first.
    """
    if dispatch_first:
        _check_floating(kernel, x)
    defined = [p for p in params if p is not None]
    if defined and defined[0].dtype != x.dtype:
        if any(p.dtype != torch.float32 for p in defined):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if x.dtype not in _REDUCED_FLOATS:
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        return
    _check_floating(kernel, x)
    for p in defined:
        if p.dtype != x.dtype:
            raise RuntimeError(
                f"expected scalar type {c10_name(x.dtype)} but found {c10_name(p.dtype)}"
            )


def _check_floating(kernel: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise NotImplementedError(f'"{kernel}" not implemented for \'{c10_name(x.dtype)}\'')


def check_group_norm_args(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None):
    """GroupNorm's shape rules: positive groups, divisible channels, per-channel vectors."""
    if num_groups <= 0:
        raise RuntimeError(f"Expected num groups to be greater than 0, got {num_groups}")
    channels = x.shape[1]
    if channels % num_groups != 0:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got input "
            f"of shape {list(x.shape)} and num_groups={num_groups}"
        )
    # NOTE: torch's bias message shows the *weight's* shape ([0] without weight); so do we.
    weight_shape = list(weight.shape) if weight is not None else [0]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.numel() != channels):
            raise RuntimeError(
                f"Expected {name} to be a vector of size equal to the number of channels in "
                f"input, but got {name} of shape {weight_shape} and input of shape "
                f"{list(x.shape)}"
            )


def normalized_shape_tuple(normalized_shape) -> tuple[int, ...]:
    """F.layer_norm's argument parsing: a sequence of ints (a torch.Size counts), else TypeError."""
    if isinstance(normalized_shape, (int, torch.SymInt)) or not isinstance(
        normalized_shape, (Sequence, torch.Size)
    ):
        raise TypeError(
            "layer_norm(): argument 'normalized_shape' (position 2) must be tuple of ints, "
            f"not {type(normalized_shape).__name__}"
        )
    for pos, item in enumerate(normalized_shape):
        if not isinstance(item, (int, torch.SymInt)) or isinstance(item, bool):
            raise TypeError(
                "layer_norm(): argument 'normalized_shape' (position 2) must be tuple of ints, "
                f"but found element of type {type(item).__name__} at pos {pos}"
            )
    return tuple(normalized_shape)


def check_layer_norm_args(
    x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None
) -> None:
    """LayerNorm's shape rules: non-empty shape, matching params, matching trailing input dims."""
    if len(shape) == 0:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least "
            f"one element, but got normalized_shape = {list(shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of "
                f"shape {list(t.shape)} and normalized_shape = {list(shape)}"
            )
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape) :]) != shape:
        expected = "".join(f", {s}" for s in shape)
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape [*{expected}], "
            f"but got input of size{list(x.shape)}"
        )
