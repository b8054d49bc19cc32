"""`normkit demo --quick`: files, and the key numbers computed live."""

import math
import struct

import pytest

from normkit.cli import main
from normkit.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    numbers = run_demo(out, quick=True, seed=0, progress=False)
    return out, numbers


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_files_written(demo):
    out, numbers = demo
    report = (out / "report.md").read_text()
    for title in ("Running statistics", "The formula", "Depth", "Training LeNet", "Train mode"):
        assert title in report
    for png in ("depth_std.png", "training_curves.png"):
        assert f"]({png})" in report
        width, height = _png_size(out / png)
        assert width > 100 and height > 100 and (out / png).stat().st_size > 5000


def test_running_statistics_match_torch_and_the_formula(demo):
    _, numbers = demo
    stats = numbers["running_stats"]
    assert stats["all_agree"]
    step2 = stats["BatchNorm1d_step2"]
    for key in ("normkit_mean", "torch_mean", "formula_mean"):
        assert step2[key] == pytest.approx([0.51, 1.02, 1.53, 2.04, 2.55], abs=1e-6)
    assert step2["normkit_var"] == pytest.approx([0.49] * 5, abs=1e-6)


def test_formula_check_agrees(demo):
    _, numbers = demo
    for layer, errors in numbers["formula"].items():
        assert errors["normkit_vs_torch"] < 1e-5, layer
        assert errors["normkit_vs_formula"] < 1e-5, layer


def test_depth_experiment(demo):
    _, numbers = demo
    depth = numbers["depth"]
    assert depth["default init, no BN"]["layer100"] < 1e-10
    assert 0.3 < depth["default init + normkit BatchNorm1d"]["layer100"] < 1.0


def test_batch_norm_wins_at_high_learning_rate(demo):
    _, numbers = demo
    training = numbers["training"]
    plain, bn = training["plain_lr0.5"]["final_loss"], training["bn_lr0.5"]["final_loss"]
    assert not math.isfinite(plain) or bn < plain
    assert training["bn_lr0.5"]["final_accuracy"] > 0.8


def test_train_eval(demo):
    _, numbers = demo
    te = numbers["train_eval"]
    assert te["eval_keeps_stats"] and te["single_sample_train_raises"]
    assert all(abs(m) < 1e-5 for m in te["train_output_mean"])
    assert all(abs(m) > 0.5 for m in te["eval_output_mean"])


def test_cli_demo(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--seed", "1"]) == 0
    assert str(tmp_path / "report.md") in capsys.readouterr().out
