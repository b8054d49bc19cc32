"""BatchNormAct: equal to torch's BN -> add -> act, grads included; memory saving measured."""

import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as tF

import normkit
from parity import assert_matches

pytestmark = pytest.mark.usefixtures("backend")

ACTS = {
    "identity": lambda z, s: z,
    "relu": lambda z, s: torch.relu(z),
    "leaky_relu": lambda z, s: tF.leaky_relu(z, s),
    "silu": lambda z, s: tF.silu(z),
    "gelu": lambda z, s: tF.gelu(z),
}


def _pair(rank, act, slope=0.01, memory_efficient=False, **kwargs):
    bn = getattr(tnn, f"BatchNorm{rank}d")(4, **kwargs)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ours = getattr(normkit, f"BatchNormAct{rank}d")(4, act=act, negative_slope=slope,
                                                     memory_efficient=memory_efficient, **kwargs)
    ours.load_state_dict(bn.state_dict())
    return bn, ours


SHAPES = {1: (6, 4, 5), 2: (3, 4, 5, 6), 3: (2, 4, 3, 4, 5)}


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("dtype,layout", [(torch.float32, None), (torch.bfloat16, None),
                                          (torch.float32, torch.channels_last),
                                          (torch.float64, None)])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_matches_torch_composition(act, residual, memory_efficient, dtype, layout, rank):
    if layout is not None and rank != 2:
        return
    module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bn, ours = _pair(rank, act, 0.2, memory_efficient, dtype=module_dtype)
    gen = torch.Generator().manual_seed(rank)
    for mode in ("train", "train", "eval"):
        bn.train(mode == "train"), ours.train(mode == "train")
        x = (torch.randn(SHAPES[rank], generator=gen) * 2 + 1).to(dtype)
        r = torch.randn(SHAPES[rank], generator=gen).to(dtype) if residual else None
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        dy = torch.randn(SHAPES[rank], generator=gen).to(dtype)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        rs = [None if r is None else r.clone().requires_grad_() for _ in range(2)]
        z = bn(xs[0])
        expected = ACTS[act](z if r is None else z + rs[0], 0.2)
        got = ours(xs[1], rs[1])
        expected.backward(dy)
        got.backward(dy)
        rtol = 1e-4 if dtype == torch.float32 else None
        oracle = None
        if dtype == torch.bfloat16:  # torch's own error in float64, as the yardstick
            bn64 = tnn.BatchNorm1d(4) if rank == 1 else getattr(tnn, f"BatchNorm{rank}d")(4)
            bn64 = bn64.double().train(mode == "train")
            bn64.load_state_dict(bn.state_dict())
            z64 = bn64(x.double())
            oracle = ACTS[act](z64 if r is None else z64 + r.double(), 0.2).detach()
        assert_matches(got, expected, oracle, what=f"{mode} output", rtol=rtol)
        if dtype != torch.bfloat16:
            assert_matches(xs[1].grad, xs[0].grad, what="input grad", rtol=rtol)
            if r is not None:
                assert_matches(rs[1].grad, rs[0].grad, what="residual grad", rtol=rtol)
            assert_matches(ours.weight.grad, bn.weight.grad, what="weight grad", rtol=rtol)
            assert_matches(ours.bias.grad, bn.bias.grad, what="bias grad", rtol=rtol)
        torch.testing.assert_close(ours.running_mean, bn.running_mean)
        torch.testing.assert_close(ours.running_var, bn.running_var)
        assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked)
        if layout is not None:
            assert got.is_contiguous(memory_format=layout)
        ours.zero_grad(), bn.zero_grad()


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_gradcheck(act, memory_efficient):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(x, r, w, b):
        return normkit.functional.batch_norm_act(x, None, None, w, b, True, act=act,
                                                 negative_slope=0.1, residual=r,
                                                 memory_efficient=memory_efficient)
    assert torch.autograd.gradcheck(fn, (x, r, w, b))


