"""The demo's report: sections of markdown, figures, and the numbers tests can check."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Section:
    """One experiment's write-up: markdown body, figure file names, key numbers."""

    title: str
    body: str
    figures: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    summary: str = ""


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(values) -> str:
    """A short list of numbers: '[0.51, 1.02, 1.53]'."""
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def run_demo(out_dir: str | Path, quick: bool = False, seed: int = 0,
             progress: bool = True) -> dict:
    """Run every experiment, write report.md and figures into out_dir; returns the numbers."""
    from normkit.demo import depth, formula, running_stats, train_eval, training

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sections = []
    for name, experiment in [
        ("running_stats", lambda: running_stats.run()),
        ("formula", lambda: formula.run(seed)),
        ("depth", lambda: depth.run(out, seed)),
        ("training", lambda: training.run(out, seed, quick, progress)),
        ("train_eval", lambda: train_eval.run(seed)),
    ]:
        section = experiment()
        sections.append((name, section))
        print(f"[{name}] {section.summary}")
    elapsed = time.perf_counter() - start
    parts = [
        "# normkit demo: batch normalization, measured live",
        f"Run with torch {torch.__version__}, seed {seed}, {'quick' if quick else 'full'} mode, "
        f"in {elapsed:.1f} s. Every number below was computed by this run.",
        "Batch normalization rescales each channel of a layer's input to mean 0 and variance 1, "
        "using the statistics of the current mini-batch while training and a running average of "
        "them at test time, then applies a learned scale (gamma) and shift (beta).",
    ]
    for i, (_, section) in enumerate(sections, 1):
        parts.append(f"## {i}. {section.title}\n\n{section.body}")
        parts += [f"![{f}]({f})" for f in section.figures]
    report = out / "report.md"
    report.write_text("\n\n".join(parts) + "\n")
    files = [report] + [out / f for _, s in sections for f in s.figures]
    print("wrote:")
    for f in files:
        print(f"  {f}")
    numbers = {name: section.numbers for name, section in sections}
    return numbers | {"files": [str(f) for f in files]}
