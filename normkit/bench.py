"""`normkit bench`: time normkit against torch side by side, in GB/s of ideal bytes.

Ideal bytes: forward 2x the input's bytes (read x, write y); forward+backward 5x (read x,
write y, read dy, read x, write dx); fused BN+add+ReLU forward+backward 7x (read x and the
residual, write y; read dy and x, write dx and the residual's grad). Each row also gives the
% of a copy bandwidth (bytes read + written by `dst.copy_(src)` on a 256 MiB buffer) timed
alongside that row, its repetitions interleaved with torch's and normkit's. Before timing,
normkit's result is checked against torch's once.

On CUDA each repetition is timed with device events around one call per input set, the sets
rotating so that their bytes exceed the L2 cache (`GPU_ROTATION_BYTES`): the numbers are
device throughput from memory, not from cache, with the host's launches overlapped as in a
training loop. On the CPU a repetition repeats a call that takes less than
`CPU_MIN_REP_SECONDS` until it lasts that long, so small shapes are timed in a steady state
rather than by single sub-millisecond readings. torch's and normkit's repetitions (and
torch.compile's) alternate, so a slow spell of a shared machine does not fall on one of them.
Input grads are reset to None before each call, so no time goes to accumulating them.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn as tnn

import normkit

RESNET50_SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14),
                   (32, 2048, 7, 7)]
GPU_BATCH = 256  # CUDA runs add the ResNet-50 stage shapes at this batch size
SMALL_SHAPE = (8, 32, 8, 8)
LN_SHAPE = (8192, 1024)
GPU_ROTATION_BYTES = 256 << 20  # CUDA inputs rotate over sets this large in all (> L2)
MAX_INPUT_SETS = 16
CPU_MIN_REP_SECONDS = 5e-3


@dataclass(frozen=True)
class Op:
    """One benchmarked operation: how to build the layer and which pass is timed."""

    name: str
    layer: str
    passes: str  # "fwd" or "fwdbwd"
    train: bool
    ideal_factor: int

    def build(self, lib, channels: int) -> tnn.Module:
        if self.layer == "BatchNormAddReLU":
            return lib.BatchNormAct2d(channels) if lib is normkit else _BatchNormAddReLU(channels)
        if self.layer == "BatchNorm2d":
            return lib.BatchNorm2d(channels)
        if self.layer == "GroupNorm":
            return lib.GroupNorm(min(32, channels), channels)
        if self.layer == "InstanceNorm2d":
            return lib.InstanceNorm2d(channels, affine=True)
        return lib.LayerNorm(channels)


OPS = {
    "bn2d_train_fwd": Op("bn2d_train_fwd", "BatchNorm2d", "fwd", True, 2),
    "bn2d_train_fwdbwd": Op("bn2d_train_fwdbwd", "BatchNorm2d", "fwdbwd", True, 5),
    "bn2d_eval_fwd": Op("bn2d_eval_fwd", "BatchNorm2d", "fwd", False, 2),
    "gn_fwdbwd": Op("gn_fwdbwd", "GroupNorm", "fwdbwd", True, 5),
    "ln_fwdbwd": Op("ln_fwdbwd", "LayerNorm", "fwdbwd", True, 5),
    "in_fwdbwd": Op("in_fwdbwd", "InstanceNorm2d", "fwdbwd", True, 5),
    "bn_add_relu_fwdbwd": Op("bn_add_relu_fwdbwd", "BatchNormAddReLU", "fwdbwd", True, 7),
}


class _BatchNormAddReLU(tnn.BatchNorm2d):
    """torch's unfused composition relu(bn(x) + residual), the baseline for BatchNormAct2d."""

    def forward(self, x, residual):
        return torch.relu(super().forward(x) + residual)


@dataclass
class Row:
    op: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    device: str
    backend: str  # the normkit backend that ran
    torch_ms: float
    normkit_ms: float
    compile_ms: float | None
    speedup: float
    normkit_gbps: float
    torch_gbps: float
    copy_gbps: float  # of the copy timed alongside (its repetitions interleaved with the row's)
    normkit_pct_copy: float
    torch_pct_copy: float
    max_abs_err: float


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, reps: int, warmup: int = 2,
                calls: int = 1) -> float:
    """Median seconds of one fn() call (see `median_times`)."""
    return median_times([fn], device, reps, warmup, calls)[0]


