"""Experiment 2: the textbook formula, normkit and torch on the same input, for every layer."""

from __future__ import annotations

import torch
import torch.nn as tnn

import normkit
from normkit.demo.report import Section, markdown_table

EPS = 1e-5


def textbook(x: torch.Tensor, dims: tuple[int, ...], gamma: torch.Tensor, beta: torch.Tensor,
             param_shape: tuple[int, ...], groups: int | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * gamma + beta, mean and biased var over `dims`."""
    xx = x if groups is None else x.reshape(x.shape[0], groups, -1)
    mean = xx.mean(dims, keepdim=True)
    var = ((xx - mean) ** 2).mean(dims, keepdim=True)
    normalized = ((xx - mean) / torch.sqrt(var + EPS)).reshape(x.shape)
    return normalized * gamma.view(param_shape) + beta.view(param_shape)


def _cases():
    return [
        ("BatchNorm1d", lambda lib: lib.BatchNorm1d(4), (8, 4, 10), (0, 2), (1, 4, 1), None,
         "each channel over (N, L)"),
        ("BatchNorm2d", lambda lib: lib.BatchNorm2d(4), (8, 4, 6, 6), (0, 2, 3), (1, 4, 1, 1), None,
         "each channel over (N, H, W)"),
        ("BatchNorm3d", lambda lib: lib.BatchNorm3d(4), (4, 4, 3, 4, 4), (0, 2, 3, 4),
         (1, 4, 1, 1, 1), None, "each channel over (N, D, H, W)"),
        ("LayerNorm", lambda lib: lib.LayerNorm([4, 6, 6]), (8, 4, 6, 6), (1, 2, 3), (4, 6, 6),
         None,
         "each sample over (C, H, W)"),
        ("InstanceNorm2d", lambda lib: lib.InstanceNorm2d(4, affine=True), (8, 4, 6, 6), (2, 3),
         (1, 4, 1, 1), None, "each (sample, channel) over (H, W)"),
        ("GroupNorm", lambda lib: lib.GroupNorm(2, 4), (8, 4, 6, 6), (2,), (1, 4, 1, 1), 2,
         "each (sample, group of 2 channels) over (C/G, H, W)"),
    ]


def run(seed: int) -> Section:
    gen = torch.Generator().manual_seed(seed)
    rows, numbers = [], {}
    for name, make, shape, dims, param_shape, groups, what in _cases():
        x = torch.randn(shape, generator=gen) * 3 + 2
        ours, theirs = make(normkit), make(tnn)
        with torch.no_grad():
            theirs.weight.copy_(torch.rand(theirs.weight.shape, generator=gen) + 0.5)
            theirs.bias.copy_(torch.randn(theirs.bias.shape, generator=gen))
        ours.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            expected = textbook(x.double(), dims, theirs.weight.double(), theirs.bias.double(),
                                param_shape, groups)
            y_n, y_t = ours(x), theirs(x)
        err_n = float((y_n.double() - expected).abs().max())
        err_t = float((y_t.double() - expected).abs().max())
        err_nt = float((y_n - y_t).abs().max())
        numbers[name] = {"normkit_vs_formula": err_n, "torch_vs_formula": err_t,
                         "normkit_vs_torch": err_nt}
        rows.append([name, tuple(shape), what, f"{err_n:.1e}", f"{err_t:.1e}", f"{err_nt:.1e}"])
    worst = max(v["normkit_vs_torch"] for v in numbers.values())
    body = (
        "Every normalization layer computes the same formula, "
        "`y = (x - mean) / sqrt(var + eps) * gamma + beta`; they differ only in *which* values "
        "share a mean and a variance. Below, the formula is written out by hand in float64 and "
        "compared with normkit and torch (both float32) on the same random input "
        "(mean 2, std 3) with random gamma and beta.\n\n"
        + markdown_table(["layer", "input", "normalizes", "max |normkit - formula|",
                          "max |torch - formula|", "max |normkit - torch|"], rows)
        + "\n\nDifferences of ~1e-6 are float32 rounding: the three agree."
    )
    return Section("The formula, checked", body, numbers=numbers,
                   summary=f"formula check: max |normkit - torch| = {worst:.1e}")
