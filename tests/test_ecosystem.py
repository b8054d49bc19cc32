"""normkit inside the PyTorch ecosystem: torch.compile, torch.export, autocast, safetensors."""

import copy

import pytest
import torch
import torch.nn as tnn

import normkit

from sixteen_bit import assert_rounded_within_one_unit


class ResBlock(tnn.Module):
    def __init__(self, lib, c=8):
        super().__init__()
        self.conv1, self.bn1 = tnn.Conv2d(c, c, 3, padding=1, bias=False), lib.BatchNorm2d(c)
        self.conv2, self.bn2 = tnn.Conv2d(c, c, 3, padding=1, bias=False), lib.BatchNorm2d(c)
        self.gn = lib.GroupNorm(2, c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.gn(torch.relu(x + self.bn2(self.conv2(y))))


class TransformerBlock(tnn.Module):
    def __init__(self, lib, d=16):
        super().__init__()
        self.ln1, self.ln2 = lib.LayerNorm(d), lib.LayerNorm(d)
        self.qkv, self.proj = tnn.Linear(d, 3 * d), tnn.Linear(d, d)
        self.mlp = tnn.Sequential(tnn.Linear(d, 32), tnn.GELU(), tnn.Linear(32, d))

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        return x + self.mlp(self.ln2(x))


class FusedBlock(tnn.Module):
    """conv -> BN -> + x -> ReLU: normkit's fused BatchNormAct2d, torch's composition."""

    def __init__(self, lib, c=8):
        super().__init__()
        self.conv = tnn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = normkit.BatchNormAct2d(c) if lib is normkit else tnn.BatchNorm2d(c)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y, x) if isinstance(self.bn, normkit.BatchNormAct2d) else \
            torch.relu(self.bn(y) + x)


MODELS = {"resnet_block": (ResBlock, (4, 8, 6, 6)), "transformer": (TransformerBlock, (2, 5, 16)),
          "fused_block": (FusedBlock, (4, 8, 6, 6))}


def _pair(name):
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    ours = cls(normkit)
    torch.manual_seed(0)
    theirs = cls(tnn)
    return ours, theirs, shape


def _step(model, x, train):
    model.train(train)
    xi = x.clone().requires_grad_()
    y = model(xi)
    y.square().mean().backward()
    return y.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]


# Inductor's code generation is slow on 2 CPU cores: it gets one representative case, the
# graph-level backend all of them.
COMPILE_CASES = [(n, t, "aot_eager") for n in MODELS for t in (True, False)]
COMPILE_CASES.append(("resnet_block", True, "inductor"))


def assert_steps_match(compiled, ours, theirs, shape, train, device="cpu", atol=1e-5):
    """Two training (or eval) steps of the compiled normkit model and of torch's model give the
    same outputs, input and parameter grads, and state."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(shape, generator=gen).to(device)
        y_o, gx_o, gp_o = _step(compiled, x, train)
        y_t, gx_t, gp_t = _step(theirs, x, train)
        torch.testing.assert_close(y_o, y_t, rtol=1e-4, atol=atol)
        torch.testing.assert_close(gx_o, gx_t, rtol=1e-4, atol=atol)
        for a, b in zip(gp_o, gp_t):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)
        for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=atol / 10, msg=k)
        ours.zero_grad(), theirs.zero_grad()


@pytest.mark.parametrize("name,train,backend", COMPILE_CASES)
def test_compile_fullgraph_matches_torch(name, train, backend):
    ours, theirs, shape = _pair(name)
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    assert_steps_match(compiled, ours, theirs, shape, train)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compile_low_precision_cpu(dtype):
    """float16 / bfloat16 CPU input (large enough for the eager path's pooled float32 copies)
    compiles with fullgraph=True and matches eager normkit: the traced graph runs the float32
    kernels on a float32 copy, eager the 16-bit kernels, whose elementwise passes compute in
    float32, so y and dx agree within one unit of the dtype; the weight grad and the running
    statistics (float64 sums of the same values in both) bit for bit. The loss weighs y by
    fixed random values: the gradient of mean(y ** 2) through BatchNorm is zero but for
    rounding noise, which no two computations share."""
    x = torch.randn(4, 8, 256, 256).to(dtype)
    weights = torch.randn(x.shape)
    results = []
    for compiled in (False, True):
        m = normkit.BatchNorm2d(8).to(dtype)
        fn = torch.compile(m, fullgraph=True, backend="aot_eager") if compiled else m
        xi = x.clone().requires_grad_()
        y = fn(xi)
        (y.float() * weights).sum().backward()
        results.append((y, xi.grad, m.weight.grad, m.running_var))
    (y, dx, dw, var), (y_c, dx_c, dw_c, var_c) = results
    assert_rounded_within_one_unit(y, y_c.float())
    assert_rounded_within_one_unit(dx, dx_c.float())
    assert torch.equal(dw, dw_c) and torch.equal(var, var_c)


@pytest.mark.parametrize("name", list(MODELS))
def test_export_eval_matches_eager(name):
    ours, _, shape = _pair(name)
    ours(torch.randn(shape))  # move the running statistics away from their initial values
    ours.eval()
    x = torch.randn(shape)
    exported = torch.export.export(ours, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert not any(t.startswith("aten.") and "norm" in t for t in targets), targets
    assert any(t.startswith("normkit.cpu_normalize_forward") for t in targets), targets
    torch.testing.assert_close(exported.module()(x), ours(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls,args,shape", [
    ("BatchNorm2d", (4,), (3, 4, 5, 5)), ("GroupNorm", (2, 4), (3, 4, 5, 5)),
    ("LayerNorm", (5,), (3, 4, 5)), ("InstanceNorm2d", (4, True), (3, 4, 5, 5)),
    ("BatchNormAct2d", (4,), (3, 4, 5, 5)),
])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_dtypes_match_torch(cls, args, shape, in_dtype):
    ours = getattr(normkit, cls)(*args)
    theirs = (tnn.BatchNorm2d(*args) if cls == "BatchNormAct2d" else getattr(tnn, cls)(*args))
    x = torch.randn(shape).to(in_dtype)
    results = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xi)
        y.float().sum().backward()
        results.append((y.dtype, xi.grad.dtype, [p.grad.dtype for p in m.parameters()]))
    assert results[0] == results[1]


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _, shape = _pair("resnet_block")
    model(torch.randn(shape))
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = copy.deepcopy(model)
    for t in fresh.state_dict().values():
        t.zero_()
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for (k, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def traced_graph(model, x) -> str:
    """The graphs torch.compile(fullgraph=True) hands its backend for a forward and backward."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch.compile(model, fullgraph=True, backend=capture)(x.requires_grad_()).sum().backward()
    return "\n".join(graphs)


def test_compiled_graph_calls_normkit_kernels():
    """The traced graph holds normkit's custom ops (numba kernels), not torch's norm ops."""
    ours, _, shape = _pair("resnet_block")
    graph = traced_graph(ours, torch.randn(shape))
    assert "normkit.cpu_normalize_forward" in graph
    assert "batch_norm" not in graph and "group_norm" not in graph


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree."""
    from normkit.backends import cpu_ops
    from normkit.backends.plan import plan_for

    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    plan = plan_for(x, (0, 2, 3), (1, 3, 1, 1))
    sizes = [plan.A, plan.M, plan.J, plan.S, plan.Wm]
    torch.library.opcheck(cpu_ops.normalize_forward, (x, w, b, None, None, 1e-5, plan.kind, sizes))
