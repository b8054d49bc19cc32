"""Experiment 4: LeNet on scikit-learn's handwritten digits, with and without BatchNorm."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as tnn
import torch.nn.functional as F

import normkit
from normkit.demo.report import Section, markdown_table

LEARNING_RATES = (0.01, 0.5)
BATCH = 64


def load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 real 8x8 digit images, scaled to [0, 1], resized to 32x32,
    split 70/30 into train and test with a fixed seed."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(labels))
    train, test = order[:cut], order[cut:]
    return images[train], labels[train], images[test], labels[test]


class LeNet(tnn.Module):
    """LeNet-5 for 1x32x32 inputs; with `batch_norm`, normkit BatchNorm after every conv/fc."""

    def __init__(self, batch_norm: bool):
        super().__init__()

        def norm(kind, n):
            return getattr(normkit, kind)(n) if batch_norm else tnn.Identity()

        self.features = tnn.Sequential(
            tnn.Conv2d(1, 6, 5), norm("BatchNorm2d", 6), tnn.ReLU(), tnn.MaxPool2d(2),
            tnn.Conv2d(6, 16, 5), norm("BatchNorm2d", 16), tnn.ReLU(), tnn.MaxPool2d(2),
        )
        self.classifier = tnn.Sequential(
            tnn.Flatten(), tnn.Linear(16 * 5 * 5, 120), norm("BatchNorm1d", 120), tnn.ReLU(),
            tnn.Linear(120, 84), norm("BatchNorm1d", 84), tnn.ReLU(), tnn.Linear(84, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def evaluate(model: tnn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Test accuracy in eval mode (running statistics), restoring the previous mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    model.train(was_training)
    return accuracy


def train(batch_norm: bool, lr: float, data, epochs: int, seed: int, progress: bool) -> dict:
    """SGD (momentum 0.9) on cross-entropy; per-epoch train loss and test accuracy."""
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = LeNet(batch_norm)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    losses, accuracies = [], []
    label = f"{'BN   ' if batch_norm else 'plain'} lr={lr}"
    for _ in tqdm(range(epochs), desc=label, disable=not progress, leave=False):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(order), BATCH):
            idx = order[start : start + BATCH]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach().item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        accuracies.append(evaluate(model, x_test, y_test))
    return {"loss": losses, "accuracy": accuracies}


def run(out: Path, seed: int, quick: bool, progress: bool) -> Section:
    epochs = 4 if quick else 20
    data = load_digits(seed)
    runs = {(bn, lr): train(bn, lr, data, epochs, seed, progress)
            for lr in LEARNING_RATES for bn in (False, True)}
    figure = "training_curves.png"
    _plot(runs, epochs, out / figure)
    rows = []
    for (bn, lr), r in runs.items():
        final = r["loss"][-1]
        rows.append(["with BatchNorm" if bn else "without", lr,
                     "diverged (NaN)" if not math.isfinite(final) else f"{final:.3f}",
                     f"{100 * r['accuracy'][-1]:.1f}%", f"{100 * max(r['accuracy']):.1f}%"])
    numbers = {f"{'bn' if bn else 'plain'}_lr{lr}": {"final_loss": r["loss"][-1],
                                                      "final_accuracy": r["accuracy"][-1]}
               for (bn, lr), r in runs.items()}
    low, high = LEARNING_RATES
    body = (
        f"A LeNet-5 convolutional network learns to read handwritten digits: scikit-learn's "
        f"{len(data[1]) + len(data[3])} real 8x8 scans, enlarged to 32x32, {len(data[1])} for "
        f"training and {len(data[3])} held out for testing. Both networks start from the same "
        f"random weights and train with the same optimizer (SGD with momentum 0.9, batch "
        f"{BATCH}, {epochs} epochs); one has a normkit BatchNorm after every convolution and "
        f"hidden fully connected layer. Test accuracy is measured in eval mode, i.e. with the "
        f"running statistics.\n\n"
        + markdown_table(["network", "learning rate", "final train loss",
                          "final test accuracy", "best test accuracy"], rows)
        + "\n\n" + _conclusion(numbers, low, high)
    )
    summary = ", ".join(f"{k}: loss {v['final_loss']:.3g} acc {100 * v['final_accuracy']:.0f}%"
                        for k, v in numbers.items())
    return Section("Training LeNet on real handwritten digits", body, [figure], numbers,
                   summary=summary)


def _conclusion(numbers: dict, low: float, high: float) -> str:
    """What this run's numbers say, in words."""
    def acc(key):
        return f"{100 * numbers[key]['final_accuracy']:.1f}%"

    plain_high = numbers[f"plain_lr{high}"]["final_loss"]
    bn_high = numbers[f"bn_lr{high}"]["final_loss"]
    failed = not math.isfinite(plain_high) or plain_high > 2.0  # ~ln(10): chance level
    verdict = (" (no better than guessing: its updates are too large for its unnormalized "
               "activations)") if failed else ""
    return (
        f"At the small learning rate ({low}) the plain network reaches {acc(f'plain_lr{low}')} "
        f"test accuracy and the batch-normalized one {acc(f'bn_lr{low}')}. At the large "
        f"learning rate ({high}) the plain network ends with train loss "
        f"{plain_high:.3g}{verdict}, while the "
        f"batch-normalized network, whose every layer input stays at a controlled scale, ends "
        f"with loss {bn_high:.3g} and {acc(f'bn_lr{high}')} test accuracy. "
        + ("Batch normalization made the larger learning rate usable."
           if bn_high < plain_high or not math.isfinite(plain_high)
           else "In this run batch normalization did not beat the plain network at the large "
                "learning rate.")
    )


def _plot(runs: dict, epochs: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs_axis = range(1, epochs + 1)
    for (bn, lr), r in runs.items():
        style = "-" if bn else "--"
        label = f"{'BatchNorm' if bn else 'plain'}, lr={lr}"
        ax_loss.plot(epochs_axis, r["loss"], style, label=label)
        ax_acc.plot(epochs_axis, [100 * a for a in r["accuracy"]], style, label=label)
    ax_loss.set(xlabel="epoch", ylabel="train loss (cross-entropy)", yscale="log",
                title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (eval mode)")
    ax_loss.legend()
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
