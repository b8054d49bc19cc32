"""Everything about normkit's classes besides the arithmetic: they are torch's classes."""

import copy
import inspect
import io
import pickle

import pytest
import torch
import torch.nn as tnn

import normkit
from parity import NORMKIT, TORCH, make_pair, run_steps

CLASSES = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
    "LazyBatchNorm3d", "SyncBatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d",
]
CTOR_ARGS = {
    "GroupNorm": (2, 4), "LayerNorm": (4,),
    "LazyBatchNorm1d": (), "LazyBatchNorm2d": (), "LazyBatchNorm3d": (),
}


def _build(lib, name, **kwargs):
    return getattr(lib.nn, name)(*CTOR_ARGS.get(name, (4,)), **kwargs)


@pytest.mark.parametrize("name", CLASSES)
def test_subclass_and_signature(name):
    nk_cls, torch_cls = getattr(normkit, name), getattr(tnn, name)
    assert issubclass(nk_cls, torch_cls)
    assert inspect.signature(nk_cls) == inspect.signature(torch_cls)
    if name.startswith(("BatchNorm", "Sync", "Lazy")):
        assert issubclass(nk_cls, tnn.modules.batchnorm._BatchNorm)
    if name.startswith("Instance"):
        assert not issubclass(nk_cls, tnn.modules.batchnorm._BatchNorm)


KWARG_SETS = [
    {}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}, {"eps": 1e-3},
    {"bias": False}, {"dtype": torch.float64},
]


def _applicable(name, kwargs):
    """GroupNorm and LayerNorm take no momentum / track_running_stats."""
    return not (name in ("GroupNorm", "LayerNorm")
                and ("momentum" in kwargs or "track_running_stats" in kwargs))


@pytest.mark.parametrize(
    "name,kwargs",
    [(n, k) for n in CLASSES for k in KWARG_SETS if _applicable(n, k)],
    ids=str,
)
def test_state_dict_repr_and_attributes(name, kwargs):
    if name == "LayerNorm" and "affine" in kwargs:
        kwargs = {"elementwise_affine": kwargs["affine"]}
    t, n = _build(TORCH, name, **kwargs), _build(NORMKIT, name, **kwargs)
    assert repr(n) == repr(t)
    ts, ns = t.state_dict(), n.state_dict()
    assert list(ns) == list(ts)
    assert ns._metadata == ts._metadata
    for key in ts:
        if isinstance(ts[key], tnn.parameter.UninitializedTensorMixin):
            assert type(ns[key]) is type(ts[key])
            continue
        assert ns[key].dtype == ts[key].dtype and torch.equal(ns[key], ts[key]), key
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                 "num_groups", "num_channels", "normalized_shape", "elementwise_affine",
                 "process_group"):
        assert getattr(n, attr, "absent") == getattr(t, attr, "absent"), attr
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(n, attr, "absent") is None) == (getattr(t, attr, "absent") is None), attr


