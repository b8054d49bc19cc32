"""Bad input: normkit raises what torch raises (type and message) and leaves the same state."""

import pytest
import torch

from parity import NORMKIT, TORCH, assert_same_exception, compare_modules

pytestmark = pytest.mark.usefixtures("backend")


def x(*shape, dtype=torch.float32):
    return torch.arange(float(torch.Size(shape).numel())).reshape(shape).sin().to(dtype)


# Each case: (id, build(lib) -> (callable, modules whose state to compare afterwards)).
def _module_call(cls, *args, input, train=True, setup=None, **kwargs):
    def build(lib):
        m = getattr(lib.nn, cls)(*args, **kwargs)
        m.train(train)
        if setup is not None:
            setup(m)
        return (lambda: m(input.clone())), [m]
    return build


def _functional_call(name, *args, **kwargs):
    def build(lib):
        cloned = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return (lambda: getattr(lib.F, name)(*cloned, **kw)), []
    return build


def _construct(cls, *args, **kwargs):
    def build(lib):
        return (lambda: getattr(lib.nn, cls)(*args, **kwargs)), []
    return build


CASES = {
    # input rank
    "bn1d_4d": _module_call("BatchNorm1d", 3, input=x(2, 3, 4, 4)),
    "bn1d_1d": _module_call("BatchNorm1d", 3, input=x(3)),
    "bn2d_3d": _module_call("BatchNorm2d", 3, input=x(2, 3, 4)),
    "bn2d_3d_eval": _module_call("BatchNorm2d", 3, input=x(2, 3, 4), train=False),
    "bn3d_4d": _module_call("BatchNorm3d", 3, input=x(2, 3, 4, 4)),
    "in1d_4d": _module_call("InstanceNorm1d", 3, input=x(2, 3, 4, 4)),
    "in2d_2d": _module_call("InstanceNorm2d", 3, input=x(2, 3)),
    "in3d_3d": _module_call("InstanceNorm3d", 3, input=x(2, 3, 4)),
    "sync_1d": _module_call("SyncBatchNorm", 3, input=x(3)),
    "sync_zero_channels": _module_call("SyncBatchNorm", 3, input=x(2, 0, 4)),
    "gn_1d": _module_call("GroupNorm", 1, 3, input=x(3)),
    # one value per channel
    "bn1d_one_value": _module_call("BatchNorm1d", 3, input=x(1, 3)),
    "bn1d_one_value_L1": _module_call("BatchNorm1d", 3, input=x(1, 3, 1)),
    "bn2d_one_value": _module_call("BatchNorm2d", 3, input=x(1, 3, 1, 1)),
    "bn1d_one_value_eval_ok": _module_call("BatchNorm1d", 3, input=x(1, 3), train=False),
    "bn1d_one_value_trs_false_eval": _module_call(
        "BatchNorm1d", 3, input=x(1, 3), train=False, track_running_stats=False),
    "bn1d_one_value_momentum_none": _module_call("BatchNorm1d", 3, input=x(1, 3), momentum=None),
    "sync_one_value": _module_call("SyncBatchNorm", 3, input=x(1, 3)),
    "gn_one_value": _module_call("GroupNorm", 2, 2, input=x(1, 2)),
    "gn_one_value_eval": _module_call("GroupNorm", 4, 4, input=x(1, 4), train=False),
    "gn_one_per_group_ok": _module_call("GroupNorm", 4, 4, input=x(2, 4)),
    "in_one_spatial": _module_call("InstanceNorm1d", 3, input=x(2, 3, 1)),
    "in_one_spatial_unbatched": _module_call("InstanceNorm2d", 3, input=x(3, 1, 1)),
    "in_one_spatial_eval_trs": _module_call(
        "InstanceNorm1d", 3, input=x(2, 3, 1), train=False, track_running_stats=True),
    # eps
    "bn_eps_zero_train": _module_call("BatchNorm2d", 3, input=x(2, 3, 2, 2), eps=0.0),
    "bn_eps_negative_train": _module_call("BatchNorm2d", 3, input=x(2, 3, 2, 2), eps=-1.0),
    "bn_eps_zero_eval_ok": _module_call("BatchNorm2d", 3, input=x(2, 3, 2, 2), eps=0.0,
                                        train=False),
    "bn_eps_negative_eval": _module_call("BatchNorm2d", 3, input=x(2, 3, 2, 2), eps=-1.0,
                                         train=False),
    "in_eps_zero_ok": _module_call("InstanceNorm1d", 3, input=x(2, 3, 4), eps=0.0),
    "gn_eps_negative_ok": _module_call("GroupNorm", 1, 3, input=x(2, 3, 4), eps=-0.5),
    "ln_eps_negative_ok": _module_call("LayerNorm", 4, input=x(2, 3, 4), eps=-0.5),
    # channel mismatches
    "bn_channels": _module_call("BatchNorm2d", 3, input=x(2, 4, 2, 2)),
    "bn_channels_eval": _module_call("BatchNorm2d", 3, input=x(2, 4, 2, 2), train=False),
    "bn_channels_no_trs": _module_call("BatchNorm2d", 3, input=x(2, 4, 2, 2),
                                       track_running_stats=False),
    "bn_channels_nothing_ok": _module_call("BatchNorm2d", 3, input=x(2, 4, 2, 2),
                                           track_running_stats=False, affine=False),
    "bn_channels_empty_ok": _module_call("BatchNorm2d", 3, input=x(0, 4, 2, 2)),
    "in_channels_affine": _module_call("InstanceNorm1d", 3, input=x(2, 4, 5), affine=True),
    "in_channels_warn": _module_call("InstanceNorm1d", 3, input=x(2, 4, 5)),
    "in_channels_warn_unbatched": _module_call("InstanceNorm1d", 3, input=x(4, 5)),
    "in_channels_trs": _module_call("InstanceNorm1d", 3, input=x(2, 4, 5),
                                    track_running_stats=True),
    "gn_channels": _module_call("GroupNorm", 2, 6, input=x(2, 4, 5)),
    "gn_channels_no_affine_ok": _module_call("GroupNorm", 2, 6, input=x(2, 4, 5), affine=False),
    "gn_divisible": _construct("GroupNorm", 3, 10),
    "gn_zero_groups": _construct("GroupNorm", 0, 10),
    "ln_shape": _module_call("LayerNorm", 5, input=x(4, 6)),
    "ln_empty_shape": _module_call("LayerNorm", [], input=x(4, 6)),
    # dtypes
    "bn_long_input": _module_call("BatchNorm1d", 3, input=x(2, 3).long()),
    "bn_double_input_float_module": _module_call("BatchNorm2d", 3, input=x(2, 3, 2, 2).double()),
    "bn_float_input_double_module": _module_call("BatchNorm2d", 3, input=x(2, 3, 2, 2),
                                                 dtype=torch.float64),
    "bn_float_input_half_module": _module_call("BatchNorm2d", 3, input=x(2, 3, 2, 2),
                                               dtype=torch.float16),
    "bn_half_input_float_module_ok": _module_call("BatchNorm2d", 3,
                                                  input=x(2, 3, 2, 2, dtype=torch.float16)),
    "gn_double_input": _module_call("GroupNorm", 1, 3, input=x(2, 3, 4).double()),
    "gn_long_input": _module_call("GroupNorm", 1, 3, input=x(2, 3, 4).long()),
    "ln_double_input": _module_call("LayerNorm", 4, input=x(2, 4).double()),
    "ln_long_input": _module_call("LayerNorm", 4, input=x(2, 4).long()),
    "in_double_input": _module_call("InstanceNorm1d", 3, input=x(2, 3, 4).double(), affine=True),
    # functional argument errors
    "F_bn_eval_no_mean": _functional_call("batch_norm", x(2, 3), None, torch.ones(3)),
    "F_bn_eval_no_var": _functional_call("batch_norm", x(2, 3), torch.zeros(3), None),
    "F_bn_eval_no_stats": _functional_call("batch_norm", x(2, 3), None, None),
    "F_bn_train_one_stat": _functional_call("batch_norm", x(2, 3), torch.zeros(3), None,
                                            training=True),
    "F_bn_momentum_none": _functional_call("batch_norm", x(2, 3), torch.zeros(3), torch.ones(3),
                                           training=True, momentum=None),
    "F_bn_stats_require_grad": _functional_call(
        "batch_norm", x(2, 3), torch.zeros(3, requires_grad=True), torch.ones(3)),
    "F_bn_weight_size": _functional_call("batch_norm", x(2, 4), None, None, torch.ones(5),
                                         training=True),
    "F_bn_bias_size": _functional_call("batch_norm", x(2, 4), None, None, torch.ones(4),
                                       torch.ones(6), training=True),
    "F_bn_mixed_half": _functional_call("batch_norm", x(2, 4, dtype=torch.float16),
                                        torch.zeros(4, dtype=torch.float16), torch.ones(4),
                                        training=True),
    "F_bn_bf16_weight_float_stats": _functional_call(
        "batch_norm", x(2, 4, dtype=torch.bfloat16), torch.zeros(4), torch.ones(4),
        torch.ones(4, dtype=torch.bfloat16), training=True),
    "F_bn_float_input_bf16_weight": _functional_call(
        "batch_norm", x(2, 4), torch.zeros(4), torch.ones(4),
        torch.ones(4, dtype=torch.bfloat16), training=True),
    "F_bn_half_input_double_stats": _functional_call(
        "batch_norm", x(2, 4, dtype=torch.float16), torch.zeros(4, dtype=torch.float64),
        torch.ones(4, dtype=torch.float64), training=True),
    "F_bn_0d": _functional_call("batch_norm", torch.tensor(1.0), None, None, training=True),
    "F_in_no_stats_eval": _functional_call("instance_norm", x(2, 4, 3), use_input_stats=False),
    "F_in_one_stat": _functional_call("instance_norm", x(2, 4, 3), torch.zeros(4)),
    "F_in_weight_size": _functional_call("instance_norm", x(2, 4, 3), None, None, torch.ones(3)),
    "F_gn_channels_divisible": _functional_call("group_norm", x(2, 7, 3), 2),
    "F_gn_zero_groups": _functional_call("group_norm", x(2, 4, 3), 0),
    "F_gn_negative_groups": _functional_call("group_norm", x(2, 4, 3), -2),
    "F_gn_bias_size": _functional_call("group_norm", x(2, 4, 3), 2, torch.ones(4), torch.ones(6)),
    "F_gn_weight_2d": _functional_call("group_norm", x(2, 4, 3), 2, torch.ones(2, 2)),
    "F_gn_weight_double": _functional_call("group_norm", x(2, 4, 3), 2,
                                           torch.ones(4, dtype=torch.float64)),
    "F_gn_weight_and_divisibility": _functional_call("group_norm", x(2, 7, 3), 2, torch.ones(6)),
    "F_ln_int_shape": _functional_call("layer_norm", x(4, 6), 6),
    "F_ln_float_in_shape": _functional_call("layer_norm", x(4, 6), (6.0,)),
    "F_ln_weight_shape": _functional_call("layer_norm", x(4, 6), (6,), torch.ones(5)),
    "F_ln_bias_shape": _functional_call("layer_norm", x(4, 6), (6,), None, torch.ones(5)),
    "F_ln_bias_double": _functional_call("layer_norm", x(4, 6), (6,), torch.ones(6),
                                         torch.ones(6, dtype=torch.float64)),
    "F_ln_longer_shape": _functional_call("layer_norm", x(4, 6), (7, 6)),
    "F_ln_negative_shape": _functional_call("layer_norm", x(4, 6), (-6,)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_same_exception_and_state(case):
    torch_call, torch_mods = CASES[case](TORCH)
    nk_call, nk_mods = CASES[case](NORMKIT)
    assert_same_exception(torch_call, nk_call)
    for n, t in zip(nk_mods, torch_mods):
        compare_modules(n, t)


def test_error_cases_really_raise():
    """Guard against a table of cases that all pass trivially: most of them must raise."""
    raised = 0
    for build in CASES.values():
        call, _ = build(TORCH)
        try:
            call()
        except Exception:  # noqa: BLE001
            raised += 1
    assert raised >= len(CASES) - 15
