"""The Triton backend (normkit.backends.gpu) against torch, the reference backend and itself.

Without CUDA, conftest sets TRITON_INTERPRET=1 and the kernels run in Triton's CPU interpreter
on CPU tensors (slow, hence small shapes); with CUDA they run on the device. Every test forces
the backend, and the `launches` fixture proves the kernels ran instead of a silent fallback.
"""

from __future__ import annotations

import collections
import inspect

import pytest
import torch
from parity import float64_oracle, make_pair, run_steps
from torch.autograd import gradcheck, gradgradcheck

import normkit
from normkit.backends import gpu, gpu_launch, reference
from normkit.backends.plan import plan_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL, CL3 = torch.channels_last, torch.channels_last_3d
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@pytest.fixture(autouse=True)
def _triton_backend():
    with normkit.use_backend("triton"):
        yield


@pytest.fixture
def launches(monkeypatch):
    """Counts of gpu_launch.forward / backward calls during the test."""
    counts = collections.Counter()
    for fn_name in ("forward", "backward", "update_running_stats"):
        original = getattr(gpu_launch, fn_name)

        def counted(*args, _original=original, _name=fn_name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(gpu_launch, fn_name, counted)
    return counts


def _steps(shape, dtype, fmt=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for i, mode in enumerate(["train", "train", "eval", "train", "eval"]):
        x = (torch.randn(shape, generator=gen, dtype=F64) * (1 + i) + 3 * i).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        steps.append((mode, x.to(DEVICE)))
    return steps


LAYER_CASES = [  # (class, constructor args, constructor kwargs, input shape, dtype, layout)
    ("BatchNorm1d", (4,), {}, (6, 4), F32, None),
    ("BatchNorm1d", (4,), {"momentum": None}, (5, 4, 7), F64, None),
    ("BatchNorm1d", (4,), {"bias": False}, (5, 4, 7), BF16, None),
    ("BatchNorm2d", (3,), {}, (4, 3, 5, 6), F32, None),
    ("BatchNorm2d", (3,), {}, (4, 3, 5, 6), F32, CL),
    ("BatchNorm2d", (3,), {}, (4, 3, 5, 6), F16, CL),
    ("BatchNorm2d", (3,), {"affine": False, "momentum": None}, (4, 3, 5, 6), BF16, None),
    ("BatchNorm2d", (3,), {"track_running_stats": False, "momentum": 1.0}, (4, 3, 5, 6), F64, CL),
    ("BatchNorm3d", (2,), {"affine": False, "track_running_stats": False}, (3, 2, 3, 4, 5), F32,
     None),
    ("BatchNorm3d", (2,), {"momentum": 0.0}, (3, 2, 3, 4, 5), F16, CL3),
    ("SyncBatchNorm", (3,), {}, (4, 3, 5), F32, None),
    ("InstanceNorm1d", (4,), {"affine": True, "track_running_stats": True}, (3, 4, 7), F32, None),
    ("InstanceNorm2d", (3,), {"affine": True}, (2, 3, 4, 5), F64, None),
    ("InstanceNorm2d", (3,), {"affine": True, "track_running_stats": True}, (2, 3, 4, 5), F32,
     CL),
    ("InstanceNorm2d", (3,), {"track_running_stats": True, "momentum": None}, (3, 4, 5), F32,
     None),
    ("InstanceNorm3d", (2,), {"track_running_stats": True}, (2, 2, 3, 4, 3), BF16, None),
    ("GroupNorm", (1, 4), {}, (3, 4), F32, None),
    ("GroupNorm", (2, 4), {}, (3, 4, 5), F32, None),
    ("GroupNorm", (4, 4), {}, (2, 4, 3, 3), F16, None),
    ("GroupNorm", (3, 6), {"affine": False}, (2, 6, 2, 3, 2), F64, None),
    ("GroupNorm", (2, 6), {}, (2, 6, 3, 3), F32, CL),
    ("GroupNorm", (3, 6), {}, (2, 6, 3, 3), BF16, CL),
    ("GroupNorm", (3, 6), {}, (2, 6, 2, 3, 2), F32, CL3),
    ("LayerNorm", ((5,),), {}, (3, 4, 5), F32, None),
    ("LayerNorm", ((4, 5),), {}, (3, 4, 5), F64, None),
    ("LayerNorm", ((3, 4),), {"elementwise_affine": False}, (2, 3, 4), F32, None),
    ("LayerNorm", ((4,),), {"bias": False}, (2, 3, 4), F16, None),
    ("LayerNorm", ((8,),), {}, (4, 8), BF16, None),
]


@pytest.mark.parametrize("cls_name,args,kwargs,shape,dtype,fmt", LAYER_CASES,
                         ids=lambda v: str(v).replace(" ", ""))
def test_layers_match_torch(launches, cls_name, args, kwargs, shape, dtype, fmt):
    if "bias" in kwargs and "bias" not in inspect.signature(getattr(torch.nn, cls_name)).parameters:
        pytest.skip(f"torch {torch.__version__}'s {cls_name} takes no bias argument")
    module_dtype = F64 if dtype == F64 else F32
    if DEVICE == "cuda" and dtype in (F16, BF16) and cls_name in ("GroupNorm", "LayerNorm"):
        module_dtype = dtype  # torch's CUDA kernels want these parameters in the input's dtype
    t, n = make_pair(cls_name, *args, dtype=module_dtype, **kwargs)
    t, n = t.to(DEVICE), n.to(DEVICE)
    oracle = float64_oracle(t) if dtype in (F16, BF16) else None
    run_steps(t, n, _steps(shape, dtype, fmt), oracle)
    assert launches["forward"] >= 5 and launches["backward"] >= 5
    if "BatchNorm" in cls_name:  # running statistics move inside the statistics kernels
        assert launches["update_running_stats"] == 0
    elif kwargs.get("track_running_stats"):  # InstanceNorm: batch-averaged, a kernel of its own
        assert launches["update_running_stats"] > 0


def _normalize_case(kind):
    """(x, weight, bias, dims, shape) for one plan family, float64."""
    gen = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    if kind == "mid":  # BatchNorm NCHW
        return rand(5, 3, 4, 6), rand(3), rand(3), (0, 2, 3), (3, 1, 1)
    if kind == "cols":  # BatchNorm channels_last
        x = rand(5, 3, 4, 6).contiguous(memory_format=CL)
        return x, rand(3), rand(3), (0, 2, 3), (3, 1, 1)
    if kind == "mid-grouped":  # GroupNorm NCHW: 4 channels per group
        return rand(3, 2, 4, 5, 3), rand(8), rand(8), (2, 3, 4), (1, 2, 4, 1, 1)
    if kind == "nsc":  # GroupNorm channels_last
        x = rand(3, 8, 5, 3).contiguous(memory_format=CL).unflatten(1, (2, 4))
        return x, rand(8), rand(8), (2, 3, 4), (1, 2, 4, 1, 1)
    return rand(10, 7), rand(7), rand(7), (1,), None  # rows: LayerNorm


KINDS = ["mid", "cols", "mid-grouped", "nsc", "rows"]
# (plan family, path): small 'mid' items are normalized whole by one program each ("item");
# ITEM_MAX_BYTES = 0 sends them through the split reductions instead.
PATHS = [("mid", "item"), ("mid", "split"), ("cols", "split"), ("mid-grouped", "item"),
         ("mid-grouped", "split"), ("nsc", "split"), ("rows", "item")]


def _case_on_path(monkeypatch, kind, path):
    """_normalize_case(kind), with the launch path forced and checked."""
    if path == "split":
        monkeypatch.setattr(gpu_launch, "ITEM_MAX_BYTES", 0)
    case = _normalize_case(kind)
    x, dims, shape = case[0], case[3], case[4] or tuple(case[0].shape[-1:])
    plan = plan_for(x, dims, (1,) * (x.dim() - len(shape)) + tuple(shape))
    whole = gpu_launch._item_tile(gpu_launch.geometry(plan), x.element_size()) is not None
    assert whole == (path == "item" and kind != "rows"), (kind, path)
    return case


def _against_reference(x, weight, bias, dims, shape, mean=None, var=None, tol=1e-12):
    """normalize + backward through the kernels and through the reference, compared."""
    results = []
    for backend in (gpu, reference):
        leaves = [None if t is None else t.detach().clone().to(DEVICE).requires_grad_()
                  for t in (x, weight, bias)]
        given = [None if t is None else t.to(DEVICE) for t in (mean, var)]
        y, m, v = backend.normalize(*leaves, dims, 1e-5, *given, shape, with_stats=True)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
        y.backward(dy.to(DEVICE))
        results.append([y, m, v] + [None if t is None else t.grad for t in leaves])
    names = ["y", "mean", "var", "dx", "dweight", "dbias"]
    for name, a, e in zip(names, *results):
        if name in ("mean", "var") and mean is not None:
            continue  # given statistics are passed through (the reference keeps their view)
        if e is None:
            assert a is None, name
            continue
        a, e = a.detach(), e.detach()
        scale = max(1.0, float(e.abs().max()))
        err = float((a.double() - e.double()).abs().max())
        assert err <= tol * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"
        if name in ("y", "dx"):
            assert a.stride() == x.stride(), f"{name}: strides {a.stride()} vs {x.stride()}"
    return results[0]


@pytest.mark.parametrize("kind", KINDS)
def test_split_reductions_merge_exactly(monkeypatch, kind):
    """Tiny split sizes force many (sub, split) partials, merges and row programs."""
    monkeypatch.setattr(gpu_launch, "ITEM_MAX_BYTES", 0)
    monkeypatch.setattr(gpu_launch, "SPLIT_ELEMENTS", 8)
    monkeypatch.setattr(gpu_launch, "REDUCE_BLOCK", 8)
    monkeypatch.setattr(gpu_launch, "COLS_TILE", 8)
    monkeypatch.setattr(gpu_launch, "ROWS_PROGRAMS", 3)
    x, weight, bias, dims, shape = _normalize_case(kind)
    if kind != "rows":
        param_shape = (1,) * (x.dim() - len(shape)) + shape
        geo = gpu_launch.geometry(plan_for(x, dims, param_shape))
        assert gpu_launch._splits(geo).count > 1
    _against_reference(x, weight, bias, dims, shape)


@pytest.mark.parametrize("kind", ["mid", "mid-grouped"])
@pytest.mark.parametrize("programs", ["one", "some"])
def test_whole_item_kernels_loop_over_blocks_and_items(monkeypatch, kind, programs):
    """mid_item_* with blocks smaller than an item (loops over a, j and s) and fewer programs
    than items (each program takes several items, in a grid-stride loop)."""
    monkeypatch.setattr(gpu_launch, "ITEM_TILE", 4)
    x, weight, bias, dims, shape = _normalize_case(kind)
    param_shape = (1,) * (x.dim() - len(shape)) + shape
    geo = gpu_launch.geometry(plan_for(x, dims, param_shape))
    item_bytes = geo.count * x.element_size()
    monkeypatch.setattr(gpu_launch, "ITEM_L2_BYTES", item_bytes if programs == "one" else
                        2 * item_bytes)
    tile = gpu_launch._item_tile(geo, x.element_size())
    assert tile is not None and tile[0] * tile[1] * tile[2] <= 4
    assert gpu_launch._item_programs(geo, x.element_size()) == (1 if programs == "one" else 2)
    assert geo.items > 2
    _against_reference(x, weight, bias, dims, shape)


@pytest.mark.parametrize("kind,path", PATHS)
def test_int64_indexing_path(monkeypatch, kind, path):
    """The 64-bit offset variants (used above 2^31 elements) compute the same results."""
    monkeypatch.setattr(gpu_launch, "INT32_LIMIT", 0)
    x, weight, bias, dims, shape = _case_on_path(monkeypatch, kind, path)
    _against_reference(x, weight, bias, dims, shape)


@pytest.mark.parametrize("kind,path", PATHS)
def test_without_affine(monkeypatch, kind, path):
    x, _, _, dims, shape = _case_on_path(monkeypatch, kind, path)
    _against_reference(x, None, None, dims, shape)


@pytest.mark.parametrize("kind", ["mid", "cols"])
def test_given_statistics(kind):
    """Eval-mode BatchNorm (running statistics) forward and backward."""
    x, weight, bias, dims, shape = _normalize_case(kind)
    mean, var = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5
    _against_reference(x, weight, bias, dims, shape, mean, var)


@pytest.mark.parametrize("kind,path", PATHS)
def test_large_mean_small_spread_keeps_precision(monkeypatch, kind, path):
    """float32 data of mean 1e4 and std 1e-2: the shifted statistics keep y accurate (a float32
    mean alone would be off by up to 5e-4, i.e. 0.05 standard deviations)."""
    x, weight, bias, dims, shape = _case_on_path(monkeypatch, kind, path)
    x = (1e4 + 1e-2 * x).float()
    y = _against_reference(x, weight.float(), bias.float(), dims, shape, tol=2e-5)[0]
    assert y.dtype == F32


@pytest.mark.parametrize("kind,path", PATHS)
def test_results_are_bitwise_reproducible(monkeypatch, kind, path):
    x, weight, bias, dims, shape = _case_on_path(monkeypatch, kind, path)
    x = x.float().contiguous(memory_format=CL) if kind == "cols" else x.float()
    first = _against_reference(x, weight.float(), bias.float(), dims, shape, tol=1e-5)
    second = _against_reference(x, weight.float(), bias.float(), dims, shape, tol=1e-5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls_name,args,shape", [
    ("BatchNorm2d", (2,), (3, 2, 2, 1)),
    ("GroupNorm", (2, 4), (2, 4, 2)),
    ("LayerNorm", ((3,),), (2, 3)),
])
def test_gradcheck_and_double_backward(launches, cls_name, args, shape):
    layer = getattr(normkit, cls_name)(*args, dtype=F64, device=DEVICE)
    x = torch.randn(shape, dtype=F64, device=DEVICE, requires_grad=True)
    assert gradcheck(layer, (x,), fast_mode=True)
    assert gradgradcheck(layer, (x,), fast_mode=True)
    assert launches["backward"] > 0  # first-order grads came from the kernels


def test_running_statistics_update_matches_reference():
    """The running-stat kernel (lerp as torch computes it) for momenta below, at and above 0.5."""
    for momentum in (0.1, 0.5, 0.9):
        base = torch.randn(2, 5, dtype=F32, device=DEVICE)
        mean, var = torch.randn(5, device=DEVICE), torch.rand(5, device=DEVICE)
        ours, theirs = base.clone(), base.clone()
        gpu.update_running_stats(ours[0], ours[1], mean, var, 7, momentum)
        reference.update_running_stats(theirs[0], theirs[1], mean.double(), var.double(), 7,
                                        momentum)
        torch.testing.assert_close(ours, theirs, rtol=2e-7, atol=1e-7)


def test_rows_longer_than_max_row_use_the_reference(monkeypatch, launches):
    monkeypatch.setattr(gpu_launch, "MAX_ROW", 4)
    x, w = torch.randn(3, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    y = normkit.functional.layer_norm(x, (8,), w)
    assert launches["forward"] == 0
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,), w))


