import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before
# the kernels are first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import normkit  # noqa: E402

# Parity tests run once per backend: the automatic choice (the numba CPU kernels for
# float32/float64) and the reference backend forced, as `NORMKIT_BACKEND=reference` would.
BACKENDS = ["auto", "reference"]


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    with normkit.use_backend(None if request.param == "auto" else request.param):
        yield request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: runs only where a CUDA device is present")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)
