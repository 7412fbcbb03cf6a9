"""Fixed validation samples as a PNG grid (image | ground truth | prediction), also sent to W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torch import Tensor
from typing_extensions import override


def mask_grid(images: Tensor, targets: Tensor, preds: Tensor) -> np.ndarray:
    """Rows of [image | ground truth | prediction]: images (B, 3, H, W) in [0, 1], masks (B, 1, H, W)."""
    rows = []
    for image, target, pred in zip(images, targets, preds):
        cells = [image, target.expand(3, -1, -1), pred.expand(3, -1, -1)]
        rows.append(torch.cat([c.float().clamp(0, 1) for c in cells], dim=2))
    grid = torch.cat(rows, dim=1)  # (3, B*H, 3*W)
    return (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


class SampleGrid(Callback):
    """Save the first ``num_samples`` validation images with their masks after every validation.

    Args:
        num_samples: how many images of the first validation batches to show (the validation set is not
            shuffled, so they are the same images every epoch).
        threshold: probability above which a predicted pixel is shown as foreground.
    """

    def __init__(self, num_samples: int = 8, threshold: float = 0.5) -> None:
        self.num_samples = num_samples
        self.threshold = threshold
        self._rows: list[tuple[Tensor, Tensor, Tensor]] = []

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or batch.mask is None or not isinstance(outputs, dict):
            return
        have = sum(r[0].shape[0] for r in self._rows)
        if have >= self.num_samples:
            return
        index = outputs["out"].image_index
        take = slice(0, self.num_samples - have)
        pred = (outputs["probs"] > self.threshold).float()
        self._rows.append((batch.image[index][take].cpu(), batch.mask[index][take].cpu(), pred[take].cpu()))

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
        if not trainer.is_global_zero or not self._rows or log_dir is None:
            return
        images, targets, preds = (torch.cat(parts) for parts in zip(*self._rows))
        grid = mask_grid(images, targets, preds)
        stage = "sanity" if trainer.sanity_checking else f"epoch{trainer.current_epoch:03d}"
        folder = Path(log_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(folder / f"val_{stage}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, images, targets, preds, trainer.global_step)

    def _log_wandb(
        self, logger: WandbLogger, images: Tensor, targets: Tensor, preds: Tensor, step: int
    ) -> None:
        import wandb

        overlays = []
        for image, target, pred in zip(images, targets, preds):
            picture = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            masks = {
                "prediction": {"mask_data": pred[0].numpy().astype(np.uint8), "class_labels": {1: "object"}},
                "ground_truth": {
                    "mask_data": target[0].numpy().astype(np.uint8),
                    "class_labels": {1: "object"},
                },
            }
            overlays.append(wandb.Image(picture, masks=masks))
        logger.experiment.log({"val/samples": overlays, "trainer/global_step": step})
