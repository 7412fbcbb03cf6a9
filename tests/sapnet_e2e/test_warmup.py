"""LinearWarmup: mmcv's linear warm-up on top of an epoch scheduler, rates worked by hand."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from samflow.callbacks.warmup import LinearWarmup


class _Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(self.optimizers().param_groups[0]["lr"])
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, [1], 0.1)}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(3, 1)), batch_size=1)


def test_rates_during_and_after_warmup(tmp_path):
    module = _Tiny()
    trainer = Trainer(
        max_epochs=2,
        callbacks=[LinearWarmup(steps=4, ratio=0.2)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    # step s < 4: regular x (0.2 + 0.8 s / 4); epoch 0 regular 0.1, epoch 1 (after the milestone) 0.01
    assert module.seen == pytest.approx([0.02, 0.04, 0.06, 0.008, 0.01, 0.01])
    # the scheduler saw only regular rates: none of the warm-up factors stuck
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


def test_bad_arguments():
    with pytest.raises(ValueError, match="LinearWarmup: steps must be >= 0 and 0 < ratio <= 1"):
        LinearWarmup(steps=10, ratio=0.0)
    assert LinearWarmup(steps=0).factor(0) == 1.0
