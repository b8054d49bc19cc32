"""The CPU output-buffer pool: reuses released memory, never memory still in use."""

import gc

import pytest
import torch

import normkit
from normkit.backends import cpu_buffers


def test_released_buffer_is_reused_and_live_one_is_not():
    cpu_buffers.clear()
    x = torch.randn(8, 64, 64, 64)  # 8 MiB: above the pool's threshold
    like = torch.empty_like(x)
    a = cpu_buffers.empty_like(like)
    b = cpu_buffers.empty_like(like)
    assert a.data_ptr() != b.data_ptr()
    ptr = a.data_ptr()
    del a
    gc.collect()
    c = cpu_buffers.empty_like(like)
    assert c.data_ptr() == ptr
    assert c.data_ptr() != b.data_ptr()


def test_views_keep_the_buffer_alive():
    cpu_buffers.clear()
    like = torch.empty(8, 64, 64, 64)
    a = cpu_buffers.empty_like(like)
    view = a[1:3]
    ptr = a.data_ptr()
    del a
    gc.collect()
    d = cpu_buffers.empty_like(like)
    assert d.data_ptr() != ptr
    assert view.data_ptr() == ptr + 64 * 64 * 64 * 4


def test_layout_and_values_of_pooled_outputs():
    x = torch.randn(8, 32, 64, 64).contiguous(memory_format=torch.channels_last)
    out = cpu_buffers.empty_like(x)
    assert out.stride() == x.stride() and out.dtype == x.dtype
    y = normkit.BatchNorm2d(32)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    t = torch.nn.BatchNorm2d(32)(x)
    torch.testing.assert_close(y, t, rtol=1e-5, atol=1e-5)


def test_cache_can_be_disabled(monkeypatch):
    monkeypatch.setattr(cpu_buffers, "max_bytes", 0)
    like = torch.empty(8, 64, 64, 64)
    a = cpu_buffers.empty_like(like)
    assert a.is_contiguous() and a.shape == like.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_converted_is_pooled_and_differentiable(dtype):
    """`converted`: t.to(dtype) into pooled memory (layout kept, released memory reused, also
    for dtypes numpy lacks); its backward converts the grad back, any grad layout."""
    cpu_buffers.clear()
    x = torch.randn(8, 64, 64, 64).contiguous(memory_format=torch.channels_last)  # 4 MiB low
    low = cpu_buffers.converted(x, dtype)
    assert low.dtype == dtype and low.stride() == x.stride() and torch.equal(low, x.to(dtype))
    ptr = low.data_ptr()
    del low
    gc.collect()
    assert cpu_buffers.converted(x, dtype).data_ptr() == ptr
    leaf = x.to(dtype).requires_grad_()
    wide = cpu_buffers.converted(leaf, torch.float32)
    grad = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    wide.backward(grad)
    assert leaf.grad.dtype == dtype and torch.equal(leaf.grad, grad.to(dtype))
    leaf.grad = None
    cpu_buffers.converted(leaf, torch.float32).sum().backward()  # an expanded (stride 0) grad
    assert torch.equal(leaf.grad, torch.ones_like(leaf))
