"""Tensors beyond 2^31 elements (opt-in: they need most of a 24 GB machine's memory)."""

import os

import pytest
import torch

import normkit


@pytest.mark.skipif(os.environ.get("NORMKIT_BIG_TESTS") != "1",
                    reason="needs ~18 GB of memory: run with NORMKIT_BIG_TESTS=1")
def test_more_than_2_31_elements_index_correctly():
    """A float32 BatchNorm1d input of 2^31 + 16 elements (the numba kernels' 64-bit indexing).

    Channel 0 alternates 3, 1 (mean 2, variance 1); channel 1 alternates 5, -5 (mean 0,
    variance 25); the outputs at the far end of the tensor must be exactly normalized."""
    length = (1 << 30) + 8
    x = torch.empty(1, 2, length)
    x[0, 0].fill_(1.0)
    x[0, 0, ::2] = 3.0
    x[0, 1].fill_(-5.0)
    x[0, 1, ::2] = 5.0
    assert x.numel() > 2**31
    m = normkit.BatchNorm1d(2, momentum=1.0)
    with torch.no_grad():
        y = m(x)
    del x
    expected = torch.tensor([1 / (1 + 1e-5) ** 0.5, 5 / (25 + 1e-5) ** 0.5])
    for c in range(2):
        tail = y[0, c, -4:]
        torch.testing.assert_close(tail, expected[c] * torch.tensor([1.0, -1.0, 1.0, -1.0]))
        sample = y[0, c, :: 1 << 20]
        torch.testing.assert_close(sample, torch.full_like(sample, float(expected[c])))
    torch.testing.assert_close(m.running_mean, torch.tensor([2.0, 0.0]))
    var = torch.tensor([1.0, 25.0]) * length / (length - 1)
    torch.testing.assert_close(m.running_var, var)
