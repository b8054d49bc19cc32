"""Lightning plugin: synchronise a model's batch norms with normkit.SyncBatchNorm.

    trainer = lightning.pytorch.Trainer(strategy="ddp", plugins=[NormkitSyncBatchNorm()])

Unlike Lightning's own TorchSyncBatchNorm it also works on CPU (gloo), and `revert` restores
each layer's original class. Layers are converted in place by changing their class (normkit's
SyncBatchNorm holds no state of its own beyond `process_group`), so Parameters, buffers and
references stay the same objects. On CPU the conversion waits for the model's first forward:
DistributedDataParallel refuses SyncBatchNorm layers in a CPU model when it is constructed, and
Lightning applies layer-sync plugins before that.
"""

from __future__ import annotations

import torch.nn as nn
from lightning.pytorch.plugins import LayerSync

from normkit.modules.syncbatchnorm import SyncBatchNorm

_ORIGINAL = "_normkit_original_class"


class NormkitSyncBatchNorm(LayerSync):
    """LayerSync plugin converting every BatchNorm to normkit.SyncBatchNorm (and back)."""

    def __init__(self, process_group=None) -> None:
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        if any(p.device.type == "cpu" for p in model.parameters()):
            handle = None

            def convert_on_first_forward(module, args):
                handle.remove()
                self._convert(module)

            handle = model.register_forward_pre_hook(convert_on_first_forward)
            return model
        return self._convert(model)

    def _convert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if (isinstance(module, nn.modules.batchnorm._BatchNorm)
                    and not isinstance(module, nn.SyncBatchNorm)):
                setattr(module, _ORIGINAL, type(module))
                module.__class__ = SyncBatchNorm
                module.process_group = self.process_group
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            original = module.__dict__.pop(_ORIGINAL, None)
            if original is not None:
                del module.process_group
                module.__class__ = original
        return model


__all__ = ["NormkitSyncBatchNorm"]