def median_times(fns: list[Callable[[], object]], device: str, reps: int, warmup: int = 2,
                 calls: int = 1) -> list[float]:
    """Median seconds of one call of each fn, their repetitions interleaved (fn 0, fn 1, ...,
    fn 0, ...) so that a slow spell of a shared machine falls on every fn alike. On CUDA each
    repetition is `calls` back-to-back calls between device events; elsewhere the host clock
    times enough back-to-back calls to last CPU_MIN_REP_SECONDS (at least one)."""
    cuda = device.startswith("cuda")
    counts = []
    for fn in fns:
        for _ in range(max(warmup, calls)):
            fn()
        _sync(device)
        if cuda:
            counts.append(calls)
            continue
        start_s = time.perf_counter()
        fn()
        _sync(device)
        once = time.perf_counter() - start_s
        counts.append(max(1, min(1000, int(CPU_MIN_REP_SECONDS / max(once, 1e-7)))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, n, record in zip(fns, counts, times):
            record.append(_repetition(fn, n, device) / n)
    return [statistics.median(t) for t in times]


def _repetition(fn: Callable[[], object], calls: int, device: str) -> float:
    """Seconds of `calls` back-to-back fn() calls (device time on CUDA)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return time.perf_counter() - start_s


@dataclass(frozen=True)
class Copy:
    """`dst.copy_(src)` on 256 MiB: the memory-bandwidth reference (bytes read + written)."""

    src: torch.Tensor
    dst: torch.Tensor

    @classmethod
    def on(cls, device: str) -> Copy:
        src = torch.empty(64 << 20, dtype=torch.float32, device=device).uniform_()
        return cls(src, torch.empty_like(src))

    @property
    def nbytes(self) -> int:
        return 2 * self.src.numel() * self.src.element_size()

    def __call__(self) -> None:
        self.dst.copy_(self.src)


def shapes_for(op: Op, quick: bool, device: str = "cpu") -> list[tuple[int, ...]]:
    """The default shapes of an op; CUDA adds the ResNet-50 stages at batch GPU_BATCH."""
    if op.layer == "LayerNorm":
        return [LN_SHAPE] if not quick else [(2048, 1024)]
    if quick:
        return [SMALL_SHAPE, (32, 256, 56, 56)]
    large = [(GPU_BATCH, *s[1:]) for s in RESNET50_SHAPES] if device.startswith("cuda") else []
    return [*RESNET50_SHAPES, *large, SMALL_SHAPE]


@dataclass(frozen=True)
class Inputs:
    """The input sets of one benchmark case (one set on CPU; on CUDA enough to exceed L2)."""

    xs: tuple[torch.Tensor, ...]
    dys: tuple[torch.Tensor, ...]
    residuals: tuple[torch.Tensor | None, ...]
    channels: int

    @property
    def x(self) -> torch.Tensor:
        return self.xs[0]


def _runner(module: tnn.Module, inputs: Inputs, passes: str):
    """A call of module on the next input set (forward, or forward and backward)."""
    sets = len(inputs.xs)
    xgs = [x.detach().clone().requires_grad_(passes != "fwd") for x in inputs.xs]
    extras = [() if r is None else (r.detach().clone().requires_grad_(passes != "fwd"),)
              for r in inputs.residuals]
    step = iter(range(1 << 62))

    def run():
        i = next(step) % sets
        if passes == "fwd":
            with torch.no_grad():
                return module(xgs[i], *extras[i])
        xgs[i].grad = None
        for r in extras[i]:
            r.grad = None
        out = module(xgs[i], *extras[i])
        out.backward(inputs.dys[i])
        return out
    return run


def make_inputs(op: Op, shape: tuple[int, ...], dtype: torch.dtype, layout: str,
                device: str) -> Inputs:
    """Seeded inputs, output grads (and residuals) of one benchmark case."""
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    sets = 1
    if device.startswith("cuda"):
        sets = max(1, min(MAX_INPUT_SETS, -(-GPU_ROTATION_BYTES // max(1, nbytes))))

    def draw() -> torch.Tensor:
        return (torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                .contiguous(memory_format=fmt))
    xs = tuple(draw() for _ in range(sets))
    dys = tuple(draw() for _ in range(sets))
    residuals = tuple(draw() if op.layer == "BatchNormAddReLU" else None for _ in range(sets))
    channels = shape[-1] if op.layer == "LayerNorm" else shape[1]
    return Inputs(xs, dys, residuals, channels)


def time_normkit(op: Op, inputs: Inputs, device: str, reps: int) -> float:
    """Median seconds of normkit's layer on one case."""
    module = op.build(normkit, inputs.channels).to(device).train(op.train)
    return median_time(_runner(module, inputs, op.passes), device, reps,
                       calls=len(inputs.xs))


def bench_one(op: Op, shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: str,
              reps: int, with_compile: bool, copy: Copy) -> Row:
    """Time torch and normkit (and torch.compile) on one op, shape, dtype and layout, and
    `copy` alongside them: the row's % of copy compares with the bandwidth of the same minutes
    (a shared machine's copy figure moves by tens of % from minute to minute)."""
    inputs = make_inputs(op, shape, dtype, layout, device)
    x, channels, calls = inputs.x, inputs.channels, len(inputs.xs)
    modules = {lib: op.build(lib, channels).to(device).train(op.train) for lib in (tnn, normkit)}
    results = [_runner(modules[lib], inputs, op.passes)() for lib in (tnn, normkit)]
    err = float((results[0].detach().double() - results[1].detach().double()).abs().max())
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    if not err <= tolerance:
        raise AssertionError(f"{op.name} {shape}: normkit differs from torch by {err}")
    runners = [_runner(modules[lib], inputs, op.passes) for lib in (tnn, normkit)]
    if with_compile:
        compiled = torch.compile(op.build(tnn, channels).to(device).train(op.train))
        runners.append(_runner(compiled, inputs, op.passes))
    t_copy, t_torch, t_nk, *t_rest = median_times(
        [copy, *runners], device, reps, warmup=3 if with_compile else 2, calls=calls)
    t_compile = t_rest[0] if with_compile else None
    ideal = op.ideal_factor * x.numel() * x.element_size()
    copy_gbps = copy.nbytes / t_copy / 1e9
    return Row(
        op.name, tuple(shape), str(dtype).removeprefix("torch."), layout, device,
        normkit.backends.backend_for(x).name, t_torch * 1e3, t_nk * 1e3,
        None if t_compile is None else t_compile * 1e3,
        t_torch / t_nk, ideal / t_nk / 1e9, ideal / t_torch / 1e9, copy_gbps,
        100 * ideal / t_nk / 1e9 / copy_gbps, 100 * ideal / t_torch / 1e9 / copy_gbps, err,
    )


def run_bench(ops: Iterable[str] = tuple(OPS), device: str = "cpu", dtypes=(torch.float32,),
              layouts=("contiguous", "channels_last"), quick: bool = False,
              shapes: list[tuple[int, ...]] | None = None, progress: bool = True,
              backend: str | None = None, compile: bool | None = None) -> dict:
    """Benchmark every (op, shape, dtype, layout); returns the JSON-ready report.
    `backend` forces a normkit backend (default: the automatic choice); `compile` adds the
    torch.compile column (default: on CUDA)."""
    from tqdm import tqdm

    reps = 5 if quick else 10
    copy = Copy.on(device)
    with_compile = device.startswith("cuda") if compile is None else compile
    jobs = []
    for name in ops:
        op = OPS[name]
        for shape in shapes or shapes_for(op, quick, device):
            if len(shape) != (2 if op.layer == "LayerNorm" else 4):
                continue  # --shapes lists shapes for every op: each takes those of its rank
            for dtype in dtypes:
                for layout in layouts:
                    if layout == "channels_last" and (len(shape) != 4 or op.layer in (
                            "LayerNorm", "InstanceNorm2d")):
                        continue
                    jobs.append((op, shape, dtype, layout))
    with normkit.use_backend(backend):
        rows = [bench_one(op, shape, dtype, layout, device, reps, with_compile, copy)
                for op, shape, dtype, layout in tqdm(jobs, disable=not progress, desc="bench")]
    copies = [r.copy_gbps for r in rows] or [copy.nbytes / median_time(copy, device, reps) / 1e9]
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else
        platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "normkit": normkit.__version__,
        "copy_gbps": statistics.median(copies),
        "copy_gbps_range": [min(copies), max(copies)],
        "rows": [asdict(r) for r in rows],
    }


def format_table(report: dict) -> str:
    """The side-by-side table of a report."""
    has_compile = any(r["compile_ms"] is not None for r in report["rows"])
    header = ["op", "shape", "dtype", "layout", "backend", "torch ms", "normkit ms"]
    header += ["compile ms"] if has_compile else []
    header += ["speedup", "torch GB/s", "normkit GB/s", "copy GB/s", "torch %copy",
               "normkit %copy"]
    body = []
    for r in report["rows"]:
        line = [r["op"], "x".join(map(str, r["shape"])), r["dtype"], r["layout"], r["backend"],
                f"{r['torch_ms']:.2f}", f"{r['normkit_ms']:.2f}"]
        line += [f"{r['compile_ms']:.2f}"] if has_compile else []
        line += [f"{r['speedup']:.2f}x", f"{r['torch_gbps']:.1f}", f"{r['normkit_gbps']:.1f}",
                 f"{r['copy_gbps']:.1f}", f"{r['torch_pct_copy']:.0f}%",
                 f"{r['normkit_pct_copy']:.0f}%"]
        body.append(line)
    widths = [max(len(str(row[i])) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    low, high = report["copy_gbps_range"]
    title = (f"{report['device']} ({report['device_name']}), {report['threads']} threads, torch "
             f"{report['torch']}, copy bandwidth {report['copy_gbps']:.1f} GB/s (median of the "
             f"rows' copies, {low:.1f}-{high:.1f}; each row's %copy is of its own)")
    return title + "\n" + "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Bar chart of % of copy bandwidth, torch vs normkit, one bar pair per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [f"{r['op']}\n{'x'.join(map(str, r['shape']))}\n{r['layout'][:2]}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 5))
    idx = range(len(rows))
    ax.bar([i - 0.2 for i in idx], [r["torch_pct_copy"] for r in rows], 0.4, label="torch")
    ax.bar([i + 0.2 for i in idx], [r["normkit_pct_copy"] for r in rows], 0.4, label="normkit")
    ax.set_xticks(list(idx), labels, fontsize=6, rotation=90)
    ax.set_ylabel("% of measured copy bandwidth")
    ax.set_title(f"normkit vs torch on {report['device']} (copy {report['copy_gbps']:.1f} GB/s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
