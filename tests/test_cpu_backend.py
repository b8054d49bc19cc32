"""The numba CPU backend: it really runs, agrees with the reference, and is deterministic."""

import threading

import numpy as np
import pytest
import torch

import normkit
import normkit.functional as nF
from normkit.backends import backend_for, cpu, cpu_kernels, reference
from normkit.backends import plan as plan_module
from normkit.backends.plan import plan_for

from sixteen_bit import assert_rounded_within_one_unit, units_apart


def _kernel_ran(y: torch.Tensor) -> bool:
    """Whether the numba Function is among the last few nodes of y's autograd graph."""
    node, depth = y.grad_fn, 0
    while node is not None and depth < 4:
        if "CpuNormalize" in type(node).__name__:
            return True
        node = node.next_functions[0][0] if node.next_functions else None
        depth += 1
    return False


CALLS = {
    "bn_nchw": lambda x, w, b: nF.batch_norm(x, None, None, w, b, True),
    "bn_eval": lambda x, w, b: nF.batch_norm(
        x, torch.linspace(-1, 1, x.shape[1], dtype=x.dtype),
        torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype), w, b, False),
    "in": lambda x, w, b: nF.instance_norm(x, weight=w, bias=b),
    "in_eval": lambda x, w, b: nF.instance_norm(
        x, torch.linspace(-1, 1, x.shape[1], dtype=x.dtype),
        torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype), w, b, use_input_stats=False),
    "gn": lambda x, w, b: nF.group_norm(x, 2, w, b),
    "ln": lambda x, w, b: nF.layer_norm(
        x, x.shape[-2:], None if w is None else torch.ones(x.shape[-2:], dtype=x.dtype) * 1.5,
        b if b is None else torch.zeros(x.shape[-2:], dtype=x.dtype) + 0.25),
}
LAYOUTS = {
    "2d": lambda: torch.randn(7, 4),
    "3d": lambda: torch.randn(5, 4, 9),
    "4d": lambda: torch.randn(3, 4, 5, 6),
    "4d_cl": lambda: torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last),
    "5d_cl": lambda: torch.randn(2, 4, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d),
}


