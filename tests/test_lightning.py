"""The Lightning LayerSync plugin (skipped only when lightning is not installed)."""

import pytest
import torch
import torch.nn as tnn

import normkit

pl = pytest.importorskip("lightning.pytorch")
from normkit.integrations.lightning import NormkitSyncBatchNorm  # noqa: E402


def _model():
    torch.manual_seed(0)
    return tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.BatchNorm2d(4), normkit.BatchNorm1d(4),
                          tnn.Sequential(tnn.BatchNorm3d(2)))


def test_apply_and_revert_restore_classes_and_share_state():
    model = _model()
    params = [id(p) for p in model.parameters()]
    plugin = NormkitSyncBatchNorm()
    plugin.apply(model)
    plugin._convert(model)  # what the first forward does on CPU
    assert [type(m) for m in (model[1], model[2], model[3][0])] == [normkit.SyncBatchNorm] * 3
    assert [id(p) for p in model.parameters()] == params
    plugin.revert(model)
    assert type(model[1]) is tnn.BatchNorm2d and type(model[2]) is normkit.BatchNorm1d
    assert type(model[3][0]) is tnn.BatchNorm3d and not hasattr(model[1], "process_group")


def test_cpu_conversion_waits_for_first_forward():
    model = tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.BatchNorm2d(4))
    NormkitSyncBatchNorm().apply(model)
    assert type(model[1]) is tnn.BatchNorm2d
    model(torch.randn(2, 3, 5, 5))
    assert type(model[1]) is normkit.SyncBatchNorm


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.BatchNorm2d(4), tnn.ReLU(),
                                  tnn.Flatten(), tnn.Linear(4 * 3 * 3, 2))

    def training_step(self, batch, _):
        x, y = batch
        loss = tnn.functional.cross_entropy(self.net(x), y)
        if self.trainer.world_size > 1:  # the plugin converted the layer before this forward ran
            assert type(self.net[1]) is normkit.SyncBatchNorm
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_accepts_plugin_and_fits():
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 5, 5), torch.randint(0, 2, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module = _Module()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[NormkitSyncBatchNorm()])
    trainer.fit(module, loader)
    assert trainer.global_step == 2


def test_two_cpu_processes_with_ddp_spawn(tmp_path):
    """The plugin under a real 2-process CPU DDP run: SyncBatchNorm over gloo."""
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 5, 5), torch.randint(0, 2, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module = _Module()
    before = module.net[0].weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[NormkitSyncBatchNorm()],
                         default_root_dir=tmp_path)
    trainer.fit(module, loader)
    # ddp_spawn trains in child processes and loads rank 0's weights back into `module`.
    assert int(module.net[1].num_batches_tracked) == 2
    assert not torch.equal(module.net[0].weight, before)
    assert type(module.net[1]) is tnn.BatchNorm2d  # reverted after fit