def test_state_dict_interchangeable_with_batchnorm():
    bn = normkit.BatchNorm2d(8)
    bn(torch.randn(4, 8, 3, 3))
    fused = normkit.BatchNormAct2d(8, act="silu")
    fused.load_state_dict(bn.state_dict())
    assert list(fused.state_dict()) == list(bn.state_dict())
    assert isinstance(fused, torch.nn.BatchNorm2d)
    assert "act=silu" in repr(fused)


def test_bad_act_and_residual_shape():
    with pytest.raises(ValueError, match="act must be one of"):
        normkit.BatchNormAct2d(3, act="tanh")
    with pytest.raises(ValueError, match="residual must have"):
        normkit.BatchNormAct2d(3)(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 1))


def _saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while fn's graph is alive."""
    sizes = {}

    def pack(t):
        sizes[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes.values()), out


@pytest.mark.parametrize("residual", [False, True])
def test_memory_efficient_saves_less_than_torch(residual):
    x = torch.randn(8, 4, 16, 16, requires_grad=True)
    r = torch.randn(8, 4, 16, 16, requires_grad=True) if residual else None
    bn, ours = _pair(2, "relu", memory_efficient=True)

    def torch_fn():
        z = bn(x)
        return torch.relu(z + r if r is not None else z)

    torch_bytes, _ = _saved_bytes(torch_fn)
    ours_bytes, _ = _saved_bytes(lambda: ours(x, r))
    ratio = ours_bytes / torch_bytes
    # torch keeps x and the ReLU output; we keep x and a 1-bit mask: (32 + 1) / 64 bits.
    assert ratio <= 0.53, ratio


@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("layout", [None, torch.channels_last])
def test_fused_kernel_runs_on_cpu(monkeypatch, layout, act):
    """With a grad: the fused autograd node. Without (no_grad): the same kernels called
    directly, no node; the outputs and running statistics equal torch's composition."""
    from normkit.backends import cpu_act

    m = normkit.BatchNormAct2d(4, act=act)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    if layout is not None:
        x = x.detach().contiguous(memory_format=layout).requires_grad_()
    with normkit.use_backend(None):
        assert "CpuBatchNormAct" in type(m(x).grad_fn).__name__
    with normkit.use_backend("reference"):
        assert "CpuBatchNormAct" not in type(m(x).grad_fn).__name__
    calls = []
    fused = cpu_act.fused_forward
    monkeypatch.setattr(cpu_act, "fused_forward", lambda *a: calls.append(1) or fused(*a))
    bn = tnn.BatchNorm2d(4)
    bn.load_state_dict(m.state_dict())
    residual = torch.randn(x.shape)
    with torch.no_grad(), normkit.use_backend(None):
        y = m(x, residual)
        expected = ACTS[act](bn(x) + residual, 0.01)
    assert calls and y.grad_fn is None
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)


def test_gelu_runs_as_the_composition_on_cpu():
    """numba's erf is libm's scalar one: the fused GELU kernel lost to the composition, whose
    GELU is torch's vectorized op, so the CPU backend hands GELU to the composition."""
    m = normkit.BatchNormAct2d(4, act="gelu")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with normkit.use_backend(None):
        assert "CpuBatchNormAct" not in type(m(x).grad_fn).__name__



