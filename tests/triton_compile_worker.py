"""Compile every Triton kernel launch the GPU backend makes, for a CUDA target, without a GPU.

Run as a script (without TRITON_INTERPRET): the kernels are replaced by recorders, the launchers
are called on CPU tensors for every plan family, dtype and mode (nothing executes), and each
distinct (kernel, argument types, constexprs, warps) is compiled to PTX and cubin with the
ptxas shipped in the triton wheel. Prints one JSON line: the number compiled and any failures.
"""

from __future__ import annotations

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from normkit.backends import gpu_kernels, gpu_launch
from normkit.backends.plan import plan_for

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.float64: "fp64"}


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    return "fp32"


class Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def record(*args, num_warps=4, **constexprs):
            types = tuple(_type(a) for a in args)
            self.launches.add((self.fn.__name__, types, tuple(sorted(constexprs.items())),
                               num_warps))
        return record


def _cases():
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen)
    cl = torch.channels_last
    yield rand(4, 3, 5, 6), (0, 2, 3), (3, 1, 1)  # mid: BatchNorm NCHW
    yield rand(4, 3, 5, 6).contiguous(memory_format=cl), (0, 2, 3), (3, 1, 1)  # cols
    yield rand(2, 2, 3, 5, 4), (2, 3, 4), (1, 2, 3, 1, 1)  # mid, grouped: GroupNorm
    yield (rand(2, 6, 5, 4).contiguous(memory_format=cl).unflatten(1, (2, 3)), (2, 3, 4),
           (1, 2, 3, 1, 1))  # nsc: GroupNorm channels_last
    yield rand(6, 8), (1,), None  # rows: LayerNorm


def record_launches() -> set:
    launches: set = set()
    for name in dir(gpu_kernels):
        obj = getattr(gpu_kernels, name)
        if isinstance(obj, triton.runtime.jit.JITFunction) and not name.startswith("_"):
            setattr(gpu_kernels, name, Recorder(obj, launches))
    for int64, item_max in ((False, 1 << 20), (True, 1 << 20), (False, 0), (True, 0)):
        gpu_launch.INT32_LIMIT = 0 if int64 else 2**31 - 1
        gpu_launch.ITEM_MAX_BYTES = item_max
        for x, dims, shape in _cases():
            for dtype in TYPES:
                xd = x.to(dtype)
                shape = shape or tuple(x.shape[-1:])
                plan = plan_for(xd, dims, (1,) * (x.dim() - len(shape)) + shape)
                pdtype = torch.float64 if dtype == torch.float64 else torch.float32
                w = torch.ones(plan.weight_shape, dtype=pdtype).flatten()
                given = [(None, None)]
                if plan.kind in ("mid", "cols") and plan.J == 1:
                    given.append((torch.zeros(plan.items, dtype=pdtype),
                                  torch.ones(plan.items, dtype=pdtype)))
                for mean, var in given:
                    for weight in (w, None):
                        _, stats, coef = gpu_launch.forward(plan, xd, weight, weight, 1e-5, mean,
                                                            var)
                        for need_dx in (True, False):
                            gpu_launch.backward(plan, xd, xd, weight, stats, coef, need_dx)
                if len(given) > 1:  # BatchNorm: the running-statistics update in the kernels
                    running = (torch.zeros(plan.items, dtype=pdtype),
                               torch.ones(plan.items, dtype=pdtype), 0.1)
                    gpu_launch.forward(plan, xd, w, w, 1e-5, None, None, running)
    for dtype in (torch.float32, torch.float16, torch.float64):
        buffers = torch.zeros(2, 3, dtype=dtype)
        stats = torch.zeros(2, 3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        gpu_launch.update_running_stats(buffers[0], buffers[1], stats[0], stats[1], 1.5, 0.1)
    return launches


def compile_all(launches: set, capability: int) -> list[str]:
    target = GPUTarget("cuda", capability, 32)
    failures = []
    for name, types, constexprs, num_warps in sorted(launches):
        fn = getattr(gpu_kernels, name).fn
        constants = dict(constexprs)
        runtime_args = [a for a in fn.arg_names if a not in constants]
        signature = dict(zip(runtime_args, types))
        signature.update({a: "constexpr" for a in constants})
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs=constants),
                                      target=target, options={"num_warps": num_warps})
            assert compiled.asm.get("cubin"), "no cubin"
        except Exception as exc:  # noqa: BLE001 - reported to the test
            failures.append(f"{name} {types} {constants}: {type(exc).__name__}: {exc}"[:2000])
    return failures


if __name__ == "__main__":
    capability = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    launches = record_launches()
    failures = compile_all(launches, capability)
    print(json.dumps({"compiled": len(launches) - len(failures), "failures": failures}))
