"""normkit.functional: batch_norm, instance_norm, group_norm, layer_norm.

Same signatures, results, running-statistics updates and errors as `torch.nn.functional`, but the
arithmetic is normkit's: every op validates its arguments in torch's order, lays the input out as
torch would, and hands one "normalize over these dims" call to the backend chosen by
`normkit.backends.backend_for`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from normkit import _checks
from normkit._autocast import follows_autocast
from normkit._layout import batch_layout, dense_in_suggested_format
from normkit.backends import backend_for

__all__ = ["batch_norm", "batch_norm_act", "group_norm", "instance_norm", "layer_norm"]


def _empty_output(input: Tensor, *params: Tensor | None) -> Tensor:
    """Result for an input with no elements: an empty copy still tied to the parameters.

    Tying it to the parameters gives them zero gradients (not None), as torch does.
    """
    out = input.clone()
    for p in params:
        if p is not None:
            out = out + 0 * p.sum()
    return out


@follows_autocast()
def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization over (N, *spatial) for each channel of an (N, C, *) input.

    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, with batch statistics when `training`
    (updating the running statistics in place if given) and running statistics otherwise.
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm,
            (input, running_mean, running_var, weight, bias),
            input,
            running_mean,
            running_var,
            weight=weight,
            bias=bias,
            training=training,
            momentum=momentum,
            eps=eps,
        )
    if _check_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return _empty_output(input, weight, bias)
    x = dense_in_suggested_format(input)
    if training:
        update = None if running_mean is None else (running_mean, running_var, momentum)
        running_mean = running_var = None
    else:
        update = None
    dims, shape = batch_layout(x.dim(), x.shape[1])
    y, _, _ = backend_for(x).normalize(x, weight, bias, dims, eps, running_mean, running_var,
                                       shape, update)
    return y


def _check_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                      eps) -> bool:
    """torch's batch-norm argument checks, in torch's order; True when the input is empty
    (torch then skips the remaining checks and returns an empty result)."""
    if momentum is not None and _checks.plain_batch_norm_call(
            input, running_mean, running_var, weight, bias, training, eps):
        return False
    if training:
        _checks.verify_batch_size(input.size())
    _checks.check_eps(eps, training)
    if momentum is None:
        raise TypeError(
            "batch_norm(): argument 'momentum' (position 7) must be float, not NoneType"
        )
    if training:
        _checks.check_running_pair(running_mean, running_var)
    if input.numel() == 0:
        return True
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is None and not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    _checks.check_per_channel_sizes(
        input.shape[1], running_mean=running_mean, running_var=running_var, weight=weight,
        bias=bias,
    )
    _checks.check_running_stats_not_differentiable(running_mean, running_var)
    _checks.check_dtypes(
        "batch_norm", input, weight, bias, running_mean, running_var, dispatch_first=True
    )
    return False


@follows_autocast()
def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    act: str = "relu",
    negative_slope: float = 0.01,
    residual: Tensor | None = None,
    memory_efficient: bool = False,
) -> Tensor:
    """act(batch_norm(input) + residual) as one autograd node (see `BatchNormAct2d`).

    Same arguments, checks and running-statistics updates as `batch_norm`; `act` is one of
    "identity", "relu", "leaky_relu" (with `negative_slope`), "silu", "gelu". With
    `memory_efficient`, backward keeps only the input and a 1-bit sign mask (relu/leaky_relu)
    or the input and the residual (silu/gelu) and recomputes the rest.
    """
    from normkit._batch_norm_act import check_act, reference_act

    check_act(act)
    if residual is not None and residual.shape != input.shape:
        raise ValueError(
            f"residual must have the input's shape {tuple(input.shape)}, "
            f"got {tuple(residual.shape)}"
        )
    if torch.compiler.is_compiling():
        # Traced as the composition (the compiler decides what backward keeps, so
        # memory_efficient changes nothing here).
        out = batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if residual is not None:
            out = out + residual.to(out.dtype)
        return reference_act(out, act, negative_slope)
    if _check_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
        out = _empty_output(input, weight, bias)
        return reference_act(out if residual is None else out + residual, act, negative_slope)
    x = dense_in_suggested_format(input)
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    return backend_for(x).batch_norm_act(
        x, weight, bias, residual, running_mean, running_var, training, momentum, eps, act,
        negative_slope, memory_efficient,
    )


@follows_autocast()
def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance normalization: each (sample, channel) of an (N, C, *) input over its spatial dims.

    With `use_input_stats` the running statistics (if given) move towards the batch-averaged
    instance statistics; otherwise they are used to normalize.
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            instance_norm,
            (input, running_mean, running_var, weight, bias),
            input,
            running_mean=running_mean,
            running_var=running_var,
            weight=weight,
            bias=bias,
            use_input_stats=use_input_stats,
            momentum=momentum,
            eps=eps,
        )
    if use_input_stats:
        _checks.verify_spatial_size(input.size())
    if not use_input_stats and (running_mean is None or running_var is None):
        raise RuntimeError(
            "Expected running_mean and running_var to be defined when use_input_stats is false"
        )
    _checks.check_running_pair(running_mean, running_var)
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    batch, channels = input.shape[:2]
    _checks.check_per_channel_sizes(
        batch * channels,
        scale=batch,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
    )
    _checks.check_running_stats_not_differentiable(running_mean, running_var)
    _checks.check_dtypes(
        "batch_norm", input, weight, bias, running_mean, running_var, dispatch_first=True
    )

    x = input.contiguous()
    dims = tuple(range(2, x.dim()))
    backend = backend_for(x)
    y, mean, var = backend.normalize(
        x,
        weight,
        bias,
        dims,
        eps,
        None if use_input_stats else running_mean,
        None if use_input_stats else running_var,
        batch_layout(x.dim(), channels)[1],
        with_stats=True,
    )
    if use_input_stats and running_mean is not None:
        # NOTE: the running statistics follow the instance statistics averaged over the batch.
        count = input.numel() // (batch * channels)
        backend.update_running_stats(
            running_mean,
            running_var,
            mean.view(batch, channels).mean(0),
            var.view(batch, channels).mean(0),
            count,
            momentum,
        )
    return y


@follows_autocast(("cuda",))
def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group normalization: each sample's channels split into `num_groups` groups, each group
    normalized over its channels and spatial dims, then a per-channel affine."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            group_norm, (input, weight, bias), input, num_groups, weight=weight, bias=bias, eps=eps
        )
    if not _checks.plain_group_norm_call(input, num_groups, weight, bias):
        _check_group_norm(input, num_groups, weight, bias)

    x = dense_in_suggested_format(input)
    dims, param_shape = _grouped_layout(x.dim(), x.shape[1], num_groups)
    y, _, _ = backend_for(x).normalize(x, weight, bias, dims, eps, shape=param_shape,
                                       groups=num_groups)
    return y


def _check_group_norm(input, num_groups, weight, bias) -> None:
    """torch's group-norm argument checks, in torch's order."""
    if input.dim() < 2:
        raise RuntimeError(
            f"Expected at least 2 dimensions for input tensor but received {input.dim()}"
        )
    _checks.verify_batch_size(
        [input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:])
    )
    _checks.check_group_norm_args(input, num_groups, weight, bias)
    _checks.check_dtypes("GroupNormKernelImpl", input, weight, bias, dispatch_first=False)


@functools.cache
def _grouped_layout(rank: int, channels: int, groups: int) -> tuple[tuple[int, ...],
                                                                    tuple[int, ...]]:
    """GroupNorm on the view (N, G, C/G, *spatial) of a rank-`rank` input: the normalized
    dims of that view and the shape its weight / bias broadcast in."""
    return (tuple(range(2, rank + 1)),
            (1, groups, channels // groups) + (1,) * (rank - 2))


@follows_autocast(("cuda",))
def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the trailing `normalized_shape` dims, then an elementwise affine."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            layer_norm, (input, weight, bias), input, normalized_shape, weight=weight, bias=bias,
            eps=eps,
        )
    shape = _checks.normalized_shape_tuple(normalized_shape)
    _checks.check_layer_norm_args(input, shape, weight, bias)
    _checks.check_dtypes("LayerNormKernelImpl", input, weight, bias, dispatch_first=False)

    x = input.contiguous()
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    y, _, _ = backend_for(x).normalize(x, weight, bias, dims, eps)
    return y
