"""InstanceNorm1d/2d/3d, GroupNorm and LayerNorm against torch, live, step by step."""

import itertools

import pytest
import torch

from parity import float64_oracle, make_pair, run_steps

pytestmark = pytest.mark.usefixtures("backend")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _steps(shape, dtype, modes=("train", "train", "eval", "train", "eval"), fmt=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for i, mode in enumerate(modes):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + i) - 2 * i).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        steps.append((mode, x))
    return steps


def _module_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _oracle(t, dtype):
    return float64_oracle(t) if dtype in (torch.float16, torch.bfloat16) else None


IN_SHAPES = {
    "InstanceNorm1d": [(3, 4, 7), (4, 7)],
    "InstanceNorm2d": [(2, 3, 4, 5), (3, 4, 5)],
    "InstanceNorm3d": [(2, 2, 3, 4, 3), (2, 3, 4, 3)],
}
IN_FLAGS = [(False, False), (True, False), (False, True), (True, True)]  # (affine, trs)


@pytest.mark.parametrize(
    "cls_name,shape,dtype,flags,momentum",
    [
        (c, s, d, f, m)
        for c, shapes in IN_SHAPES.items()
        for s, d, f in itertools.product(shapes, DTYPES, IN_FLAGS)
        for m in ([0.1, None] if f[1] else [0.1])
    ],
)
def test_instancenorm_matches_torch(cls_name, shape, dtype, flags, momentum):
    affine, trs = flags
    channels = shape[1] if len(shape) == int(cls_name[-2]) + 2 else shape[0]
    t, n = make_pair(cls_name, channels, affine=affine, track_running_stats=trs,
                     momentum=momentum, dtype=_module_dtype(dtype))
    run_steps(t, n, _steps(shape, dtype), _oracle(t, dtype))


@pytest.mark.parametrize("affine", [False, True])
def test_instancenorm_channels_last_gives_contiguous(affine):
    t, n = make_pair("InstanceNorm2d", 3, affine=affine, track_running_stats=True)
    run_steps(t, n, _steps((2, 3, 4, 5), torch.float32, fmt=torch.channels_last))


def test_instancenorm_channel_mismatch_warns_and_normalizes():
    t, n = make_pair("InstanceNorm1d", 3)
    run_steps(t, n, _steps((2, 5, 6), torch.float32))


GN_CASES = [  # (num_groups, channels, shape)
    (1, 4, (3, 4)),
    (2, 4, (3, 4, 5)),
    (4, 4, (2, 4, 3, 3)),
    (3, 6, (2, 6, 2, 3, 2)),
    (2, 6, (1, 6, 7)),
]


@pytest.mark.parametrize("groups,channels,shape", GN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,bias", [(True, True), (False, True), (True, False)])
def test_groupnorm_matches_torch(groups, channels, shape, dtype, affine, bias):
    t, n = make_pair("GroupNorm", groups, channels, affine=affine, bias=bias,
                     dtype=_module_dtype(dtype))
    run_steps(t, n, _steps(shape, dtype, modes=("train", "eval")), _oracle(t, dtype))


@pytest.mark.parametrize("fmt,shape", [(torch.channels_last, (2, 6, 3, 4)),
                                       (torch.channels_last_3d, (2, 6, 2, 3, 4))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groupnorm_keeps_channels_last(fmt, shape, dtype):
    t, n = make_pair("GroupNorm", 3, 6)
    run_steps(t, n, _steps(shape, dtype, modes=("train", "eval"), fmt=fmt), _oracle(t, dtype))


def test_groupnorm_one_element_groups_give_exactly_bias():
    """Deliberate difference: torch leaves ~1e-5 of rounding noise, normkit returns the bias."""
    t, n = make_pair("GroupNorm", 4, 4)
    x = torch.randn(2, 4)
    y_t, y_n = t(x), n(x)
    assert torch.equal(y_n, n.bias.expand(2, 4))
    assert torch.allclose(y_t, y_n, atol=1e-4, rtol=0)


LN_CASES = [  # (normalized_shape, input shape)
    (5, (4, 5)),
    ((5,), (5,)),
    ([3, 4], (2, 3, 4)),
    (torch.Size([2, 3, 4]), (2, 2, 3, 4)),
    (7, (2, 3, 7)),
]


@pytest.mark.parametrize("normalized_shape,shape", LN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,bias", [(True, True), (False, True), (True, False)])
def test_layernorm_matches_torch(normalized_shape, shape, dtype, affine, bias):
    t, n = make_pair("LayerNorm", normalized_shape, elementwise_affine=affine, bias=bias,
                     dtype=_module_dtype(dtype))
    run_steps(t, n, _steps(shape, dtype, modes=("train", "eval")), _oracle(t, dtype))


def test_layernorm_on_channels_last_tensor_gives_contiguous():
    t, n = make_pair("LayerNorm", [3, 4])
    run_steps(t, n, _steps((2, 5, 3, 4), torch.float32, modes=("train",), fmt=torch.channels_last))


@pytest.mark.parametrize(
    "cls_name,args,shape",
    [
        ("GroupNorm", (2, 4), (0, 4, 3)),
        ("LayerNorm", (5,), (0, 5)),
        ("InstanceNorm1d", (3,), (0, 3, 4)),
        ("InstanceNorm2d", (3,), (2, 3, 0, 4)),
    ],
)
def test_zero_sized_inputs(cls_name, args, shape):
    t, n = make_pair(cls_name, *args)
    run_steps(t, n, [("train", torch.randn(shape)), ("eval", torch.randn(shape))])
