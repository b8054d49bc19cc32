"""`normkit tune`: search the Triton backend's launch constants on the machine at hand.

The launchers (`normkit.backends.gpu_launch`) read their split size, block sizes and warp count
from module constants; results never depend on them except through the split size's fixed
reduction order. This sweeps one constant at a time over a few values, keeping the others at
the best found so far (coordinate descent), scores each set by the geometric mean of normkit's
median times over the cases, and reports the best set as lines to put in gpu_launch.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

import torch

import normkit
from normkit import bench
from normkit.backends import gpu_launch

KNOBS: dict[str, tuple[int, ...]] = {
    "SPLIT_ELEMENTS": (4096, 8192, 16384, 32768, 65536),
    "REDUCE_BLOCK": (512, 1024, 2048, 4096),
    "COLS_TILE": (1024, 2048, 4096, 8192),
    "APPLY_BLOCK": (1024, 2048, 4096, 8192),
    "APPLY_WARPS": (4, 8, 16),
}

Case = tuple[str, tuple[int, ...], torch.dtype, str]  # (op, shape, dtype, layout)


def default_cases() -> list[Case]:
    """BN2d training fwd+bwd and eval fwd on the ResNet-50 stages at batch GPU_BATCH (fp32 NCHW,
    bf16 channels_last), GroupNorm fwd+bwd on two of them, LayerNorm fwd+bwd."""
    shapes = [(bench.GPU_BATCH, *s[1:]) for s in bench.RESNET50_SHAPES]
    cases: list[Case] = []
    for op in ("bn2d_train_fwdbwd", "bn2d_eval_fwd"):
        cases += [(op, s, torch.float32, "contiguous") for s in shapes]
        cases += [(op, s, torch.bfloat16, "channels_last") for s in shapes]
    cases += [("gn_fwdbwd", s, torch.float32, "contiguous") for s in shapes[1:3]]
    cases.append(("ln_fwdbwd", bench.LN_SHAPE, torch.float32, "contiguous"))
    return cases


def _score(cases: Iterable[Case], device: str, reps: int) -> float:
    """Geometric mean of normkit's median seconds over the cases."""
    logs = []
    for op_name, shape, dtype, layout in cases:
        op = bench.OPS[op_name]
        inputs = bench.make_inputs(op, shape, dtype, layout, device)
        logs.append(math.log(bench.time_normkit(op, inputs, device, reps)))
    return math.exp(statistics.fmean(logs))


def tune(cases: list[Case] | None = None, device: str = "cuda", reps: int = 10,
         knobs: dict[str, tuple[int, ...]] = KNOBS, progress: bool = True) -> dict:
    """Coordinate descent over `knobs` on the Triton backend; gpu_launch's constants are
    restored afterwards. Returns the JSON-ready report (every trial, the best set)."""
    from tqdm import tqdm

    cases = cases or default_cases()
    original = {name: getattr(gpu_launch, name) for name in knobs}
    best = dict(original)
    trials = []

    def measure(config: dict[str, int]) -> float:
        for name, value in config.items():
            setattr(gpu_launch, name, value)
        seconds = _score(cases, device, reps)
        trials.append({"config": dict(config), "geomean_ms": seconds * 1e3})
        if progress:  # each trial as it ends, so a run cut short still reports
            changed = {k: v for k, v in config.items() if v != original[k]}
            bar.write(f"  {seconds * 1e3:9.3f} ms  {changed or 'defaults'}")
        return seconds

    total = 1 + sum(len(values) - (best[name] in values) for name, values in knobs.items())
    with normkit.use_backend("triton"), tqdm(total=total, disable=not progress,
                                             desc="tune") as bar:
        try:
            best_time = measure(best)
            bar.update()
            for name, values in knobs.items():
                for value in values:
                    if value == best[name]:
                        continue
                    config = best | {name: value}
                    seconds = measure(config)
                    bar.update()
                    if seconds < best_time:
                        best, best_time = config, seconds
        finally:
            for name, value in original.items():
                setattr(gpu_launch, name, value)
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else
        device,
        "torch": torch.__version__,
        "cases": [[op, list(shape), str(dtype).removeprefix("torch."), layout]
                  for op, shape, dtype, layout in cases],
        "default": original,
        "default_geomean_ms": trials[0]["geomean_ms"],
        "best": best,
        "best_geomean_ms": best_time * 1e3,
        "trials": trials,
    }


def format_report(report: dict) -> str:
    """The trials, then the best set as assignment lines for gpu_launch.py."""
    lines = [(f"tuning the Triton backend on {report['device_name']} "
              f"({len(report['cases'])} cases, geometric mean of median times)")]
    for trial in report["trials"]:
        changed = {k: v for k, v in trial["config"].items() if v != report["default"][k]}
        lines.append(f"  {trial['geomean_ms']:9.3f} ms  {changed or 'defaults'}")
    lines.append(f"best: {report['best_geomean_ms']:.3f} ms "
                 f"(defaults {report['default_geomean_ms']:.3f} ms); in gpu_launch.py:")
    lines += [f"  {name} = {value}" for name, value in report["best"].items()]
    return "\n".join(lines)
