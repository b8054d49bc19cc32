"""`normkit demo` command line."""

from __future__ import annotations

import argparse

from normkit.demo import run_demo


def _run(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the classic batch-norm experiments, write a report")
    p.add_argument("--out", default="normkit-report", help="folder for report.md and the plots")
    p.add_argument("--quick", action="store_true", help="fewer epochs (under 30 s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run)
