"""BatchNorm1d/2d/3d and SyncBatchNorm (single process) against torch, live, step by step."""

import itertools

import pytest
import torch

from parity import float64_oracle, make_pair, run_steps

pytestmark = pytest.mark.usefixtures("backend")

SHAPES = {
    "BatchNorm1d": [(6, 4), (5, 4, 7)],
    "BatchNorm2d": [(4, 3, 5, 6)],
    "BatchNorm3d": [(3, 2, 3, 4, 5)],
    "SyncBatchNorm": [(4, 3, 5), (4, 3, 5, 6)],
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
MOMENTA = [0.1, None, 0.0, 1.0]
FLAGS = [  # (affine, track_running_stats, bias)
    (True, True, True),
    (False, True, True),
    (True, False, True),
    (True, True, False),
    (False, False, True),
]


def _cases():
    for cls_name, shapes in SHAPES.items():
        for shape, dtype in itertools.product(shapes, DTYPES):
            for i, momentum in enumerate(MOMENTA):
                flags = FLAGS[(i + len(shape)) % len(FLAGS)]
                yield cls_name, shape, dtype, momentum, flags
        for shape, flags in itertools.product(shapes, FLAGS):
            yield cls_name, shape, torch.float32, 0.1, flags


def _inputs(shape, dtype, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for i, mode in enumerate(["train", "train", "eval", "train", "eval"]):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + i) + 3 * i).to(dtype)
        if channels_last and len(shape) == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if channels_last and len(shape) == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        steps.append((mode, x))
    return steps


@pytest.mark.parametrize("cls_name,shape,dtype,momentum,flags", list(_cases()))
def test_batchnorm_matches_torch(cls_name, shape, dtype, momentum, flags):
    affine, trs, bias = flags
    module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    t, n = make_pair(cls_name, shape[1], momentum=momentum, affine=affine,
                     track_running_stats=trs, bias=bias, dtype=module_dtype)
    oracle = float64_oracle(t) if dtype in (torch.float16, torch.bfloat16) else None
    run_steps(t, n, _inputs(shape, dtype), oracle)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 3, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_channels_last_kept(shape, dtype):
    cls_name = f"BatchNorm{len(shape) - 2}d"
    module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    t, n = make_pair(cls_name, shape[1], dtype=module_dtype)
    oracle = float64_oracle(t) if dtype == torch.bfloat16 else None
    run_steps(t, n, _inputs(shape, dtype, channels_last=True), oracle)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_module(dtype):
    """A module converted with .half()/.to(bfloat16): params and stats in low precision."""
    t, n = make_pair("BatchNorm2d", 3)
    t, n = t.to(dtype), n.to(dtype)
    run_steps(t, n, _inputs((4, 3, 5, 6), dtype), float64_oracle(t))


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_and_seeds(seed):
    gen = torch.Generator().manual_seed(seed)
    rank = int(torch.randint(2, 6, (1,), generator=gen))
    shape = tuple(int(s) for s in torch.randint(1, 6, (rank,), generator=gen))
    shape = (shape[0] + 1,) + shape[1:]
    cls_name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[rank]
    t, n = make_pair(cls_name, shape[1], seed=seed)
    run_steps(t, n, _inputs(shape, torch.float32, seed=seed))


@pytest.mark.parametrize(
    "make_input",
    [
        lambda: torch.randn(4, 6, 5, 3).permute(0, 3, 1, 2),  # permuted, not channels_last
        lambda: torch.randn(6, 5).t(),  # transposed BatchNorm1d input
        lambda: torch.randn(4, 3, 10)[:, :, ::2],  # sliced
        lambda: torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)[:, :, 1:5],
        lambda: torch.randn(1, 3, 5, 5).expand(4, 3, 5, 5),  # expanded (stride 0)
    ],
)
def test_non_contiguous_inputs(make_input):
    x = make_input()
    cls_name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}[x.dim()]
    t, n = make_pair(cls_name, x.shape[1])
    run_steps(t, n, [("train", x), ("eval", x), ("train", x * 2)])


@pytest.mark.parametrize(
    "shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2), (2, 3, 0, 0), (0, 3, 1, 2, 2)]
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_zero_sized_batches(shape, momentum):
    cls_name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    t, n = make_pair(cls_name, 3, momentum=momentum)
    x = torch.randn(shape)
    run_steps(t, n, [("train", x), ("eval", x), ("train", x)])


def test_track_running_stats_toggled_after_construction():
    t, n = make_pair("BatchNorm2d", 3)
    for m in (t, n):
        m.track_running_stats = False
    x = torch.randn(4, 3, 5, 5)
    run_steps(t, n, [("train", x), ("eval", x), ("train", x + 1)])


def test_running_buffers_set_to_none_use_batch_stats_in_eval():
    t, n = make_pair("BatchNorm2d", 3)
    for m in (t, n):
        m.running_mean = None
        m.running_var = None
    x = torch.randn(4, 3, 5, 5)
    run_steps(t, n, [("eval", x), ("train", x)])


def test_large_mean_small_std_is_stable():
    """Data with mean 1e4 and std 1e-2: the variance keeps fp32 accuracy (no E[x²]-E[x]²)
    and the output is as close to a float64 computation as torch's own."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 4, 8, 8, generator=gen, dtype=torch.float64) * 1e-2 + 1e4).float()
    t, n = make_pair("BatchNorm2d", 4, momentum=1.0)
    oracle = float64_oracle(t)
    y_t, y_n, y_o = t(x), n(x), oracle(x.double())
    err_t = (y_t.double() - y_o).abs().max()
    err_n = (y_n.double() - y_o).abs().max()
    assert err_n <= 1.5 * err_t + 1e-6, (err_n, err_t)
    assert torch.allclose(n.running_var.double(), oracle.running_var, rtol=1e-3, atol=0)


def test_momentum_none_is_cumulative_average_from_loaded_counter():
    t, n = make_pair("BatchNorm1d", 2, momentum=None)
    for m in (t, n):
        m.num_batches_tracked.fill_(9)
    gen = torch.Generator().manual_seed(3)
    steps = [("train", torch.randn(5, 2, generator=gen) * 2 + i) for i in range(3)]
    run_steps(t, n, steps)
