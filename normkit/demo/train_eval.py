"""Experiment 5: what changes between model.train() and model.eval()."""

from __future__ import annotations

import torch

import normkit
from normkit.demo.report import Section, markdown_table


def run(seed: int) -> Section:
    gen = torch.Generator().manual_seed(seed)
    bn = normkit.BatchNorm1d(3)
    for _ in range(50):  # training batches drawn around mean 5, std 2
        bn(torch.randn(32, 3, generator=gen) * 2 + 5)
    batch = torch.randn(8, 3, generator=gen) * 0.5 + 1  # a batch unlike the training data
    stats_before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))

    bn.eval()
    y_eval = bn(batch)
    unchanged = (torch.equal(bn.running_mean, stats_before[0])
                 and int(bn.num_batches_tracked) == stats_before[2])
    single_eval = bn(batch[:1])
    bn.train()
    y_train = bn(batch)
    try:
        bn(batch[:1])
        single_train_error = None
    except ValueError as exc:
        single_train_error = str(exc)

    rows = [
        ["statistics used to normalize", "this batch's mean/var", "running_mean / running_var"],
        ["output mean (per channel)", _v(y_train.mean(0)), _v(y_eval.mean(0))],
        ["output std (per channel)", _v(y_train.std(0, unbiased=False)), _v(y_eval.std(0))],
        ["running stats updated?", "yes (num_batches_tracked +1)",
         "no" if unchanged else "YES (unexpected)"],
        ["a batch of one sample", "ValueError" if single_train_error else "accepted",
         f"works: {_v(single_eval[0])}"],
    ]
    body = (
        "A BatchNorm1d(3) layer was trained on 50 batches with mean ~5 and std ~2, so its running "
        f"estimates are mean {_v(stats_before[0])} and variance {_v(stats_before[1])}. We then "
        "feed one new batch whose values lie around 1 with std 0.5, in both modes.\n\n"
        + markdown_table(["", "model.train()", "model.eval()"], rows)
        + "\n\nIn training mode the output is standardized with the batch's own statistics, so "
        "every channel comes out with mean 0 and std 1 whatever the input. In eval mode the "
        "layer applies the fixed running estimates: the new batch, far from the training data, "
        "comes out far from 0, and each sample's output no longer depends on the other samples "
        "of its batch, which is what makes predictions for a single sample possible. Training "
        f"mode refuses a single sample: \"{single_train_error}\". Forgetting `model.eval()` "
        "before testing is the classic batch-norm bug."
    )
    numbers = {"eval_keeps_stats": unchanged, "train_output_mean": y_train.mean(0).tolist(),
               "eval_output_mean": y_eval.mean(0).tolist(),
               "single_sample_train_raises": single_train_error is not None}
    return Section("Train mode vs eval mode", body, numbers=numbers,
                   summary=f"train/eval: eval output mean {_v(y_eval.mean(0))} vs train "
                           f"{_v(y_train.mean(0))}")


def _v(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in t.detach().tolist()) + "]"
