"""SyncBatchNorm: single-process fallback, convert_sync_batchnorm, and 2-3 gloo ranks on CPU."""


import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as tnn

import normkit
from parity import make_pair, run_steps
from sync_worker import build_ddp_model, ddp_batches, worker


def test_fallback_equals_batchnorm_bitwise():
    sync, bn = normkit.SyncBatchNorm(3), normkit.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(sync(x), bn(x))
    assert torch.equal(sync.running_var, bn.running_var)


def test_fallback_any_rank():
    for shape in [(4, 3), (4, 3, 5), (2, 3, 2, 2, 2), (2, 3, 2, 2, 2, 2)]:
        t, n = make_pair("SyncBatchNorm", 3)
        run_steps(t, n, [("train", torch.randn(shape)), ("eval", torch.randn(shape))])


def test_convert_sync_batchnorm_shares_objects():
    model = tnn.Sequential(
        tnn.Conv2d(3, 4, 1), tnn.BatchNorm2d(4, momentum=None), normkit.BatchNorm1d(4, bias=False),
        tnn.Sequential(tnn.BatchNorm3d(4, affine=False)), normkit.InstanceNorm2d(4),
    )
    model[1].qconfig = "q"
    model.eval()
    originals = [model[1], model[2], model[3][0]]
    converted = normkit.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    new = [model[1], model[2], model[3][0]]
    for old, layer in zip(originals, new):
        assert type(layer) is normkit.SyncBatchNorm
        assert layer.weight is old.weight and layer.bias is old.bias
        assert layer.running_mean is old.running_mean
        assert layer.num_batches_tracked is old.num_batches_tracked
        assert layer.momentum == old.momentum and layer.affine == old.affine
        assert not layer.training
    assert model[1].qconfig == "q"
    assert model[2].bias is None and model[2].weight is not None
    assert type(model[4]) is normkit.InstanceNorm2d
    single = normkit.SyncBatchNorm.convert_sync_batchnorm(tnn.BatchNorm1d(3))
    assert type(single) is normkit.SyncBatchNorm
    assert repr(single) == repr(tnn.SyncBatchNorm.convert_sync_batchnorm(tnn.BatchNorm1d(3)))


def _spawn(world, jobs, tmp_path, backend="gloo"):
    init_file = str(tmp_path / "init")
    mp.spawn(worker, args=(world, init_file, str(tmp_path), jobs, backend), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _scenario(sizes, momentum=0.1, spatial=(3, 2), channels_last=False, steps=3, seed=0):
    return {"sizes": sizes, "channels": 3, "spatial": spatial, "momentum": momentum,
            "channels_last": channels_last, "steps": steps, "seed": seed}


def _expected(scenario):
    """BatchNorm on the concatenated batch: the ground truth for every rank."""
    from sync_worker import _full_batches
    bn = tnn.BatchNorm2d(3, momentum=scenario["momentum"], dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 3))
        bn.bias.copy_(torch.linspace(-1, 1, 3))
    out = []
    for x, dy in _full_batches(scenario, scenario["steps"]):
        x = x.clone().requires_grad_()
        bn.zero_grad()
        y = bn(x)
        y.backward(dy)
        out.append({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(),
                    "db": bn.bias.grad.clone(), "rm": bn.running_mean.clone(),
                    "rv": bn.running_var.clone(), "nbt": int(bn.num_batches_tracked)})
    return out


def _check(results, scenario):
    expected = _expected(scenario)
    world = len(results)
    low_precision = scenario.get("dtype", "float64") != "float64"
    for step, exp in enumerate(expected):
        per_rank = [results[r]["steps"][step] for r in range(world)]
        close = dict(rtol=1e-12, atol=1e-12)
        if low_precision:  # inputs rounded to fp16/bf16: compare loosely, in float64
            close = dict(rtol=0.05, atol=0.05)
            per_rank = [{k: v.double() if isinstance(v, torch.Tensor) else v
                         for k, v in p.items()} for p in per_rank]
        torch.testing.assert_close(torch.cat([p["y"] for p in per_rank]), exp["y"], **close)
        torch.testing.assert_close(torch.cat([p["dx"] for p in per_rank]), exp["dx"], **close)
        if low_precision:
            assert results[0]["steps"][step]["y"].dtype == getattr(torch, scenario["dtype"])
        torch.testing.assert_close(sum(p["dw"] for p in per_rank), exp["dw"], **close)
        torch.testing.assert_close(sum(p["db"] for p in per_rank), exp["db"], **close)
        for p in per_rank:
            torch.testing.assert_close(p["rm"], exp["rm"].to(p["rm"].dtype), **close)
            torch.testing.assert_close(p["rv"], exp["rv"].to(p["rv"].dtype), **close)
            assert p["nbt"] == exp["nbt"] == step + 1
            assert p["forward"] == {"all_gather": 1, "all_reduce": 0}
            assert p["backward"] == {"all_gather": 0, "all_reduce": 1}
            assert p["channels_last" if scenario["channels_last"] else "contiguous"]


TWO_RANK_SCENARIOS = [
    _scenario([3, 5]),
    _scenario([0, 4]),
    _scenario([2, 6], momentum=None),
    _scenario([4, 2], channels_last=True, seed=3),
    _scenario([1, 1], spatial=(1, 1), seed=4),  # one value per rank: no error when synced
    _scenario([3, 5], seed=6) | {"dtype": "bfloat16"},
    _scenario([4, 4], seed=7, channels_last=True) | {"dtype": "float16"},
]


def test_two_gloo_ranks(tmp_path):
    jobs = [("scenario", s) for s in TWO_RANK_SCENARIOS]
    jobs += [("mismatch", None), ("ddp", {"batch": 8, "steps": 5})]
    results = _spawn(2, jobs, tmp_path)
    for i, scenario in enumerate(TWO_RANK_SCENARIOS):
        _check([r[i] for r in results], scenario)
    mismatch = [r[len(TWO_RANK_SCENARIOS)]["error"] for r in results]
    assert all(e and "disagree on the number of input channels: [4, 5]" in e for e in mismatch)
    ddp_states = [r[-1]["state"] for r in results]
    _check_ddp_matches_single_process(ddp_states, {"batch": 8, "steps": 5})


def _check_ddp_matches_single_process(states, config):
    model = build_ddp_model(tnn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, target in ddp_batches(config):
        opt.zero_grad()
        tnn.functional.mse_loss(model(x), target).backward()
        opt.step()
    for state in states:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-10, atol=1e-10, msg=key)


def test_three_gloo_ranks(tmp_path):
    scenarios = [_scenario([1, 1, 6]), _scenario([3, 0, 2], momentum=None, seed=5)]
    results = _spawn(3, [("scenario", s) for s in scenarios], tmp_path)
    for i, scenario in enumerate(scenarios):
        _check([r[i] for r in results], scenario)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA GPU")
def test_two_nccl_ranks(tmp_path):
    scenarios = TWO_RANK_SCENARIOS[:4]
    results = _spawn(2, [("scenario", s) for s in scenarios], tmp_path, backend="nccl")
    for i, scenario in enumerate(scenarios):
        _check([r[i] for r in results], scenario)


def test_example_script_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "ddp_syncbn.py"
    result = subprocess.run([sys.executable, str(script), "--world-size", "2", "--steps", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 1: loss" in result.stdout
