"""Per-rank programs for the multi-process SyncBatchNorm tests (spawned over gloo on CPU)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

import normkit

TIMEOUT = datetime.timedelta(seconds=60)


def _full_batches(scenario, steps):
    gen = torch.Generator().manual_seed(scenario["seed"])
    total = sum(scenario["sizes"])
    shape = (total, scenario["channels"]) + tuple(scenario["spatial"])
    return [
        (torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + s) + s,
         torch.randn(shape, generator=gen, dtype=torch.float64))
        for s in range(steps)
    ]


def _counting(fn, counter, key):
    def wrapped(*args, **kwargs):
        counter[key] += 1
        return fn(*args, **kwargs)
    return wrapped


def run_scenario(rank: int, scenario: dict, device: str) -> dict:
    """Several training steps of normkit.SyncBatchNorm on this rank's slice of a shared batch.

    Results are returned on the CPU; the input dtype is float64 unless the scenario names a
    low-precision one (the module then stays float32, as in mixed precision).
    """
    sizes = scenario["sizes"]
    start = sum(sizes[:rank])
    in_dtype = getattr(torch, scenario.get("dtype", "float64"))
    module_dtype = torch.float64 if in_dtype == torch.float64 else torch.float32
    m = normkit.SyncBatchNorm(scenario["channels"], momentum=scenario["momentum"],
                              dtype=module_dtype, device=device)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, scenario["channels"]))
        m.bias.copy_(torch.linspace(-1, 1, scenario["channels"]))
    counter = {"all_gather": 0, "all_reduce": 0}
    real_gather, real_reduce = dist.all_gather, dist.all_reduce
    dist.all_gather = _counting(real_gather, counter, "all_gather")
    dist.all_reduce = _counting(real_reduce, counter, "all_reduce")
    steps = []
    try:
        for x_full, dy_full in _full_batches(scenario, scenario["steps"]):
            x = x_full[start : start + sizes[rank]].to(device=device, dtype=in_dtype)
            if scenario.get("channels_last"):
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            m.zero_grad()
            before = dict(counter)
            y = m(x)
            forward_counts = {k: counter[k] - before[k] for k in counter}
            y.backward(dy_full[start : start + sizes[rank]].to(device=device, dtype=in_dtype))
            backward_counts = {k: counter[k] - before[k] - forward_counts[k] for k in counter}
            steps.append({
                "y": y.detach().cpu().clone(), "dx": x.grad.cpu().clone(),
                "dw": m.weight.grad.cpu().clone(), "db": m.bias.grad.cpu().clone(),
                "rm": m.running_mean.cpu().clone(), "rv": m.running_var.cpu().clone(),
                "nbt": int(m.num_batches_tracked),
                "forward": forward_counts, "backward": backward_counts,
                "channels_last": y.is_contiguous(memory_format=torch.channels_last),
                "contiguous": y.is_contiguous(),
            })
    finally:
        dist.all_gather, dist.all_reduce = real_gather, real_reduce
    return {"steps": steps}


def run_channel_mismatch(rank: int) -> dict:
    """Ranks feed different channel counts: every rank must raise, none may hang."""
    m = normkit.SyncBatchNorm(4, affine=False, track_running_stats=False)
    x = torch.randn(3, 4 if rank == 0 else 5, 2)
    try:
        m(x)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def run_ddp(rank: int, world: int, config: dict) -> dict:
    """A few SGD steps of a small conv net with SyncBatchNorm under DDP."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = build_ddp_model(normkit)
    # DDP refuses any torch.nn.SyncBatchNorm subclass on CPU at construction, so wrap first
    # and convert in place after: the new layers share the Parameters DDP already tracks.
    ddp = DistributedDataParallel(model)
    normkit.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    per_rank = config["batch"] // world
    for x, target in ddp_batches(config):
        opt.zero_grad()
        out = ddp(x[rank * per_rank : (rank + 1) * per_rank])
        loss = torch.nn.functional.mse_loss(out, target[rank * per_rank : (rank + 1) * per_rank])
        loss.backward()
        opt.step()
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}}


def build_ddp_model(lib) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), lib.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4),
    ).double()


def ddp_batches(config):
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(config["batch"], 3, 6, 6, generator=gen, dtype=torch.float64),
         torch.randn(config["batch"], 4, generator=gen, dtype=torch.float64))
        for _ in range(config["steps"])
    ]


def worker(rank: int, world: int, init_file: str, out_dir: str, jobs: list,
           backend: str = "gloo") -> None:
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    results = []
    for kind, config in jobs:
        if kind == "scenario":
            results.append(run_scenario(rank, config, device))
        elif kind == "mismatch":
            results.append(run_channel_mismatch(rank))
        elif kind == "ddp":
            results.append(run_ddp(rank, world, config))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
