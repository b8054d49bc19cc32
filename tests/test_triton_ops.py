"""The Triton kernels as torch.library.triton_op operators (normkit.backends.gpu_ops), and the
Triton backend inside torch.compile / torch.export / CUDA autocast.

Without CUDA the operators run eagerly on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1); tracing them needs compiled kernels, so those tests need a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as tnn
from test_ecosystem import MODELS, _pair, assert_steps_match, traced_graph

import normkit
from normkit.backends import gpu
from normkit.backends.plan import plan_for

pytest.importorskip("triton")
if not hasattr(torch.library, "triton_op"):
    pytest.skip("torch.library.triton_op needs torch >= 2.6", allow_module_level=True)

from normkit.backends import gpu_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {  # name: (input shape, memory format, reduced dims, parameter shape)
    "batchnorm": ((4, 3, 5, 5), torch.contiguous_format, (0, 2, 3), (1, 3, 1, 1)),
    "batchnorm_cl": ((4, 3, 5, 5), torch.channels_last, (0, 2, 3), (1, 3, 1, 1)),
    "layernorm": ((6, 7), torch.contiguous_format, (1,), (1, 7)),
}


def _inputs(name, dtype=torch.float64):
    shape, fmt, dims, pshape = CASES[name]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=fmt)
    channels = pshape[1]
    w, b = (torch.randn(channels, generator=gen, dtype=dtype) for _ in range(2))
    plan = plan_for(x, dims, pshape)
    sizes = [plan.A, plan.M, plan.J, plan.S, plan.Wm]
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, b)]
    return leaves, dims, plan.kind, sizes


@pytest.mark.parametrize("name", list(CASES))
def test_operator_matches_the_eager_launch(name):
    """The operator and its registered backward give what gpu.normalize gives eagerly."""
    (x, w, b), dims, kind, sizes = _inputs(name)
    shape = None if name == "layernorm" else (3, 1, 1)
    results = []
    with normkit.use_backend("triton"):
        for call in ("op", "eager"):
            xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
            if call == "op":
                y, stats, _ = gpu_ops.normalize_forward(xi, wi, bi, None, None, 1e-5, kind,
                                                        sizes)
                mean = stats[0]
            else:
                y, mean, _ = gpu.normalize(xi, wi.view(shape) if shape else wi,
                                           bi.view(shape) if shape else bi, dims, 1e-5,
                                           with_stats=True)
            y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device)
                       .view(y.shape))
            results.append((y, mean, xi.grad, wi.grad, bi.grad))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e.reshape(a.shape), rtol=1e-12, atol=1e-12)


def test_operators_pass_opcheck():
    (x, w, b), _, kind, sizes = _inputs("batchnorm", torch.float32)
    # FakeTensor tracing of the launches needs compiled (not interpreted) kernels.
    utils = None if DEVICE == "cuda" else ("test_schema", "test_autograd_registration")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(gpu_ops.normalize_forward, (x, w, b, None, None, 1e-5, kind, sizes),
                          **kwargs)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("train", [True, False])
def test_inductor_compiles_the_kernels_into_the_graph(name, train):
    """fullgraph torch.compile on CUDA: same results as torch's eager layers, and Inductor's
    generated code launches normkit's Triton kernels."""
    from torch._inductor.utils import run_and_get_code

    ours, theirs, shape = _pair(name)
    ours, theirs = ours.cuda().train(train), theirs.cuda()
    compiled = torch.compile(ours, fullgraph=True)
    _, code = run_and_get_code(compiled, torch.randn(shape, device="cuda", requires_grad=True))
    assert any("rows_forward" in c or "mid_" in c for c in code), "no normkit kernel"
    ours.load_state_dict(theirs.state_dict())  # undo that forward's running-statistics update
    assert_steps_match(compiled, ours, theirs, shape, train, device="cuda", atol=1e-4)


@pytest.mark.needs_cuda
def test_traced_graph_holds_the_triton_operator():
    ours, _, shape = _pair("resnet_block")
    graph = traced_graph(ours.cuda(), torch.randn(shape, device="cuda"))
    assert "normkit.triton_normalize_forward" in graph
    assert "batch_norm" not in graph and "group_norm" not in graph


@pytest.mark.needs_cuda
@pytest.mark.parametrize("name", list(MODELS))
def test_export_on_cuda_matches_eager(name):
    ours, _, shape = _pair(name)
    ours = ours.cuda()
    ours(torch.randn(shape, device="cuda"))
    ours.eval()
    x = torch.randn(shape, device="cuda")
    exported = torch.export.export(ours, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert any(t.startswith("normkit.triton_normalize_forward") for t in targets), targets
    torch.testing.assert_close(exported.module()(x), ours(x), rtol=1e-6, atol=1e-6)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("cls,args,shape", [
    ("BatchNorm2d", (4,), (3, 4, 5, 5)), ("GroupNorm", (2, 4), (3, 4, 5, 5)),
    ("LayerNorm", (5,), (3, 4, 5)), ("InstanceNorm2d", (4, True), (3, 4, 5, 5)),
])
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_dtype", [torch.float32, "autocast"])
def test_cuda_autocast_dtypes_and_values_match_torch(cls, args, shape, autocast_dtype,
                                                     in_dtype):
    """Under CUDA autocast each layer returns torch's output dtype and grad dtypes, and the
    same values to the output dtype's precision."""
    torch.manual_seed(0)
    theirs = getattr(tnn, cls)(*args).cuda()
    ours = getattr(normkit, cls)(*args).cuda()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, device="cuda").to(autocast_dtype if in_dtype == "autocast" else
                                             torch.float32)
    results = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=autocast_dtype):
            y = m(xi)
        y.float().square().sum().backward()
        results.append((y, xi.grad, [p.grad for p in m.parameters()]))
    (y_o, g_o, p_o), (y_t, g_t, p_t) = results
    assert (y_o.dtype, g_o.dtype, [p.dtype for p in p_o]) == (
        y_t.dtype, g_t.dtype, [p.dtype for p in p_t])
    tol = 2e-2 if y_t.dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(y_o, y_t, rtol=tol, atol=tol)
    torch.testing.assert_close(g_o, g_t, rtol=tol, atol=tol * 10)
