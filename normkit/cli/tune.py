"""`normkit tune` command line: search the Triton backend's launch constants on a GPU."""

from __future__ import annotations

import argparse
import json

import torch


def _run(args: argparse.Namespace) -> int:
    from normkit import gpu_tune

    cases = None
    if args.shapes:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes]
        cases = [("bn2d_train_fwdbwd", s, getattr(torch, d), "contiguous")
                 for s in shapes for d in args.dtypes]
    report = gpu_tune.tune(cases, device=args.device, reps=args.reps)
    print(gpu_tune.format_report(report))
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.json}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="search the Triton backend's block sizes / warps / splits")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", nargs="+",
                   help="BN2d fwd+bwd shapes, e.g. 256x64x112x112 (default: bench's GPU set)")
    p.add_argument("--dtypes", nargs="+", default=["float32"],
                   choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default="normkit-tune.json", help="where to write the trials")
    p.set_defaults(run=_run)