@pytest.mark.parametrize(
    "call,layout",
    # instance norm needs a spatial dim: (N, C) has nothing to normalize over
    [(c, lay) for c in CALLS for lay in LAYOUTS if not (c.startswith("in") and lay == "2d")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_kernels_match_reference(call, layout, dtype, affine):
    x0 = LAYOUTS[layout]().to(dtype) * 3 + 1
    c = x0.shape[1]
    w0 = torch.linspace(0.5, 1.5, c, dtype=dtype) if affine else None
    b0 = torch.linspace(-1, 1, c, dtype=dtype) if affine else None
    outs = []
    for name in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        w = None if w0 is None else w0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        with normkit.use_backend(name):
            y = CALLS[call](x, w, b)
        if name == "cpu":
            assert _kernel_ran(y), f"{call} on {layout} fell back to the reference"
        y.backward(torch.cos(torch.arange(y.numel(), dtype=dtype)).view_as(y))
        outs.append((y, x.grad, None if w is None else w.grad, None if b is None else b.grad))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, r in zip(*outs):
        if r is not None:
            torch.testing.assert_close(a, r, rtol=tol, atol=tol)
    assert outs[0][0].stride() == outs[1][0].stride()
    assert outs[0][1].stride() == x0.stride()


def test_auto_backend_is_cpu_for_float_cpu_tensors():
    assert backend_for(torch.randn(2, 3)) is cpu
    with normkit.use_backend("reference"):
        assert backend_for(torch.randn(2, 3)) is reference
    y = normkit.BatchNorm2d(3)(torch.randn(4, 3, 2, 2))
    assert _kernel_ran(y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("params", ["float32", "low"])
def test_low_precision_matches_the_float32_kernels(dtype, layout, params):
    """float16 / bfloat16 input: y and dx the float32 kernels' results rounded to the dtype
    (within one unit, see assert_rounded_within_one_unit), the parameters' grads rounded to
    theirs; layout kept."""
    gen = torch.Generator().manual_seed(0)
    x0, dy = (torch.randn(6, 5, 4, 3, generator=gen).to(dtype).contiguous(memory_format=layout)
              for _ in range(2))
    results = []
    for low in (True, False):
        m = normkit.BatchNorm2d(5)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        if params == "low":
            m.to(dtype)
        if not low:
            m.float()
        x = (x0 if low else x0.float()).detach().requires_grad_()
        y = m(x)
        assert _kernel_ran(y)
        y.backward(dy if low else dy.float())
        results.append((y, x.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var))
    (y, dx, dw, db, mean, var), (y32, dx32, dw32, db32, mean32, var32) = results
    assert y.dtype == dx.dtype == dtype and y.stride() == x0.stride() == dx.stride()
    assert_rounded_within_one_unit(y, y32)
    assert_rounded_within_one_unit(dx, dx32)
    param_dtype = dtype if params == "low" else torch.float32
    assert dw.dtype == db.dtype == mean.dtype == param_dtype
    assert torch.equal(dw, dw32.to(param_dtype)) and torch.equal(db, db32.to(param_dtype))
    with torch.no_grad():
        y_nograd = normkit.BatchNorm2d(5).to(param_dtype)(x0)
    assert y_nograd.dtype == dtype and y_nograd.stride() == x0.stride()


@pytest.mark.parametrize(
    "shape,dims,param,kind",
    [
        ((8, 3, 4, 4), (0, 2, 3), (1, 3, 1, 1), "mid"),
        ((8, 3), (0,), (1, 3), "cols"),
        ((8, 3, 4), (2,), (1, 3, 1), "mid"),
        ((8, 2, 3, 4), (2, 3), (1, 2, 3, 1), "mid"),
        ((8, 16), (1,), (1, 16), "rows"),
        ((8, 3, 4), (2,), None, "mid"),
        ((8, 3, 4), (1,), (1, 1, 4), None),
        ((8, 2, 3, 4, 5), (2, 3, 4), (1, 2, 3, 1, 1), "mid"),

    ],
)
def test_plans(shape, dims, param, kind):
    plan = plan_for(torch.empty(shape), dims, param)
    assert (plan.kind if plan else None) == kind


F64 = torch.float64


def _thread_cases():
    """Layers and inputs large enough for the parallel kernels (cpu.SERIAL_BELOW); float64, where
    a different order of the sums shows in the last bits."""
    cl = torch.channels_last
    return {
        "bn_rows": (lambda: normkit.BatchNorm2d(8, dtype=F64), (16, 8, 24, 24), None),
        "bn_short_rows": (lambda: normkit.BatchNorm2d(64, dtype=F64), (32, 64, 7, 7), None),
        "bn_channels_last": (lambda: normkit.BatchNorm2d(64, dtype=F64), (32, 64, 7, 7), cl),
        "gn": (lambda: normkit.GroupNorm(4, 64, dtype=F64), (8, 64, 12, 12), None),
        "gn_channels_last": (lambda: normkit.GroupNorm(4, 64, dtype=F64), (8, 64, 12, 12), cl),
        "in": (lambda: normkit.InstanceNorm2d(64, affine=True, dtype=F64), (8, 64, 12, 12), None),
        "in_short_items": (lambda: normkit.InstanceNorm2d(64, affine=True, dtype=F64),
                           (33, 64, 7, 7), None),
        "ln": (lambda: normkit.LayerNorm(512, dtype=F64), (256, 512), None),
        "bn_add_relu": (lambda: normkit.BatchNormAct2d(64, dtype=F64), (32, 64, 7, 7), None),
        "bn_add_relu_channels_last": (lambda: normkit.BatchNormAct2d(64, dtype=F64),
                                      (32, 64, 7, 7), cl),
    }


@pytest.mark.parametrize("case", list(_thread_cases()))
def test_bitwise_deterministic_and_thread_count_independent(case):
    """Same bits from run to run and with 1 or 2 threads: outputs, input (and residual) grads,
    parameter grads, running statistics."""
    import numba

    build, shape, layout = _thread_cases()[case]
    gen = torch.Generator().manual_seed(3)
    x, dy, residual = (torch.randn(shape, generator=gen, dtype=F64) * 5 + 2 for _ in range(3))
    if layout is not None:
        x, dy, residual = (t.contiguous(memory_format=layout) for t in (x, dy, residual))
    assert x.numel() >= cpu.SERIAL_BELOW
    fused = case.startswith("bn_add_relu")
    results = []
    old = numba.get_num_threads()
    try:
        for threads in (2, 2, 1):
            numba.set_num_threads(threads)
            m = build()
            leaves = [x.clone().requires_grad_()] + ([residual.clone().requires_grad_()]
                                                     if fused else [])
            with normkit.use_backend("cpu"):
                y = m(*leaves)
            y.backward(dy)
            buffers = [b for b in (getattr(m, "running_var", None),) if b is not None]
            results.append([y] + [t.grad for t in leaves] + [m.weight.grad, m.bias.grad]
                           + buffers)
    finally:
        numba.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_large_mean_tiny_std_statistics():
    """Mean 1e4, std 1e-2 in float32: variance exact to fp32 level (shifted sums, fp64)."""
    x = (torch.randn(32, 4, 16, 16, dtype=torch.float64) * 1e-2 + 1e4).float()
    m = normkit.BatchNorm2d(4, momentum=1.0, eps=1e-12)  # eps must not dwarf var=1e-4
    y = m(x)
    true_var = x.double().var(dim=(0, 2, 3))
    torch.testing.assert_close(m.running_var.double(), true_var, rtol=1e-5, atol=0)
    assert abs(float(y.double().std()) - 1) < 1e-2


def test_double_backward_through_cpu_kernels():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: nF.batch_norm(x, None, None, w, b, True)  # noqa: E731
    assert _kernel_ran(fn(x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_group_norm_channels_last_plan():
    x = torch.randn(2, 6, 4, 5).contiguous(memory_format=torch.channels_last)
    grouped = x.unflatten(1, (3, 2))
    plan = plan_for(grouped, (2, 3, 4), (1, 3, 2, 1, 1))
    assert plan.kind == "nsc" and plan.array_shape == (2, 20, 3, 2)
    # The kernels read the memory in order as (N, spatial, G, C/G).
    memory = torch.as_strided(grouped, (grouped.numel(),), (1,))
    as_planned = grouped.permute(0, 3, 4, 1, 2).reshape(plan.array_shape)
    assert torch.equal(memory.view(plan.array_shape), as_planned)


def _launched_group(x, weight, bias) -> int:
    """The channel block that the short-row forward of this BatchNorm layout ran with."""
    plan = cpu._plan(x, weight, bias, (0, 2, 3), None, None, (1, x.shape[1], 1, 1))
    kernel, args, _ = plan.launches[(x.dtype, False)]
    assert kernel.py_func.__name__.startswith("rowwise_forward_train")
    return args[2]


@pytest.fixture
def fresh_plans():
    """Plans (and the kernel launches they cache, channel blocks included) made anew while the
    test runs and after it, so a patched block size is used and does not linger."""
    def clear():
        cpu._layout_plan.cache_clear()
        plan_module._plan.cache_clear()

    clear()
    yield clear
    clear()


@pytest.mark.parametrize("spatial", [(5, 6), (12, 12)])
def test_short_row_kernels_by_channel_blocks(monkeypatch, fresh_plans, spatial):
    """BatchNorm with rows shorter than a page runs by blocks of channels: one channel, blocks
    that do not divide the channel count, all channels; every blocking gives the same bits,
    and the reference's values. Rows of 30 elements are summed four samples at a time (5
    samples: one group of four and one left over), rows of 144 one by one."""
    x0 = torch.randn(5, 7, *spatial, dtype=torch.float64) * 3 + 1
    w0, b0 = torch.linspace(0.5, 1.5, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    dy = torch.randn_like(x0)
    channel_bytes = 5 * spatial[0] * spatial[1] * x0.element_size()
    assert (spatial[0] * spatial[1] < cpu_kernels.SAMPLE_QUADS_BELOW) == (spatial == (5, 6))
    plan = plan_for(x0, (0, 2, 3), (1, 7, 1, 1))
    assert cpu._short_rows(plan, x0)
    results = []
    for group in (1, 3, 7):
        monkeypatch.setattr(cpu, "ROW_GROUP_BYTES", group * channel_bytes)
        fresh_plans()
        assert cpu._row_group(plan, x0) == group
        leaves = [t.clone().requires_grad_() for t in (x0, w0, b0)]
        with normkit.use_backend("cpu"):
            y = nF.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)
        assert _kernel_ran(y)
        assert _launched_group(x0, w0, b0) == group
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    leaves = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    with normkit.use_backend("reference"):
        y = nF.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)
    y.backward(dy)
    expected = [y.detach()] + [t.grad for t in leaves]
    for got in results:
        for a, b, e in zip(got, results[0], expected):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_parallel_short_row_kernels_split_the_channels(monkeypatch, fresh_plans):
    """A tensor the parallel kernels take, small enough for one ROW_GROUP_BYTES block, is split
    into MIN_ROW_BLOCKS blocks of channels, with the bits of the one-block run."""
    x0 = torch.randn(9, 30, 16, 16) * 2 + 3
    w0 = torch.rand(30)
    assert x0.numel() >= cpu.SERIAL_BELOW
    plan = plan_for(x0, (0, 2, 3), (1, 30, 1, 1))
    assert cpu._short_rows(plan, x0)
    assert cpu._row_group(plan, x0) == 4  # 30 channels: 8 blocks of 4 (the last of 2)
    dy = torch.randn_like(x0)
    results = []
    for blocks in (cpu.MIN_ROW_BLOCKS, 1):
        monkeypatch.setattr(cpu, "MIN_ROW_BLOCKS", blocks)
        fresh_plans()
        group = 4 if blocks > 1 else 30
        assert cpu._row_group(plan, x0) == group
        leaves = [t.clone().requires_grad_() for t in (x0, w0)]
        with normkit.use_backend("cpu"):
            y = nF.batch_norm(leaves[0], None, None, leaves[1], None, True)
        assert _kernel_ran(y)
        assert _launched_group(x0, w0, None) == group
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_kernels_read_strided_parameters_and_buffers(layout):
    """The kernels read parameters and running buffers by address: strided views (every other
    element of a longer tensor) must give torch's results, and the buffers' update must land in
    the viewed elements only."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, 5, generator=gen).contiguous(memory_format=layout)
    dy = torch.randn(4, 6, 5, 5, generator=gen)
    storage = {name: torch.rand(12, generator=gen) + 0.5 for name in ("w", "b", "rm", "rv")}
    results = []
    for lib_F in (nF, torch.nn.functional):
        w, b = (storage[k].clone()[::2].requires_grad_() for k in ("w", "b"))
        rm_base, rv_base = storage["rm"].clone(), storage["rv"].clone()
        rm, rv = rm_base[::2], rv_base[::2]
        xg = x.clone().requires_grad_()
        y = lib_F.batch_norm(xg, rm, rv, w, b, True, 0.3)
        if lib_F is nF:
            assert _kernel_ran(y)
        y.backward(dy)
        eval_y = lib_F.batch_norm(x, rm, rv, w.detach(), b.detach(), False)
        results.append((y, xg.grad, w.grad, b.grad, rm_base, rv_base, eval_y))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_parameters_of_another_dtype_use_the_reference_backend():
    """The kernels read parameters in the input's dtype; another dtype (which functional's
    checks reject for users) is handed to the reference backend, not misread."""
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float32)
    assert cpu._plan(x, w, None, (0, 2, 3), None, None, (1, 6, 1, 1)) is None
    y, _, _ = cpu.normalize(x, w, None, (0, 2, 3), 1e-5, shape=(1, 6, 1, 1))
    expected, _, _ = reference.normalize(x, w, None, (0, 2, 3), 1e-5, shape=(1, 6, 1, 1))
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


BLOCKED_CALLS = {
    "bn_cl": lambda x, w, b: nF.batch_norm(x, None, None, w, b, True),
    "bn_eval_cl": lambda x, w, b: nF.batch_norm(
        x, torch.linspace(-1, 1, x.shape[1], dtype=x.dtype),
        torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype), w, b, False),
    "bn_relu_cl": lambda x, w, b: nF.batch_norm_act(x, None, None, w, b, True, act="relu"),
    "ln": lambda x, w, b: nF.layer_norm(x, x.shape[-1:], w[: x.shape[-1]], b[: x.shape[-1]]),
}


@pytest.mark.parametrize("call", BLOCKED_CALLS)
@pytest.mark.parametrize("min_rows,partial_bytes,blocks", [
    (16, 128 << 10, 3),  # the defaults: 3 blocks of 16 rows
    (1, 1 << 30, 48),  # one row per block
    (1, 16 * 40 * 5, 5),  # bounded by the partial sums' bytes
    (1000, 1 << 30, 1),  # fewer rows than one block holds
])
def test_row_blocks_of_partial_sums(monkeypatch, call, min_rows, partial_bytes, blocks):
    """Kernels that sum over rows (channels-last BatchNorm, fused BatchNorm+ReLU, LayerNorm's
    weight gradients) split the rows into blocks by shape, and their elementwise passes into
    row ranges: every split gives the reference's values, and the same bits on a second run."""
    monkeypatch.setattr(cpu, "MIN_BLOCK_ROWS", min_rows)
    monkeypatch.setattr(cpu, "PARTIAL_BYTES", partial_bytes)
    assert cpu._blocks(48, 40) == blocks
    assert cpu._tasks(48) == max(1, min(64, 48 // min_rows))  # elementwise passes: no partials
    gen = torch.Generator().manual_seed(5)
    x0 = (torch.randn(3, 40, 4, 4, generator=gen, dtype=torch.float64) * 3 + 1)
    if call == "ln":  # (48, 40) rows of a layer norm over the last dim
        x0 = x0.permute(0, 2, 3, 1).reshape(48, 40)
    else:  # channels_last: (48 rows, 40 channels) in memory
        x0 = x0.contiguous(memory_format=torch.channels_last)
    w0 = torch.rand(40, generator=gen, dtype=torch.float64) + 0.5
    b0 = torch.randn(40, generator=gen, dtype=torch.float64)
    dy = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    runs = {}
    for name in ("cpu", "cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x0, w0, b0)]
        with normkit.use_backend(name):
            y = BLOCKED_CALLS[call](*leaves)
        y.backward(dy)
        got = [y.detach()] + [t.grad for t in leaves]
        if name in runs:
            assert all(torch.equal(a, b) for a, b in zip(got, runs[name]))
        runs[name] = got
    for a, e in zip(runs["cpu"], runs["reference"]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [15, 16])
def test_wide_rows_in_pairs(rows):
    """channels_last BatchNorm with at least PAIR_ROWS_COLUMNS channels: the elementwise passes
    take two rows per coefficient load (an odd row count leaves one row alone); forward and
    backward equal the reference's."""
    channels = cpu_kernels.PAIR_ROWS_COLUMNS
    gen = torch.Generator().manual_seed(9)
    x0 = (torch.randn(rows, channels, 1, 1, generator=gen, dtype=torch.float64) * 2 + 3)
    x0 = x0.contiguous(memory_format=torch.channels_last)
    w0 = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    b0 = torch.randn(channels, generator=gen, dtype=torch.float64)
    dy = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    runs = []
    for name in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x0, w0, b0)]
        with normkit.use_backend(name):
            y = nF.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)
        assert name == "reference" or _kernel_ran(y)
        y.backward(dy)
        runs.append([y.detach()] + [t.grad for t in leaves])
    for a, e in zip(*runs):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("items", [4, 5, 6, 7, 4099])
@pytest.mark.parametrize("length", [2, 9, 49, cpu_kernels.ITEM_QUADS_BELOW - 1])
@pytest.mark.parametrize("affine", [True, False])
def test_short_items_four_at_a_time(items, length, affine):
    """InstanceNorm over items shorter than ITEM_QUADS_BELOW runs the four-items kernel (item
    counts with 0 to 3 items left over, serial and parallel sizes): equal to the reference
    (float64, 1e-12); each item is shifted by its own first value, so the variance of an item
    of std 3e-3 keeps its digits when the items' means are 1e6 apart."""
    channels = 4099 if items == 4099 else 1
    x0 = torch.randn(items // channels, channels, length, dtype=F64) * 3 + 1
    w0 = torch.linspace(0.5, 1.5, channels, dtype=F64) if affine else None
    b0 = torch.linspace(-1, 1, channels, dtype=F64) if affine else None
    plan = cpu._plan(x0, w0, b0, (2,), None, None, (1, channels, 1))
    assert cpu._forward_launch(plan, x0, False)[0].__name__.startswith("items_forward_train")
    outs = []
    for name in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        with normkit.use_backend(name):
            y = nF.instance_norm(x, weight=w0, bias=b0, eps=1e-3)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=F64)).view_as(y))
        outs.append((y, x.grad))
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    far = x0 * 1e-3 + 1e6 * torch.arange(items, dtype=F64).remainder(3).view_as(x0[..., :1])
    _, stats = cpu._forward(plan, far, w0, b0, 1e-3, None, None)
    centered = far - far.mean(dim=2, keepdim=True)  # two-pass: exact enough at this offset
    # atol: var is about 1e-5; one shift for all would be off by about 1e-3
    torch.testing.assert_close(stats[1], centered.square().mean(dim=2).flatten(), rtol=1e-9,
                               atol=1e-16)


def test_long_items_take_the_plain_kernel():
    x = torch.randn(2, 3, cpu_kernels.ITEM_QUADS_BELOW)
    plan = cpu._plan(x, None, None, (2,), None, None, None)
    assert cpu._forward_launch(plan, x, False)[0].__name__.startswith("mid_forward_train")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["bn_nchw", "bn_channels_last", "in_eval"])
