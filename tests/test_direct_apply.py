"""`direct_apply(F)` behaves as `F.apply`: same values and grads on plain tensors, and the same
path as `F.apply` for functorch tensors and inside functorch transforms."""

import pytest
import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from normkit.backends.direct_apply import direct_apply


class _Scale(torch.autograd.Function):
    """y = x * factor, recording whether forward saw a functorch wrapper."""

    saw_wrapper: list[bool] = []

    @staticmethod
    def forward(ctx, x, factor):
        _Scale.saw_wrapper.append(is_functorch_wrapped_tensor(x))
        ctx.factor = factor
        return x * factor

    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.factor, None


def test_values_and_grads_equal_function_apply():
    x = torch.randn(4, 3, requires_grad=True)
    dy = torch.randn(4, 3)
    y_direct = direct_apply(_Scale)(x, 2.5)
    (g_direct,) = torch.autograd.grad(y_direct, x, dy)
    y_apply = _Scale.apply(x, 2.5)
    (g_apply,) = torch.autograd.grad(y_apply, x, dy)
    assert type(y_direct.grad_fn) is type(y_apply.grad_fn)
    assert torch.equal(y_direct, y_apply) and torch.equal(g_direct, g_apply)


def test_dead_functorch_wrappers_are_unwrapped_as_function_apply_does():
    escaped = []

    def f(x):
        escaped.append(x)
        return x.sum()

    torch.func.grad(f)(torch.randn(3))
    dead = escaped[0]
    assert is_functorch_wrapped_tensor(dead)
    _Scale.saw_wrapper.clear()
    direct_apply(_Scale)(dead, 2.0)
    _Scale.apply(dead, 2.0)
    assert _Scale.saw_wrapper == [False, False]


@pytest.mark.parametrize("captured", [False, True])
def test_inside_transforms_the_error_of_function_apply(captured):
    """Functions without setup_context cannot run under functorch transforms: the same error,
    also for a plain tensor captured from outside the transform."""
    x, outside = torch.randn(3), torch.randn(3)

    def loss(apply):
        return lambda t: apply(outside if captured else t, 2.0).sum() + t.sum()

    with pytest.raises(RuntimeError, match="setup_context") as direct:
        torch.func.grad(loss(direct_apply(_Scale)))(x)
    with pytest.raises(RuntimeError, match="setup_context") as applied:
        torch.func.grad(loss(_Scale.apply))(x)
    assert str(direct.value) == str(applied.value)
