"""Experiment 1: how running_mean / running_var move, with momentum 0.3, for 1d/2d/3d BN."""

from __future__ import annotations

import torch
import torch.nn as tnn

import normkit
from normkit.demo.report import Section, fmt, markdown_table

MOMENTUM = 0.3
# (layer, per-sample feature shape): channel c of every sample holds the value c + 1.
CASES = [("BatchNorm1d", (5, 1)), ("BatchNorm2d", (3, 2, 2)), ("BatchNorm3d", (2, 2, 2, 3))]
BATCH = 3


def constant_batch(feature_shape: tuple[int, ...]) -> torch.Tensor:
    channels = feature_shape[0]
    per_channel = torch.arange(1, channels + 1, dtype=torch.float32)
    sample = per_channel.view(-1, *[1] * (len(feature_shape) - 1)).expand(feature_shape)
    return torch.stack([sample] * BATCH)


def run() -> Section:
    rows, numbers, agree = [], {}, True
    for layer, feature_shape in CASES:
        x = constant_batch(feature_shape)
        ours = getattr(normkit, layer)(feature_shape[0], momentum=MOMENTUM)
        theirs = getattr(tnn, layer)(feature_shape[0], momentum=MOMENTUM)
        mean_f = torch.zeros(feature_shape[0])
        var_f = torch.ones(feature_shape[0])
        dims = [0] + list(range(2, x.dim()))
        for step in (1, 2):
            ours(x)
            theirs(x)
            batch_mean = x.mean(dims)
            batch_var = x.var(dims, unbiased=True)
            mean_f = (1 - MOMENTUM) * mean_f + MOMENTUM * batch_mean
            var_f = (1 - MOMENTUM) * var_f + MOMENTUM * batch_var
            ok = all(torch.allclose(a, b, atol=1e-6) for a, b in [
                (ours.running_mean, theirs.running_mean), (ours.running_mean, mean_f),
                (ours.running_var, theirs.running_var), (ours.running_var, var_f)])
            agree &= ok
            rows.append([layer, tuple(x.shape), step, fmt(ours.running_mean),
                         fmt(theirs.running_mean), fmt(mean_f), fmt(ours.running_var),
                         fmt(theirs.running_var), fmt(var_f), "yes" if ok else "NO"])
            numbers[f"{layer}_step{step}"] = {
                "normkit_mean": ours.running_mean.tolist(),
                "torch_mean": theirs.running_mean.tolist(),
                "formula_mean": mean_f.tolist(), "normkit_var": ours.running_var.tolist(),
                "torch_var": theirs.running_var.tolist(), "formula_var": var_f.tolist()}
    numbers["all_agree"] = agree
    table = markdown_table(
        ["layer", "input", "step", "running_mean (normkit)", "(torch)", "(formula)",
         "running_var (normkit)", "(torch)", "(formula)", "agree"], rows)
    body = (
        "While training, each BatchNorm layer keeps a running estimate of every channel's mean "
        "and variance, to use at test time. After each batch it moves the estimate a fraction "
        f"`momentum` (here {MOMENTUM}) of the way towards the batch's value:\n\n"
        "    running = (1 - momentum) * running + momentum * batch_statistic\n\n"
        "The estimates start at mean 0 and variance 1. We feed the same batch twice; channel c "
        "of every sample holds the constant value c + 1, so the batch mean of channel c is c + 1 "
        "and its variance is 0. Note that the running variance uses the *unbiased* batch "
        "variance (divided by count - 1), although normalization itself uses the biased one.\n\n"
        + table + "\n\n"
        + ("normkit, torch and the update formula agree on every value."
           if agree else "**normkit, torch and the formula disagree somewhere (see 'agree').**")
    )
    summary = "running statistics " + ("agree with torch and the formula" if agree else "DISAGREE")
    return Section("Running statistics, step by step", body, numbers=numbers, summary=summary)