def test_low_precision_inference_reads_16_bits(monkeypatch, dtype, case):
    """Inference with given statistics (eval BatchNorm, InstanceNorm with running statistics)
    on float16 / bfloat16 reads and writes the 16 bits in the kernel, no float32 copy: y equals
    the float32 kernels' result rounded to the dtype, NaN, infinities and overflow included."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 6, 5, 7, generator=gen) * 3 + 1)
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38])
    x = x.to(dtype)
    if case == "bn_channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    m = normkit.InstanceNorm2d(6, affine=True, track_running_stats=True) if case == "in_eval" \
        else normkit.BatchNorm2d(6)
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1, generator=gen)
        m.running_var.uniform_(0.5, 2, generator=gen)
        m.weight.uniform_(0.5, 1.5, generator=gen)
        m.weight[0] = 1e4  # float16 overflows to inf
    m.eval()
    expected = m(x.float()).detach().to(dtype)
    monkeypatch.setattr(cpu.cpu_buffers, "converted", None)  # a float32 copy would fail
    with torch.no_grad():
        y = m(x)
    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


def _assert_16_bit_kernels_match_float32(monkeypatch, make, shape, dtype, params,
                                         memory_format=torch.contiguous_format):
    """Train `make()` (weight drawn in [0.5, 1.5), bias normal, parameters float32 or `dtype`)
    on float16 / bfloat16 x (and dy) of `memory_format` without any float32 copy of x, and on
    x.float() with float32 parameters: y and dx must be the float32 results rounded to the
    dtype (within one unit, see assert_rounded_within_one_unit), the parameters' grads rounded
    to theirs; float32 running statistics must be equal (16-bit ones move by a 16-bit lerp)."""
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype, memory_format=memory_format)
    dy = torch.randn(shape, generator=gen).to(dtype, memory_format=memory_format)
    results = []
    for low in (True, False):
        m = make()
        with torch.no_grad():
            m.weight[1:].uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
            m.bias.normal_(generator=torch.Generator().manual_seed(2))
        if params == "low":
            m.to(dtype)
        if not low:
            m.float()  # the same parameter values, in float32
        x = (x0 if low else x0.float()).detach().requires_grad_()
        with monkeypatch.context() as patch:
            if low:
                patch.setattr(cpu.cpu_buffers, "converted", None)  # a float32 copy would fail
            y = m(x)
            assert _kernel_ran(y)
            y.backward(dy if low else dy.float())
        buffers = [b for name, b in m.named_buffers() if name.startswith("running")]
        results.append((y, x.grad, m.weight.grad, m.bias.grad, *buffers))
    (y, dx, dw, db, *stats), (y32, dx32, dw32, db32, *stats32) = results
    assert y.dtype == dx.dtype == dtype
    assert y.stride() == dx.stride() == x0.stride()
    assert_rounded_within_one_unit(y, y32)
    assert_rounded_within_one_unit(dx, dx32)
    param_dtype = dtype if params == "low" else torch.float32
    assert dw.dtype == db.dtype == param_dtype
    assert torch.equal(dw, dw32.to(param_dtype)) and torch.equal(db, db32.to(param_dtype))
    for s, s32 in zip(stats, stats32):
        if params == "float32":
            assert torch.equal(s, s32)
        else:
            torch.testing.assert_close(s, s32.to(s.dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params", ["float32", "low"])
@pytest.mark.parametrize("shape", [(37, 67), (3, 5, 40)])
def test_low_precision_layer_norm_reads_16_bits(monkeypatch, dtype, params, shape):
    """LayerNorm of float16 / bfloat16 x: the rows kernels read x and dy and write y and dx in
    16 bits, no float32 copy; y, dx and the parameters' grads equal the float32 kernels'
    results rounded to their tensors' dtypes (a float16 overflow to inf included)."""
    def make():
        m = normkit.LayerNorm(shape[-1])
        with torch.no_grad():
            m.weight[0] = 3e4  # float16 overflows to inf in the first column
        return m

    _assert_16_bit_kernels_match_float32(monkeypatch, make, shape, dtype, params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_layer_norm_saves_x_itself(dtype):
    """The 16-bit LayerNorm kernels keep x itself for the backward (no float32 copy): an
    in-place change of x before backward raises, as torch's does."""
    x = torch.randn(6, 8, dtype=dtype, requires_grad=True)
    for lib in (torch.nn, normkit):
        base = x * 1
        y = lib.LayerNorm(8).to(dtype)(base)
        with torch.no_grad():
            base.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_layer_norm_double_backward(dtype):
    """create_graph=True through the 16-bit LayerNorm kernels: the reference's differentiable
    backward on float32 copies of x and dy. With output grads exact in 16 bits, dx and the
    second-order grads equal those of the float32 computation, rounded to their dtypes."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 12, generator=gen).to(dtype)
    w0 = torch.rand(12, generator=gen) + 0.5
    c1, c2 = (torch.randint(-8, 9, (5, 12), generator=gen) / 8 for _ in range(2))
    grads = []
    for low in (True, False):
        x = (x0 if low else x0.float()).detach().requires_grad_()
        w = w0.clone().requires_grad_()
        y = nF.layer_norm(x, (12,), w)
        assert _kernel_ran(y)
        (dx,) = torch.autograd.grad((y.float() * c1).sum(), x, create_graph=True)
        grads.append((dx, *torch.autograd.grad((dx.float() * c2).sum(), (x, w))))
    (dx, ddx, dw), (dx32, ddx32, dw32) = grads
    assert dx.dtype == ddx.dtype == dtype and dw.dtype == torch.float32
    assert torch.equal(dx, dx32.to(dtype)) and torch.equal(ddx, ddx32.to(dtype))
    assert torch.equal(dw, dw32)


CHANNELS_LAST = torch.channels_last
TRAINING_16_BIT = {  # calls on each kernel (mid, rows-wise, items, cols, nsc); all read 16 bits
    "bn_long_rows": (lambda: normkit.BatchNorm2d(3), (2, 3, 48, 48)),
    "bn_short_rows": (lambda: normkit.BatchNorm2d(5), (6, 5, 14, 14)),
    "bn_short_rows_by_four": (lambda: normkit.BatchNorm2d(5), (6, 5, 7, 7)),
    "bn1d": (lambda: normkit.BatchNorm1d(4), (9, 4, 11)),
    "bn3d": (lambda: normkit.BatchNorm3d(2), (3, 2, 4, 24, 24)),
    "gn": (lambda: normkit.GroupNorm(2, 4), (3, 4, 10, 12)),
    "gn_one_channel_groups": (lambda: normkit.GroupNorm(4, 4), (2, 4, 5, 6)),
    "in": (lambda: normkit.InstanceNorm2d(3, affine=True), (2, 3, 10, 12)),
    "in_short_items": (lambda: normkit.InstanceNorm2d(3, affine=True), (2, 3, 5, 7)),
    "bn_channels_last": (lambda: normkit.BatchNorm2d(6), (5, 6, 7, 9), CHANNELS_LAST),
    "bn1d_2d_input": (lambda: normkit.BatchNorm1d(40), (37, 40)),
    "bn_channels_last_wide": (lambda: normkit.BatchNorm2d(2100), (2, 2100, 3, 3), CHANNELS_LAST),
    "gn_channels_last": (lambda: normkit.GroupNorm(3, 6), (3, 6, 5, 7), CHANNELS_LAST),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params", ["float32", "low"])
@pytest.mark.parametrize("case", list(TRAINING_16_BIT))
def test_low_precision_training_reads_16_bits(monkeypatch, dtype, params, case):
    """BatchNorm, GroupNorm and InstanceNorm on float16 / bfloat16 x, contiguous (long and
    short rows, long and short items) and channels_last: the kernels read and write the 16
    bits (no float32 copy) forward and backward; y and dx equal the float32 kernels' results
    rounded (within one unit), the parameters' grads rounded to their dtypes, and float32
    running statistics are the float32 path's."""
    make, shape, *memory_format = TRAINING_16_BIT[case]
    _assert_16_bit_kernels_match_float32(monkeypatch, make, shape, dtype, params, *memory_format)


NEAR_A_LARGE_MEAN = {  # each elementwise pass (mid, rows-wise, items, cols, nsc, rows)
    "bn_long_rows": (lambda lib: lib.BatchNorm2d(3), (2, 3, 48, 48)),
    "bn_short_rows": (lambda lib: lib.BatchNorm2d(5), (6, 5, 14, 14)),
    "in_short_items": (lambda lib: lib.InstanceNorm2d(3, affine=True), (2, 3, 5, 7)),
    "bn_channels_last": (lambda lib: lib.BatchNorm2d(6), (5, 6, 7, 9), CHANNELS_LAST),
    "gn_channels_last": (lambda lib: lib.GroupNorm(3, 6), (3, 6, 5, 7), CHANNELS_LAST),
    "ln": (lambda lib: lib.LayerNorm(40), (37, 40)),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(NEAR_A_LARGE_MEAN))
def test_low_precision_keeps_the_digits_near_a_large_mean(dtype, case):
    """16-bit x of 1000 with a few 1004 (the items of sample 0 and BatchNorm's channel 0 constant,
    the others' variance far below their mean's square): the float32 elementwise passes, centered at
    the mean, give torch's float64 result rounded to the dtype (within one unit). Computed as x *
    alpha + beta in float32, the constant items' y would be off by about 1000 * alpha * 2^-24 (alpha
    up to 1 / sqrt(eps) = 316 here), a hundred units of a bias-sized y."""
    make, shape, *memory_format = NEAR_A_LARGE_MEAN[case]
    gen = torch.Generator().manual_seed(4)
    x = 1000 + 4 * (torch.rand(shape, generator=gen) < 1 / 64).double()
    x[0] = x[:, 0] = 1000  # constant items: sample 0's (and channel 0's for BatchNorm)
    x = x.to(dtype)
    if memory_format:
        x = x.contiguous(memory_format=memory_format[0])
    ours, oracle = make(normkit), make(torch.nn)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=gen)
        ours.bias.normal_(generator=gen)
    oracle.load_state_dict(ours.state_dict())
    y = ours(x)
    assert _kernel_ran(y) and y.dtype == dtype
    with torch.no_grad():
        assert_rounded_within_one_unit(y.detach(), oracle.double()(x.double()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_low_precision_running_statistics_move_in_the_kernel(monkeypatch, dtype, momentum):
    """float16 / bfloat16 running buffers (a module moved to the dtype) are updated by the
    running-statistics kernel (the reference's lerp would fail here): running + factor * (batch
    statistic - running) in float64 from the float64 batch statistics, rounded to float32 and
    then to the dtype, bit for bit, over five training steps (momentum=None: the cumulative
    average's factor 1 / steps). Against the float64 running statistics (never rounded) they
    stay within one unit of the dtype plus torch's own error (torch's statistics and lerp run in
    float32: its bfloat16 running variance was 3 units from ours after three steps here)."""
    monkeypatch.setattr(reference, "update_running_stats", None)
    gen = torch.Generator().manual_seed(5)
    ours, theirs = normkit.BatchNorm2d(512, momentum=momentum), \
        torch.nn.BatchNorm2d(512, momentum=momentum)
    ours.to(dtype), theirs.to(dtype)
    exact = [b.double() for b in (ours.running_mean, ours.running_var)]
    for step in range(1, 6):
        x = (torch.randn(4, 512, 3, 3, generator=gen) * 2 + 3).to(dtype)
        before = [b.double() for b in (ours.running_mean, ours.running_var)]
        ours(x), theirs(x)
        factor = 1 / step if momentum is None else momentum
        batch = x.double().mean(dim=(0, 2, 3)), x.double().var(dim=(0, 2, 3))
        exact = [e + factor * (b - e) for e, b in zip(exact, batch)]
        for name, old, new, e in zip(("running_mean", "running_var"), before, batch, exact):
            got = getattr(ours, name)
            assert got.dtype == dtype
            assert torch.equal(got, (old + factor * (new - old)).float().to(dtype)), name
            torch_error = units_apart(getattr(theirs, name), e)
            assert (units_apart(got, e) <= torch_error + 1).all(), name
    assert ours.num_batches_tracked.item() == 5


def test_no_grad_statistics_scratch_is_per_thread():
    """No-grad calls whose statistics nobody reads write them to a per-thread scratch: Python
    threads running such calls at once (the kernels release the GIL) get the bits of
    one-at-a-time runs; a call that returns its statistics gets a buffer of its own."""
    gen = torch.Generator().manual_seed(7)
    inputs = [torch.randn(8, 64, 11, 11, generator=gen) * (i + 1) + i for i in range(4)]
    weight = torch.rand(64, generator=gen)
    items = 8 * 16
    assert items <= cpu.SCRATCH_ITEMS
    with torch.no_grad(), normkit.use_backend("cpu"):
        expected = [nF.group_norm(x, 16, weight) for x in inputs]
        scratch = cpu._scratch.buffer[:3 * items].reshape(3, items)
        scratch[:] = np.nan
        nF.group_norm(inputs[0], 16, weight)
        true_mean = inputs[0].view(8, 16, -1).double().mean(2).flatten()
        torch.testing.assert_close(torch.from_numpy(scratch[0].copy()), true_mean)
        failures = []

        def work(i):
            for _ in range(1000):
                if not torch.equal(nF.group_norm(inputs[i], 16, weight), expected[i]):
                    failures.append(i)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
        _, mean, _ = cpu.normalize(inputs[0], weight, None, (2, 3, 4), 1e-5,
                                   shape=(1, 16, 4, 1, 1), with_stats=True, groups=16)
        nF.group_norm(inputs[1], 16, weight)
        torch.testing.assert_close(mean, true_mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("act,memory_efficient", [("identity", False), ("relu", False),
                                                  ("relu", True), ("leaky_relu", False),
                                                  ("silu", False), ("silu", True)])
def test_low_precision_fused_kernels_read_16_bits(monkeypatch, dtype, layout, act,
                                                  memory_efficient):
    """BatchNormAct2d on float16 / bfloat16 x and residual runs the fused kernels on their own 16
    bits (a float32 copy would fail), in training and then in eval: the running statistics are
    the float32 path's, the output its rounding within one unit (the 16-bit kernels compute z and
    dx in float32, see assert_rounded_within_one_unit). dL/dz is held in x's dtype, as torch's
    composition holds it: identity and relu make it exact in 16 bits, so every grad is the
    float32 path's rounded too (dx within one unit); leaky_relu and silu (and silu's kept
    act'(z)) round it, so their grads stay within two units of x's dtype (of the largest grad)
    of the float32 path's, but for the residual grad (dL/dz itself, rounded once either way) of
    leaky_relu (bit for bit) and of memory-efficient silu (within one unit: silu'(z) of a float32
    z)."""
    gen = torch.Generator().manual_seed(3)
    shape = (5, 6, 7, 9)
    x0, r0, dy = ((torch.randn(shape, generator=gen) * s + s).to(dtype, memory_format=layout)
                  for s in (2, 1, 1))
    eps = torch.finfo(dtype).eps
    ours, theirs = (normkit.BatchNormAct2d(6, act=act, memory_efficient=memory_efficient)
                    for _ in range(2))
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=gen)
        ours.bias.normal_(generator=gen)
    theirs.load_state_dict(ours.state_dict())
    for training in (True, False):
        results = []
        for m, low in ((ours, True), (theirs, False)):
            m.train(training).zero_grad()
            x, r = ((t if low else t.float()).detach().requires_grad_() for t in (x0, r0))
            with monkeypatch.context() as patch:
                if low:
                    patch.setattr(cpu.cpu_buffers, "converted", None)
                y = m(x, r)
                assert "CpuBatchNormAct" in type(y.grad_fn).__name__
                y.backward(dy if low else dy.float())
            results.append((y, x.grad, r.grad, m.weight.grad, m.bias.grad))
        (y, dx, dr, dw, db), (y32, dx32, dr32, dw32, db32) = results
        assert y.dtype == dx.dtype == dr.dtype == dtype and dw.dtype == torch.float32
        assert y.stride() == dx.stride() == dr.stride() == x0.stride()
        assert_rounded_within_one_unit(y, y32)
        assert torch.equal(ours.running_mean, theirs.running_mean)
        assert torch.equal(ours.running_var, theirs.running_var)
        exact_dz = act in ("identity", "relu")
        grads = {"dx": (dx, dx32), "dw": (dw, dw32), "db": (db, db32), "dr": (dr, dr32)}
        for name, (got, want) in grads.items():
            if (exact_dz and name == "dx") or (name == "dr" and act == "silu" and memory_efficient):
                assert_rounded_within_one_unit(got, want)  # silu'(z) of a float32 z here
            elif exact_dz or (name == "dr" and act == "leaky_relu"):
                assert torch.equal(got, want.to(got.dtype)), name
            else:
                assert (got.float() - want).abs().max() <= 2 * eps * want.abs().max(), name
