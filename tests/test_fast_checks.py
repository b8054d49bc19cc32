"""The cheap argument tests that let a common call skip normkit's full checks accept only calls
torch accepts."""

import itertools

import pytest
import torch
import torch.nn.functional as tF

from normkit import _checks

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _torch_accepts(call) -> bool:
    try:
        call()
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return False
    return True


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_plain_batch_norm_calls_are_calls_torch_accepts(x_dtype, training):
    """Every mix of dtypes (or absence) of running mean, running var, weight and bias: where the
    fast test passes a call, torch's batch_norm runs it; and the fast test passes the common
    ones: all per-channel tensors of x's dtype, or all float32 for float16 / bfloat16 x."""
    x = torch.randn(4, 3, 5).to(x_dtype)
    choices = [None, *DTYPES]
    passed = 0
    for dtypes in itertools.product(choices, repeat=4):
        mean, var, weight, bias = (None if d is None else torch.rand(3).to(d) + 0.5
                                   for d in dtypes)
        fast = _checks.plain_batch_norm_call(x, mean, var, weight, bias, training, 1e-5)
        if fast:
            passed += 1
            assert _torch_accepts(lambda: tF.batch_norm(x, mean, var, weight, bias, training)), \
                dtypes
        defined = {d for d in dtypes if d is not None}
        common = defined <= {x_dtype} or (
            defined == {torch.float32} and x_dtype in (torch.float16, torch.bfloat16))
        stats_ok = training or (dtypes[0] is not None and dtypes[1] is not None)
        paired = (dtypes[0] is None) == (dtypes[1] is None)
        assert fast == (common and stats_ok and paired), dtypes
    assert passed > 0
