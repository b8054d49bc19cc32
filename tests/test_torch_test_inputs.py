"""torch's own test inputs (module_db, module error inputs, op_db) run on torch and normkit."""

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import normkit
import normkit.functional as nF
from parity import assert_matches, assert_same_exception

pytestmark = pytest.mark.usefixtures("backend")

NAMES = {
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
    "LazyBatchNorm3d", "SyncBatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d",
}
MODULE_INFOS = [m for m in module_db if m.module_cls.__name__ in NAMES]
OPS = {
    "nn.functional.batch_norm": nF.batch_norm,
    "nn.functional.instance_norm": nF.instance_norm,
    "nn.functional.layer_norm": nF.layer_norm,
    "nn.functional.group_norm": nF.group_norm,
}
OP_INFOS = [op for op in op_db if op.name in OPS]


def _clone(value):
    if isinstance(value, torch.Tensor):
        c = value.detach().clone()
        return c.requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _leaves(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    return []


def test_inputs_were_found():
    assert {m.module_cls.__name__ for m in MODULE_INFOS} >= {"BatchNorm2d", "GroupNorm", "LayerNorm"}
    assert {op.name for op in OP_INFOS} == set(OPS)


@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_module_db_inputs(info, dtype, training):
    nk_cls = getattr(normkit, info.module_cls.__name__)
    inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                     training=training)
    assert inputs
    for module_input in inputs:
        ctor, fwd = module_input.constructor_input, module_input.forward_input
        torch.manual_seed(0)
        t = info.module_cls(*ctor.args, **ctor.kwargs).to(dtype)
        n = nk_cls(*ctor.args, **ctor.kwargs).to(dtype)
        if not any(isinstance(p, torch.nn.parameter.UninitializedTensorMixin)
                   for p in list(t.parameters()) + list(t.buffers())):
            n.load_state_dict(t.state_dict())
        t.train(training), n.train(training)
        args_t, args_n = _clone(fwd.args), _clone(fwd.args)
        out_t = t(*args_t, **_clone(fwd.kwargs))
        out_n = n(*args_n, **_clone(fwd.kwargs))
        assert_matches(out_n, out_t, what=f"{module_input.desc} output")
        if out_t.requires_grad:
            grad = torch.randn_like(out_t)
            out_t.backward(grad)
            out_n.backward(grad)
            for a, b in zip(_leaves(args_n), _leaves(args_t)):
                assert_matches(a.grad, b.grad, what=f"{module_input.desc} input grad")
        for (name, a), (_, b) in zip(
            list(n.named_parameters()) + list(n.named_buffers()),
            list(t.named_parameters()) + list(t.named_buffers()),
        ):
            assert_matches(a, b, what=name)
            if isinstance(b, torch.nn.Parameter):
                assert_matches(a.grad, b.grad, what=f"{name}.grad")


@pytest.mark.parametrize(
    "info", [m for m in MODULE_INFOS if m.module_error_inputs_func], ids=lambda m: m.name
)
@pytest.mark.parametrize("training", [True, False])
def test_module_error_inputs(info, training):
    nk_cls = getattr(normkit, info.module_cls.__name__)
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                           requires_grad=False, training=training)
    assert errors
    for err in errors:
        ctor = err.module_error_input.constructor_input
        fwd = err.module_error_input.forward_input

        def run(cls):
            m = cls(*ctor.args, **ctor.kwargs)
            if err.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
                return m
            m.train(training)
            return m(*_clone(fwd.args), **_clone(fwd.kwargs))

        # Same outcome, type and message as torch. torch's own error inputs assume training
        # mode (in eval, eps=0 is accepted), so torch decides what is expected.
        outcome = assert_same_exception(lambda: run(info.module_cls), lambda: run(nk_cls))
        if training:
            assert outcome == "raise"


@pytest.mark.parametrize("op", OP_INFOS, ids=lambda o: f"{o.name}.{o.variant_test_name}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_op_db_samples(op, dtype):
    ours = OPS[op.name]
    samples = list(op.sample_inputs(device="cpu", dtype=dtype, requires_grad=True))
    assert samples
    for sample in samples:
        t_in, t_args, t_kw = _clone((sample.input, sample.args, sample.kwargs))
        n_in, n_args, n_kw = _clone((sample.input, sample.args, sample.kwargs))
        out_t = op.op(t_in, *t_args, **t_kw)
        out_n = ours(n_in, *n_args, **n_kw)
        # op_db feeds low-precision params too; judge bf16 against a float64 torch run.
        oracle = None
        if dtype == torch.bfloat16:
            o_in, o_args, o_kw = _clone((sample.input, sample.args, sample.kwargs))
            to64 = lambda v: v.detach().double().requires_grad_(v.requires_grad)  # noqa: E731
            o_in = to64(o_in)
            o_args = [to64(a) if isinstance(a, torch.Tensor) else a for a in o_args]
            o_kw = {k: to64(v) if isinstance(v, torch.Tensor) else v for k, v in o_kw.items()}
            oracle = op.op(o_in, *o_args, **o_kw).detach()
        assert_matches(out_n, out_t, oracle, what=f"{sample} output")
        # Running statistics (mutated in place) must match too.
        for a, b in zip(_leaves((n_args, n_kw)), _leaves((t_args, t_kw))):
            if not b.requires_grad:
                assert_matches(a, b, what="running stat", rtol=1e-2 if dtype == torch.bfloat16 else None)
        if dtype != torch.bfloat16:
            grad = torch.randn_like(out_t)
            out_t.backward(grad)
            out_n.backward(grad)
            for a, b in zip(_leaves((n_in, n_args, n_kw)), _leaves((t_in, t_args, t_kw))):
                if b.requires_grad:
                    assert_matches(a.grad, b.grad, what="grad")


@pytest.mark.parametrize(
    "op", [o for o in OP_INFOS if o.error_inputs_func], ids=lambda o: o.name
)
def test_op_db_error_inputs(op):
    ours = OPS[op.name]
    errors = list(op.error_inputs(device="cpu"))
    assert errors
    for err in errors:
        s = err.sample_input
        kind = assert_same_exception(
            lambda: op.op(*_clone((s.input, *s.args)), **_clone(s.kwargs)),
            lambda: ours(*_clone((s.input, *s.args)), **_clone(s.kwargs)),
        )
        assert kind == "raise"
