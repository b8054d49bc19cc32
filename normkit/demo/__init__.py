"""`normkit demo`: the classic batch-norm experiments, run live, written up as a report.

Each experiment is a module with a `run(...) -> Section`; `run_demo` runs them in order and
writes `report.md` plus the PNG figures into one folder.
"""

from normkit.demo.report import Section, run_demo

__all__ = ["Section", "run_demo"]