@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_kernels_by_channel_blocks(monkeypatch, act, training):
    """The fused NCHW forward and backward walk blocks of channels sample by sample: one
    channel per block, blocks that do not divide the channel count, all channels; every
    blocking gives the same bits, and torch's BN -> add -> act, outputs and grads (5 samples of
    30-element rows: the statistics take four samples' rows at a time plus one left over)."""
    from normkit.backends import cpu

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, 5, 6, generator=gen, dtype=torch.float64) * 2 + 1
    residual = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    bn = tnn.BatchNorm2d(7, dtype=torch.float64).train(training)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    results = []
    for group in (1, 3, 7):
        monkeypatch.setattr(cpu, "ROW_GROUP_BYTES", group * 5 * 30 * x.element_size())
        ours = normkit.BatchNormAct2d(7, act=act, dtype=torch.float64).train(training)
        ours.load_state_dict(bn.state_dict())
        leaves = [t.clone().requires_grad_() for t in (x, residual)]
        with normkit.use_backend("cpu"):
            y = ours(*leaves)
        assert "CpuBatchNormAct" in type(y.grad_fn).__name__
        y.backward(dy)
        results.append([y.detach(), ours.running_mean, ours.running_var]
                       + [t.grad for t in leaves])
    leaves = [t.clone().requires_grad_() for t in (x, residual)]
    y = ACTS[act](bn(leaves[0]) + leaves[1], 0.01)
    y.backward(dy)
    expected = [y.detach(), bn.running_mean, bn.running_var] + [t.grad for t in leaves]
    for got in results:
        for a, b, e in zip(got, results[0], expected):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "identity"])
@pytest.mark.parametrize("shape,layout", [((2, 3, 12, 12), None), ((3, 2, 7, 7), None),
                                          ((4, 130, 2, 1), torch.channels_last),
                                          ((5, 13, 1, 3), torch.channels_last)])
@pytest.mark.parametrize("residual", ["none", "grad", "no_grad"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_grads_asked_for(act, shape, layout, residual, x_grad):
    """Every combination of grads asked for (x's, the residual's, only the parameters'): dL/dz
    goes to the residual's grad, to dx's memory or to a buffer of its own. Rows of any length
    (144 and 49 elements NCHW; 130 and 13 channels, not multiples of 8, for the packed mask):
    output and grads equal torch's BN (-> add) -> act."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    res = torch.randn(shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    if layout is not None:
        x, res, dy = (t.contiguous(memory_format=layout) for t in (x, res, dy))
    bn = tnn.BatchNorm2d(shape[1], dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.5, 0.5, generator=gen)
    ours = normkit.BatchNormAct2d(shape[1], act=act, dtype=torch.float64)
    ours.load_state_dict(bn.state_dict())
    results = []
    for run in ("ours", "torch"):
        leaf = x.clone().requires_grad_(x_grad)
        extra = [] if residual == "none" else [res.clone().requires_grad_(residual == "grad")]
        with normkit.use_backend("cpu"):
            if run == "ours":
                y = ours(leaf, *extra)
                assert "CpuBatchNormAct" in type(y.grad_fn).__name__
            else:
                z = bn(leaf)
                y = ACTS[act](z + extra[0] if extra else z, 0.01)
        y.backward(dy)
        module = ours if run == "ours" else bn
        results.append([y.detach(), leaf.grad, module.weight.grad, module.bias.grad]
                       + [t.grad for t in extra])
    for a, e in zip(*results):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert (results[0][1] is None) == (not x_grad)
    if residual != "none":
        assert (results[0][4] is None) == (residual == "no_grad")


@pytest.mark.parametrize("spatial", [(5, 6), (12, 12)])
def test_nan_counts_as_positive_in_the_mask(spatial):
    """A NaN makes its channel's z NaN; torch's relu passes the gradient where its output is
    NaN, and so does the packed mask (30- and 144-element rows)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, *spatial, generator=gen, dtype=torch.float64)
    x[1, 2, 0, 3] = float("nan")
    residual = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    bn = tnn.BatchNorm2d(4, dtype=torch.float64)
    ours = normkit.BatchNormAct2d(4, act="relu", dtype=torch.float64)
    ours.load_state_dict(bn.state_dict())
    grads = []
    for run in ("ours", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, residual)]
        with normkit.use_backend("cpu"):
            y = ours(*leaves) if run == "ours" else torch.relu(bn(leaves[0]) + leaves[1])
        y.backward(dy)
        grads.append([y.detach()] + [t.grad for t in leaves])
    assert torch.isnan(grads[1][0][:, 2]).all()
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, equal_nan=True)
