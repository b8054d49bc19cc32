"""`normkit bench` command line: options, table, JSON and plot."""

from __future__ import annotations

import argparse

import torch

from normkit import bench
from normkit.backends import available_backends


def _run(args: argparse.Namespace) -> int:
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes] if args.shapes else None
    report = bench.run_bench(
        ops=args.ops, device=args.device, dtypes=[getattr(torch, d) for d in args.dtypes],
        layouts=args.layouts, quick=args.quick, shapes=shapes, backend=args.backend,
        compile=args.compile,
    )
    print(bench.format_table(report))
    bench.write_json(report, args.json)
    print(f"wrote {args.json}")
    if args.plot:
        bench.plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time normkit against torch (GB/s, % of copy bandwidth)")
    p.add_argument("--ops", nargs="+", default=list(bench.OPS), choices=list(bench.OPS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=available_backends(),
                   help="force a normkit backend (default: automatic)")
    p.add_argument("--dtypes", nargs="+", default=["float32"],
                   choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"],
                   choices=["contiguous", "channels_last"])
    p.add_argument("--shapes", nargs="+", help="e.g. 32x256x56x56 (default: ResNet-50 stages)")
    p.add_argument("--quick", action="store_true", help="two small shapes, fewer repetitions")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add the torch.compile column (default: on CUDA)")
    p.add_argument("--json", default="normkit-bench.json", help="where to write the rows")
    p.add_argument("--plot", help="write a PNG bar chart here")
    p.set_defaults(run=_run)
