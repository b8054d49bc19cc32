"""`normkit check` runs every layer against torch and reports within-tolerance errors."""

import subprocess
import sys

import torch

from normkit.cli import main
from normkit.cli.check import CASES, check_case


def test_check_rows_are_real_comparisons():
    row = check_case(CASES[2], torch.float32)
    assert row.ok
    assert 0 < row.output_err < 1e-5  # a real difference between two implementations


def test_check_detects_a_wrong_layer(monkeypatch):
    import normkit
    monkeypatch.setattr(normkit.BatchNorm2d, "forward", lambda self, x: x * 1.001)
    row = check_case(CASES[2], torch.float32)
    assert not row.ok


def test_cli_check_exit_code_and_table(capsys):
    assert main(["check", "--dtypes", "float64"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm2d" in out and "LayerNorm" in out and "within tolerance" in out


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "normkit.cli", "check", "--dtypes", "float32"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(CASES)} of {len(CASES)} checks within tolerance" in result.stdout


def test_check_with_a_forced_backend(capsys):
    """`--backend triton` sends every layer through the Triton kernels (Triton's interpreter
    on CPU tensors here); the table names the backend that ran."""
    from normkit.cli.check import run_check

    rows = run_check([torch.float32], backend="triton")
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert {r.backend for r in rows} == {"triton"}
    assert main(["check", "--dtypes", "float64", "--backend", "reference"]) == 0
    assert "reference" in capsys.readouterr().out