@pytest.mark.needs_cuda
def test_cuda_tensors_use_triton_automatically(launches):
    with normkit.use_backend(None):
        assert normkit.backends.backend_for(torch.empty(1, device="cuda")) is gpu
        layer, ref = normkit.BatchNorm2d(64).cuda(), torch.nn.BatchNorm2d(64).cuda()
        x = torch.randn(32, 64, 56, 56, device="cuda").contiguous(memory_format=CL)
        for dtype in (F32, BF16):
            xs = [x.to(dtype).requires_grad_() for _ in range(2)]
            ys = [m(xi) for m, xi in zip((layer, ref), xs)]
            for y in ys:
                y.float().square().sum().backward()
            torch.testing.assert_close(ys[0], ys[1], rtol=2e-2 if dtype == BF16 else 1e-4,
                                       atol=2e-2 if dtype == BF16 else 1e-4)
            torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(layer.running_var, ref.running_var)
    assert launches["forward"] == 2 and launches["backward"] == 2


def test_torch_compile_fullgraph_matches_eager(launches):
    """A model compiles with fullgraph=True and matches eager: on CUDA the graph calls the
    kernels as triton_op operators (aot_eager runs their Python bodies: launches counted); the
    interpreter's kernels cannot be traced, so on CPU the graph holds the reference ops."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(normkit.BatchNorm2d(3), normkit.GroupNorm(1, 3)).to(DEVICE)
    twin = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.GroupNorm(1, 3)).to(DEVICE)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), twin(x))
    torch.testing.assert_close(model[0].running_var, twin[0].running_var)
    assert (launches["forward"] > 0) == (DEVICE == "cuda")


@pytest.mark.parametrize("case", ["subs>64", "mid splits>64", "cols splits>64"])
def test_block_loops_over_many_subs_and_splits(monkeypatch, case):
    """Items of more than 64 subs and subs of more than 64 splits make the coefficient
    kernels loop over their BLOCK_J / BLOCK_S tiles."""
    for name, value in (("ITEM_MAX_BYTES", 0), ("SPLIT_ELEMENTS", 2), ("REDUCE_BLOCK", 2),
                        ("COLS_TILE", 4)):
        monkeypatch.setattr(gpu_launch, name, value)
    gen = torch.Generator().manual_seed(11)
    if case == "subs>64":  # GroupNorm, one group of 66 channels
        x, params, dims, shape = torch.randn(2, 1, 66, 3, generator=gen, dtype=F64), 66, \
            (2, 3), (1, 1, 66, 1)
    elif case == "mid splits>64":  # BatchNorm1d over 140 positions, 70 splits
        x, params, dims, shape = torch.randn(1, 2, 140, generator=gen, dtype=F64), 2, (0, 2), \
            (2, 1)
    else:  # channels_last BatchNorm over 140 rows, one split each
        x = torch.randn(1, 3, 10, 14, generator=gen, dtype=F64).contiguous(memory_format=CL)
        params, dims, shape = 3, (0, 2, 3), (3, 1, 1)
    plan = plan_for(x, dims, (1,) * (x.dim() - len(shape)) + shape)
    geo = gpu_launch.geometry(plan)
    assert geo.J > 64 or gpu_launch._splits(geo).count > 64
    weight = torch.randn(params, generator=gen, dtype=F64)
    bias = torch.randn(params, generator=gen, dtype=F64)
    _against_reference(x, weight, bias, dims, shape)
