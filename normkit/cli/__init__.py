"""The `normkit` command line: `normkit demo`, `normkit check`, `normkit bench`, `normkit tune`."""

from __future__ import annotations

import argparse
import sys

from normkit.cli import bench, check, demo, tune


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    check.add_parser(sub)
    bench.add_parser(sub)
    tune.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `normkit` script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
