"""FrozenBatchNorm2d, freeze, convert, fold_batchnorm and update_bn_stats."""


import pytest
import torch
import torch.nn as tnn

import normkit


def resnet_stack():
    torch.manual_seed(0)

    class Block(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = tnn.Conv2d(c, c, 3, padding=1, bias=False), tnn.BatchNorm2d(c)
            self.conv2, self.bn2 = tnn.Conv2d(c, c, 3, padding=1), tnn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))

    return tnn.Sequential(tnn.Conv2d(3, 8, 3, padding=1), tnn.BatchNorm2d(8), tnn.ReLU(),
                          Block(8), Block(8), tnn.AdaptiveAvgPool2d(1), tnn.Flatten(),
                          tnn.Linear(8, 6), tnn.BatchNorm1d(6))


def unet_encoder():
    torch.manual_seed(1)
    enc = tnn.ModuleDict({
        "down1": tnn.Sequential(tnn.Conv2d(3, 8, 3, padding=1), tnn.GroupNorm(4, 8), tnn.SiLU()),
        "down2": tnn.Sequential(tnn.Conv2d(8, 16, 3, stride=2, padding=1), tnn.GroupNorm(4, 16),
                                tnn.SiLU(), tnn.InstanceNorm2d(16, affine=True)),
    })

    class Encoder(tnn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, x):
            return self.enc["down2"](self.enc["down1"](x))

    return Encoder()


def transformer_block():
    torch.manual_seed(2)

    class Block(tnn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.ln1, self.ln2 = tnn.LayerNorm(d), tnn.LayerNorm(d, bias=False)
            self.attn = tnn.MultiheadAttention(d, 2, batch_first=True)
            self.mlp = tnn.Sequential(tnn.Linear(d, 32), tnn.GELU(), tnn.Linear(32, d))

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    return Block()


MODELS = {"resnet": (resnet_stack, (4, 3, 8, 8)), "unet": (unet_encoder, (2, 3, 8, 8)),
          "transformer": (transformer_block, (2, 5, 16))}


def _train_steps(model, shape, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    outs = []
    for _ in range(steps):
        x = torch.randn(shape, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        outs.append(loss.detach())
    return outs, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_round_trip_and_same_training(name):
    build, shape = MODELS[name]
    reference = build()
    model = build()
    layers_before = {n: m for n, m in model.named_modules()}
    params_before = {n: p for n, p in model.named_parameters()}
    converted = normkit.convert(model)
    assert converted is model
    norm_layers = [m for m in model.modules() if type(m).__module__.startswith("torch.nn")
                   and type(m) in normkit.convert.__globals__["TO_NORMKIT"]]
    assert not norm_layers, "a torch norm layer was left unconverted"
    assert any(type(m).__module__.startswith("normkit") for m in model.modules())
    for n, m in model.named_modules():
        assert m is layers_before[n]
    for n, p in model.named_parameters():
        assert p is params_before[n]
    losses_t, state_t = _train_steps(reference, shape)
    losses_n, state_n = _train_steps(model, shape)
    for a, b in zip(losses_n, losses_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in state_t:
        torch.testing.assert_close(state_n[k], state_t[k], rtol=1e-4, atol=1e-5, msg=k)
    normkit.convert(model, to="torch")
    assert not any(type(m).__module__.startswith("normkit") for m in model.modules())


def test_convert_leaves_foreign_subclasses_alone():
    class MyBN(tnn.BatchNorm2d):
        pass

    model = tnn.Sequential(MyBN(3), tnn.BatchNorm2d(3))
    normkit.convert(model)
    assert type(model[0]) is MyBN and type(model[1]) is normkit.BatchNorm2d
    with pytest.raises(ValueError):
        normkit.convert(model, to="jax")


def test_frozen_batchnorm_matches_eval_batchnorm_and_has_no_params():
    bn = tnn.BatchNorm2d(5)
    bn(torch.randn(8, 5, 4, 4) * 3 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    frozen = normkit.FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked ignored
    assert list(frozen.parameters()) == []
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    frozen(x).sum().backward()
    assert x.grad is not None and frozen.running_mean.grad is None
    assert repr(frozen) == "FrozenBatchNorm2d(5, eps=1e-05)"
    before = frozen.running_mean.clone()
    frozen.train()(x)
    assert torch.equal(frozen.running_mean, before)


def test_freeze_replaces_every_tracking_batchnorm():
    model = resnet_stack()
    _train_steps(model, (4, 3, 8, 8))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    frozen = normkit.freeze(model)
    assert frozen is model
    assert not any(isinstance(m, tnn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, normkit.FrozenBatchNorm2d) for m in model.modules()) == 6
    model.train()  # frozen layers behave the same in train mode
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("traceable", [True, False])
def test_fold_batchnorm(traceable):
    model = resnet_stack()
    _train_steps(model, (4, 3, 8, 8))
    normkit.convert(model[3])  # a mix of torch and normkit layers
    if not traceable:  # data-dependent control flow: torch.fx cannot trace this model
        block_forward = model[3].forward

        def untraceable(x):
            return block_forward(x) if bool(x.sum() > -1e30) else x
        model[3].forward = untraceable
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    folded, count = normkit.fold_batchnorm(model, return_count=True)
    assert folded is not model and not folded.training
    assert count == (6 if traceable else 2)
    got = folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    remaining = sum(isinstance(m, tnn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert remaining == 6 - count


def test_fold_skips_shared_conv_output():
    class Branch(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = tnn.Conv2d(3, 3, 1), tnn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = Branch().eval()
    folded, count = normkit.fold_batchnorm(model, return_count=True)
    assert count == 0
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(folded(x), model(x))


def test_update_bn_stats_gives_population_statistics():
    torch.manual_seed(0)
    model = tnn.Sequential(tnn.Linear(5, 4), normkit.BatchNorm1d(4, momentum=0.3),
                           tnn.ReLU(), tnn.Linear(4, 3), tnn.BatchNorm1d(3))
    model.eval()
    batches = [torch.randn(n, 5) * 2 + 1 for n in (7, 3, 9, 5)]
    counters = [int(m.num_batches_tracked) for m in (model[1], model[4])]
    normkit.update_bn_stats(model, batches, progress=False)
    assert not model.training and model[1].momentum == 0.3
    assert [int(m.num_batches_tracked) for m in (model[1], model[4])] == counters
    everything = torch.cat(batches)
    h = model[0](everything)
    torch.testing.assert_close(model[1].running_mean, h.mean(0))
    torch.testing.assert_close(model[1].running_var, h.var(0, unbiased=True))
    # The second BN sees inputs produced with per-batch (training-mode) normalization.
    model.train()
    inputs = []
    with torch.no_grad():
        for b in batches:
            inputs.append(model[3](model[2](model[1](model[0](b)))))
    inputs = torch.cat(inputs)
    torch.testing.assert_close(model[4].running_mean, inputs.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[4].running_var, inputs.var(0), rtol=1e-5, atol=1e-6)


def test_update_bn_stats_num_batches_and_tuples():
    model = tnn.Sequential(normkit.BatchNorm1d(2))
    data = [(torch.randn(4, 2) + i, torch.zeros(4)) for i in range(5)]
    normkit.update_bn_stats(model, data, num_batches=2, progress=False)
    torch.testing.assert_close(model[0].running_mean, torch.cat([d[0] for d in data[:2]]).mean(0))
