"""Experiment 3: activation scale through a 100-layer MLP, with and without BatchNorm."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as tnn

import normkit
from normkit.demo.report import Section, markdown_table

LAYERS, WIDTH, BATCH = 100, 256, 16


class DeepMLP(tnn.Module):
    """LAYERS x (Linear(WIDTH, WIDTH, bias=False) [-> BatchNorm1d] -> ReLU)."""

    def __init__(self, init: str, batch_norm: bool):
        super().__init__()
        self.linears = tnn.ModuleList(tnn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS))
        self.bns = tnn.ModuleList(
            normkit.BatchNorm1d(WIDTH) if batch_norm else tnn.Identity() for _ in range(LAYERS))
        for linear in self.linears:
            if init == "kaiming":
                tnn.init.kaiming_normal_(linear.weight)

    def stds(self, x: torch.Tensor) -> list[float]:
        """Standard deviation of the activation after every layer."""
        out = []
        for linear, bn in zip(self.linears, self.bns):
            x = torch.relu(bn(linear(x)))
            out.append(float(x.std()))
        return out


def run(out: Path, seed: int) -> Section:
    torch.manual_seed(seed)
    x = torch.randn(BATCH, WIDTH)
    setups = {
        "default init, no BN": DeepMLP("default", False),
        "Kaiming init, no BN": DeepMLP("kaiming", False),
        "default init + normkit BatchNorm1d": DeepMLP("default", True),
    }
    with torch.no_grad():
        curves = {name: model.stds(x) for name, model in setups.items()}
    figure = "depth_std.png"
    _plot(curves, out / figure)
    rows = [[name] + [f"{c[i]:.3g}" for i in (0, 9, 49, 99)] for name, c in curves.items()]
    numbers = {name: {"layer1": c[0], "layer100": c[-1]} for name, c in curves.items()}
    body = (
        f"A stack of {LAYERS} fully connected layers ({WIDTH} wide, ReLU after each) sees a batch "
        f"of {BATCH} random inputs. We print the standard deviation of the activations after "
        "each layer. With torch's default initialisation every layer shrinks the signal, so "
        "after 100 layers almost nothing is left (vanishing activations, and with them "
        "vanishing gradients). Kaiming initialisation chooses the weight scale so that ReLU "
        "layers keep the variance, which works, but only for this exact architecture. Batch "
        "normalization before each ReLU re-standardizes every layer's input from the data "
        "itself, so the scale stays constant whatever the initialisation.\n\n"
        + markdown_table(["setup", "std after layer 1", "layer 10", "layer 50", "layer 100"], rows)
    )
    bn_last = curves["default init + normkit BatchNorm1d"][-1]
    return Section("Depth: why deep networks need normalization", body, [figure], numbers,
                   summary=f"depth: std after 100 layers {curves['default init, no BN'][-1]:.2g} "
                           f"(default) vs {bn_last:.2g} (with BN)")


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), [max(v, 1e-40) if math.isfinite(v) else float("nan")
                                            for v in values], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("activation std (log scale)")
    ax.set_title(f"{LAYERS}-layer MLP, width {WIDTH}, batch {BATCH}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
