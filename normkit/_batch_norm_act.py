"""act(batch_norm(x) + residual) as one autograd node, with an exact memory-saving mode.

Forward: the backend normalizes x (updating running statistics as batch_norm does), the
residual is added and the activation applied in place on that fresh output. Backward: the
activation's derivative gives dz from dout (dresidual = dz), then the normalization is
recomputed from x under autograd and differentiated with dz, exactly as batch_norm would.

Saved for backward — default: x and the output (identity: x only), like torch's BN→add→act
composition keeps x and the activation's output/input. memory_efficient: x plus a 1-bit sign
mask of the pre-activation (relu, leaky_relu), or x plus the residual (silu, gelu: z is
recomputed). The normalized output is never saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as tF
from torch import Tensor

from normkit.backends import backend_for

ACTS = ("identity", "relu", "leaky_relu", "silu", "gelu")


def check_act(act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")


def reference_act(z: Tensor, act: str, slope: float) -> Tensor:
    """The activation in plain torch ops (differentiable)."""
    if act == "relu":
        return torch.relu(z)
    if act == "leaky_relu":
        return tF.leaky_relu(z, slope)
    if act == "silu":
        return tF.silu(z)
    if act == "gelu":
        return tF.gelu(z)
    return z


def _apply_act_(z: Tensor, act: str, slope: float) -> Tensor:
    """The activation applied to the fresh tensor z (in place where possible)."""
    if act == "relu":
        return z.relu_()
    if act == "leaky_relu":
        return tF.leaky_relu_(z, slope)
    return reference_act(z, act, slope)


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as uint8 bytes, 8 elements per byte."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, like: Tensor) -> Tensor:
    """The bool tensor of `like`'s shape (dense, x's layout) that pack_bits packed."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    flat = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: like.numel()].bool()
    return flat.view(like.shape) if like.is_contiguous() else _in_layout(flat, like)


def _in_layout(flat: Tensor, like: Tensor) -> Tensor:
    """Memory-order values `flat` viewed with the strides of the dense tensor `like`."""
    return torch.as_strided(flat, like.shape, like.stride())


def _memory_order(t: Tensor) -> Tensor:
    """The elements of dense t in memory order."""
    return torch.as_strided(t, (t.numel(),), (1,))


class BatchNormAct(torch.autograd.Function):
    """Fused batch norm + residual add + activation (first-order autograd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, training, momentum,
                eps, act, slope, memory_efficient):
        backend = backend_for(x)
        dims = (0,) + tuple(range(2, x.dim()))
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        given = (None, None) if training else (running_mean, running_var)
        update = (running_mean, running_var, momentum) if training and running_mean is not None \
            else None
        z, _, _ = backend.normalize(x, weight, bias, dims, eps, *given, shape, update)
        if residual is not None:
            z = z.add_(residual) if z.stride() == residual.stride() else z + residual
        ctx.act, ctx.slope, ctx.eps, ctx.training = act, slope, eps, training
        ctx.shape, ctx.dims, ctx.has_residual = shape, dims, residual is not None
        ctx.memory_efficient = memory_efficient
        stats = () if training else (running_mean, running_var)
        if act in ("relu", "leaky_relu"):
            # The sign of the output tells the sign of z, unless a non-positive slope flips it.
            ctx.bits = memory_efficient or (act == "leaky_relu" and slope <= 0)
            if ctx.bits:
                ctx.save_for_backward(x, weight, bias, pack_bits(_memory_order(z) > 0), *stats)
                ctx.mask_like = torch.empty_like(z, device="meta")
                return _apply_act_(z, act, slope)
            out = _apply_act_(z, act, slope)
            ctx.save_for_backward(x, weight, bias, out, *stats)
            return out
        if act == "identity":
            ctx.save_for_backward(x, weight, bias, *stats)
            return z
        if memory_efficient:
            ctx.save_for_backward(x, weight, bias, residual, *stats)
        else:
            ctx.save_for_backward(x, weight, bias, z, *stats)
        return reference_act(z, act, slope)

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        x, weight, bias = saved[:3]
        stats = saved[-2:] if not ctx.training else (None, None)
        act = ctx.act
        if act in ("relu", "leaky_relu"):
            if ctx.bits:
                positive = unpack_bits(saved[3], ctx.mask_like)
            else:
                positive = saved[3] > 0
            dz = torch.where(positive, dout, dout * (0.0 if act == "relu" else ctx.slope))
        elif act == "identity":
            dz = dout
        else:
            if ctx.memory_efficient:
                residual = saved[3]
                with torch.no_grad():
                    z, _, _ = backend_for(x).normalize(x, weight, bias, ctx.dims, ctx.eps,
                                                       *stats, ctx.shape)
                    if residual is not None:
                        z = z + residual
            else:
                z = saved[3]
            with torch.enable_grad():
                zd = z.detach().requires_grad_()
                (dz,) = torch.autograd.grad(reference_act(zd, act, ctx.slope), zd, dout)
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3])]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = {}
        if wanted:
            with torch.enable_grad():
                y, _, _ = backend_for(x).normalize(inputs[0], inputs[1], inputs[2], ctx.dims,
                                                   ctx.eps, *stats, ctx.shape)
                found = torch.autograd.grad(y, wanted, dz)
            grads = {id(t): g for t, g in zip(wanted, found)}
        dx, dw, db = (grads.get(id(t)) if t is not None else None for t in inputs)
        dres = dz if ctx.has_residual and ctx.needs_input_grad[3] else None
        return dx, dw, db, dres, None, None, None, None, None, None, None, None
