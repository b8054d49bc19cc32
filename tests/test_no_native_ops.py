"""No aten normalization op is dispatched by any normkit layer: the math is ours."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normkit

FORBIDDEN = ("batch_norm", "layer_norm", "group_norm", "instance_norm")


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


LAYERS = [
    (lambda: normkit.BatchNorm1d(3), (4, 3, 5)),
    (lambda: normkit.BatchNorm2d(3), (4, 3, 5, 5)),
    (lambda: normkit.BatchNorm3d(3), (2, 3, 2, 3, 3)),
    (lambda: normkit.LazyBatchNorm2d(), (4, 3, 5, 5)),
    (lambda: normkit.SyncBatchNorm(3), (4, 3, 5, 5)),
    (lambda: normkit.GroupNorm(3, 6), (2, 6, 4, 4)),
    (lambda: normkit.LayerNorm([4, 4]), (2, 6, 4, 4)),
    (lambda: normkit.InstanceNorm2d(3, affine=True, track_running_stats=True), (2, 3, 4, 4)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend_name", [None, "triton"])
def test_no_native_normalization_op(make, shape, mode, backend_name):
    m = make()
    m(torch.randn(shape))  # materialise lazy modules outside the recording
    m.train(mode == "train")
    x = torch.randn(shape, dtype=torch.float32, requires_grad=True)
    with normkit.use_backend(backend_name), RecordOps() as rec:
        y = m(x)
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        gx.sum().backward()
    assert rec.names, "the recorder saw nothing"
    assert any("mean" in n or "sum" in n for n in rec.names)
    bad = [n for n in rec.names if any(f in n for f in FORBIDDEN)]
    assert not bad, bad


def test_recorder_catches_torch_native_op():
    """The recorder is able to see torch's own batch norm, so the test above can fail."""
    with RecordOps() as rec:
        torch.nn.BatchNorm2d(3)(torch.randn(2, 3, 2, 2))
    assert any("batch_norm" in n for n in rec.names)
