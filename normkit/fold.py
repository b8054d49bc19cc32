"""fold_batchnorm(model): fold inference-mode batch norms into the preceding conv / linear."""

from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn as nn

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_batchnorm(model: nn.Module, return_count: bool = False):
    """A new eval-mode copy of `model` in which every batch norm (torch's or normkit's, with
    running statistics) applied directly to the output of a Conv1d/2d/3d or Linear — and to
    nothing else — is folded into that layer and replaced by Identity:

        w' = w * gamma / sqrt(running_var + eps)
        b' = (b - running_mean) * gamma / sqrt(running_var + eps) + beta

    Pairs are found by torch.fx tracing; models that cannot be traced fall back to adjacent
    children of Sequential containers. With `return_count`, returns (model, number folded).
    """
    folded = copy.deepcopy(model).eval()
    try:
        pairs = _pairs_by_tracing(folded)
    except Exception:  # noqa: BLE001 - any tracing failure: use the structural fallback
        pairs = _pairs_in_sequentials(folded)
    for parent, conv_name, bn_name in pairs:
        modules = dict(parent.named_modules())
        _fold_into(modules[conv_name], modules[bn_name])
        _set_submodule(parent, bn_name, nn.Identity())
    return (folded, len(pairs)) if return_count else folded


def _is_foldable_bn(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.running_mean is not None and module.running_var is not None)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping every batch norm (normkit's included) as one call."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, nn.modules.batchnorm._BatchNorm)
                or super().is_leaf_module(module, qualified_name))


def _pairs_by_tracing(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_foldable_bn(modules[node.target]):
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules[source.target], FOLDABLE)
                and len(source.users) == 1 and calls[source.target] == 1
                and calls[node.target] == 1
                and _channels_match(modules[source.target], modules[node.target])):
            pairs.append((model, source.target, node.target))
    return pairs


def _pairs_in_sequentials(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    pairs = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if isinstance(a, FOLDABLE) and _is_foldable_bn(b) and _channels_match(a, b):
                pairs.append((seq, name_a, name_b))
    return pairs


def _channels_match(layer: nn.Module, bn: nn.Module) -> bool:
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return out == bn.running_mean.numel()


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight
    shape = (-1,) + (1,) * (weight.dim() - 1)
    new_weight = weight.double() * scale.view(shape)
    new_bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    layer.weight = nn.Parameter(new_weight.to(weight.dtype), requires_grad=weight.requires_grad)
    layer.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
