import pytest
import torch

import normkit

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
