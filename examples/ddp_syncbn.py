"""Train a small CNN with DistributedDataParallel + normkit.SyncBatchNorm.

CPU (gloo), two processes on this machine:

    python examples/ddp_syncbn.py --world-size 2

GPU (NCCL), one process per GPU:

    python examples/ddp_syncbn.py --world-size 2 --device cuda

Each rank sees its own half of every batch; SyncBatchNorm normalizes with the statistics of the
whole batch, so training matches single-process training on the full batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import normkit


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def run(rank: int, world_size: int, init_file: str, device_type: str, steps: int) -> None:
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    device = torch.device(device_type, rank % max(torch.cuda.device_count(), 1)) \
        if device_type == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    model = build_model().to(device)
    if device_type == "cpu":
        # DDP refuses torch.nn.SyncBatchNorm subclasses in CPU models at construction:
        # wrap first, then convert in place (the new layers share DDP's Parameters).
        ddp = DistributedDataParallel(model)
        normkit.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = normkit.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = DistributedDataParallel(model, device_ids=[device.index])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        images = torch.randn(32, 1, 16, 16, generator=gen)
        labels = torch.randint(0, 10, (32,), generator=gen)
        mine = slice(rank * 32 // world_size, (rank + 1) * 32 // world_size)
        loss = nn.functional.cross_entropy(ddp(images[mine].to(device)), labels[mine].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    if rank == 0:
        print("running_mean of the first SyncBatchNorm:", model[1].running_mean[:4].tolist())
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    init_file = os.path.join(tempfile.mkdtemp(), "init")
    mp.spawn(run, args=(args.world_size, init_file, args.device, args.steps),
             nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
