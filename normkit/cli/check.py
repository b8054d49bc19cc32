"""`normkit check`: every normkit layer against its torch.nn twin, a table of max errors.

Each row builds the layer in torch and in normkit from the same state, runs a few training and
eval steps with backward, and reports the largest absolute difference of the outputs, the input
gradients, the parameter gradients and the buffers, relative to the output dtype's tolerance.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as tnn
from torch.nn.parameter import is_lazy

import normkit
from normkit.backends import backend_for

# Tolerance on the max abs difference, per compared dtype (values are O(1)).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 1e-2}


@dataclass
class CheckRow:
    layer: str
    input: str
    dtype: str
    backend: str
    output_err: float
    grad_err: float
    state_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return max(self.output_err, self.grad_err, self.state_err) <= self.tolerance


@dataclass
class Case:
    name: str
    make: Callable[[type], tnn.Module]
    shape: tuple[int, ...]
    memory_format: torch.memory_format = torch.contiguous_format


CASES = [
    Case("BatchNorm1d", lambda lib: lib.BatchNorm1d(16), (32, 16)),
    Case("BatchNorm1d", lambda lib: lib.BatchNorm1d(8, momentum=None), (8, 8, 20)),
    Case("BatchNorm2d", lambda lib: lib.BatchNorm2d(16), (8, 16, 12, 12)),
    Case("BatchNorm2d", lambda lib: lib.BatchNorm2d(16), (8, 16, 12, 12), torch.channels_last),
    Case("BatchNorm3d", lambda lib: lib.BatchNorm3d(4), (4, 4, 5, 6, 7)),
    Case("LazyBatchNorm2d", lambda lib: lib.LazyBatchNorm2d(), (8, 16, 6, 6)),
    Case("SyncBatchNorm", lambda lib: lib.SyncBatchNorm(16), (8, 16, 6, 6)),
    Case("GroupNorm", lambda lib: lib.GroupNorm(4, 16), (8, 16, 12, 12)),
    Case("GroupNorm", lambda lib: lib.GroupNorm(4, 16), (8, 16, 12, 12), torch.channels_last),
    Case("LayerNorm", lambda lib: lib.LayerNorm(256), (64, 256)),
    Case("InstanceNorm1d", lambda lib: lib.InstanceNorm1d(8, affine=True), (4, 8, 30)),
    Case("InstanceNorm2d",
         lambda lib: lib.InstanceNorm2d(8, affine=True, track_running_stats=True), (4, 8, 9, 9)),
    Case("InstanceNorm3d", lambda lib: lib.InstanceNorm3d(4), (2, 4, 5, 6, 7)),
]


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None or a.numel() == 0:
        return 0.0 if (a is None) == (b is None) else float("inf")
    return float((a.detach().double() - b.detach().double()).abs().max())


def check_case(case: Case, dtype: torch.dtype, steps: int = 3, device: str = "cpu") -> CheckRow:
    """Run `case` in torch and normkit for `steps` train steps and one eval step."""
    torch.manual_seed(0)
    module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if device != "cpu" and dtype in (torch.float16, torch.bfloat16) and case.name.startswith(
            ("GroupNorm", "LayerNorm")):
        module_dtype = dtype  # torch's CUDA kernels want these parameters in the input's dtype
    reference = case.make(tnn).to(device, module_dtype)
    ours = case.make(normkit).to(device, module_dtype)
    if not any(is_lazy(t) for t in list(reference.parameters()) + list(reference.buffers())):
        ours.load_state_dict(reference.state_dict())
    out_err = grad_err = state_err = 0.0
    backend = "?"
    for step in range(steps + 1):
        training = step < steps
        x = (torch.randn(case.shape, dtype=torch.float64) * 2 + step).to(device, dtype)
        x = x.contiguous(memory_format=case.memory_format)
        backend = backend_for(x).name
        results = []
        for module in (reference, ours):
            module.train(training)
            module.zero_grad()
            xi = x.clone().requires_grad_()
            y = module(xi)
            y.backward(torch.ones_like(y) * 0.5 + y.detach().sin())
            results.append((y, xi.grad, copy.deepcopy(dict(module.named_parameters())),
                            copy.deepcopy(dict(module.named_buffers()))))
        (y_t, gx_t, p_t, b_t), (y_n, gx_n, p_n, b_n) = results
        out_err = max(out_err, _max_diff(y_n, y_t))
        grad_err = max(grad_err, _max_diff(gx_n, gx_t))
        for name in p_t:
            grad_err = max(grad_err, _max_diff(p_n[name].grad, p_t[name].grad))
        for name in b_t:
            state_err = max(state_err, _max_diff(b_n[name], b_t[name]))
    fmt = "channels_last" if case.memory_format != torch.contiguous_format else "contiguous"
    return CheckRow(
        case.name, f"{tuple(case.shape)} {fmt}", str(dtype).removeprefix("torch."), backend,
        out_err, grad_err, state_err, TOLERANCE[dtype],
    )


def run_check(dtypes: list[torch.dtype], device: str = "cpu",
              backend: str | None = None) -> list[CheckRow]:
    """Every case in every dtype, on `device`, with a forced normkit backend if given."""
    with normkit.use_backend(backend):
        return [check_case(case, dtype, device=device) for dtype in dtypes for case in CASES]


def format_table(rows: list[CheckRow]) -> str:
    header = ["layer", "input", "dtype", "backend", "max |out|", "max |grad|", "max |buffer|",
              "tolerance", "ok"]
    body = [[r.layer, r.input, r.dtype, r.backend, f"{r.output_err:.2e}", f"{r.grad_err:.2e}",
             f"{r.state_err:.2e}", f"{r.tolerance:.0e}", "yes" if r.ok else "NO"] for r in rows]
    widths = [max(len(str(line[i])) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    dtypes = [getattr(torch, d) for d in args.dtypes]
    print(f"normkit {normkit.__version__} vs torch {torch.__version__}: "
          "max |normkit - torch| over 3 train steps + 1 eval step, forward and backward")
    rows = run_check(dtypes, args.device, args.backend)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks within tolerance")
    return 1 if failed else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="compare every normkit layer with torch.nn and print errors")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64", "bfloat16"],
                   choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="e.g. cuda (the Triton backend)")
    p.add_argument("--backend", choices=normkit.available_backends(),
                   help="force a normkit backend (default: automatic)")
    p.set_defaults(run=_run)