@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d", "GroupNorm", "LayerNorm"])
def test_pickle_deepcopy_and_weights_only_load(name):
    kwargs = {"affine": True, "track_running_stats": True} if name == "InstanceNorm2d" else {}
    n = _build(NORMKIT, name, **kwargs)
    x = torch.randn(3, 4, 4, 4)
    n(x)
    for clone in (pickle.loads(pickle.dumps(n)), copy.deepcopy(n)):
        assert type(clone) is type(n)
        for (k, a), (_, b) in zip(clone.state_dict().items(), n.state_dict().items()):
            assert torch.equal(a, b), k
        n.eval(), clone.eval()
        assert torch.equal(clone(x), n(x))
        n.train()
    buf = io.BytesIO()
    torch.save(n.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = _build(NORMKIT, name, **kwargs)
    fresh.load_state_dict(loaded)


@pytest.mark.parametrize("version", [None, 1])
def test_old_checkpoint_without_num_batches_tracked(version):
    results = []
    for lib in (TORCH, NORMKIT):
        m = lib.nn.BatchNorm2d(3)
        m.num_batches_tracked.fill_(7)
        sd = m.state_dict()
        del sd["num_batches_tracked"]
        if version is None:
            del sd._metadata[""]["version"]
        else:
            sd._metadata[""]["version"] = version
        m.load_state_dict(sd)
        results.append(int(m.num_batches_tracked))
    assert results[0] == results[1] == 7


def test_version_2_checkpoint_missing_counter_fails_like_torch():
    messages = []
    for lib in (TORCH, NORMKIT):
        m = lib.nn.BatchNorm2d(3)
        sd = m.state_dict()
        del sd["num_batches_tracked"]
        with pytest.raises(RuntimeError) as info:
            m.load_state_dict(sd)
        messages.append(str(info.value).replace(type(m).__name__, "BN"))
        assert m.load_state_dict(sd, strict=False).missing_keys == ["num_batches_tracked"]
    assert messages[0] == messages[1]


def test_instancenorm_pre_0_4_checkpoint_error():
    messages = []
    for lib in (TORCH, NORMKIT):
        sd = lib.nn.InstanceNorm2d(3, track_running_stats=True).state_dict()
        del sd._metadata[""]["version"]
        with pytest.raises(RuntimeError) as info:
            lib.nn.InstanceNorm2d(3).load_state_dict(sd)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "before 0.4.0" in messages[0]


def test_reset_running_stats_and_parameters():
    t, n = make_pair("BatchNorm2d", 3)
    for m in (t, n):
        m(torch.randn(4, 3, 2, 2))
        m.reset_running_stats()
    run_steps(t, n, [("eval", torch.randn(4, 3, 2, 2))])
    for m in (t, n):
        m.reset_parameters()
    run_steps(t, n, [("train", torch.randn(4, 3, 2, 2))])


def test_torch_state_dict_loads_into_normkit_and_back():
    t, n = make_pair("BatchNorm2d", 3)
    t(torch.randn(4, 3, 2, 2))
    n.load_state_dict(t.state_dict())
    back = tnn.BatchNorm2d(3)
    back.load_state_dict(n.state_dict())
    for (k, a), (_, b) in zip(back.state_dict().items(), t.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_conversion_keeps_counter_int64(dtype):
    n = normkit.BatchNorm2d(3).to(dtype)
    assert n.weight.dtype == n.running_mean.dtype == dtype
    assert n.num_batches_tracked.dtype == torch.int64
    n(torch.randn(4, 3, 2, 2, dtype=dtype))
    assert int(n.num_batches_tracked) == 1


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lazy_materialises_and_becomes_normkit_class(rank, mode):
    name = f"LazyBatchNorm{rank}d"
    t, n = _build(TORCH, name), _build(NORMKIT, name)
    shape = (4, 5) + (3,) * rank
    if rank == 1:
        shape = (4, 5, 3)
    x = torch.randn(shape)
    for m in (t, n):
        m.train(mode == "train")
        assert m.has_uninitialized_params()
        m(x.clone())
    assert type(n) is getattr(normkit, f"BatchNorm{rank}d")
    assert type(t) is getattr(tnn, f"BatchNorm{rank}d")
    assert n.num_features == t.num_features == 5
    run_steps(t, n, [("train", x), ("eval", x)])


def test_lazy_rank_error_after_materialisation():
    t, n = _build(TORCH, "LazyBatchNorm2d"), _build(NORMKIT, "LazyBatchNorm2d")
    for m in (t, n):
        with pytest.raises(ValueError, match="expected 4D input"):
            m(torch.randn(2, 5, 3))
    assert type(n) is normkit.BatchNorm2d and n.num_features == t.num_features == 5


def test_lazy_without_params_or_stats_keeps_zero_features():
    t = tnn.LazyBatchNorm2d(affine=False, track_running_stats=False)
    n = normkit.LazyBatchNorm2d(affine=False, track_running_stats=False)
    x = torch.randn(2, 5, 3, 3)
    assert torch.allclose(n(x), t(x), atol=1e-6)
    assert type(n) is normkit.BatchNorm2d and n.num_features == t.num_features == 0


def test_lazy_dtype_kwarg():
    n = normkit.LazyBatchNorm1d(dtype=torch.float64)
    n(torch.randn(3, 4, dtype=torch.float64))
    assert n.weight.dtype == n.running_var.dtype == torch.float64
    assert n.num_batches_tracked.dtype == torch.int64


def test_meta_device_then_to_empty_and_reset():
    for name in ("BatchNorm2d", "GroupNorm", "LayerNorm", "InstanceNorm2d"):
        kwargs = {"affine": True, "track_running_stats": True} if name == "InstanceNorm2d" else {}
        n = _build(NORMKIT, name, device="meta", **kwargs)
        n.to_empty(device="cpu")
        n.reset_parameters()
        t = _build(TORCH, name, **kwargs)
        run_steps(t, n, [("train", torch.randn(3, 4, 4, 4)), ("eval", torch.randn(3, 4, 4, 4))])


def test_running_stats_update_under_no_grad_and_inference_mode():
    t, n = make_pair("BatchNorm2d", 3)
    x = torch.randn(4, 3, 2, 2)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            yt, yn = t(x), n(x)
        assert torch.allclose(yt, yn, atol=1e-6)
        assert torch.allclose(t.running_var, n.running_var, atol=1e-7)
        assert int(t.num_batches_tracked) == int(n.num_batches_tracked)
        assert not n.running_mean.requires_grad
