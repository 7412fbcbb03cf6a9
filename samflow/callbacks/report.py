"""Validation metrics before and after training, and predicted masks written as PNGs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from typing_extensions import override


class ImprovementReport(Callback):
    """Print validation metrics before training (the sanity check) and after it; save them as JSON.

    The before-numbers cover the whole validation set when ``trainer.num_sanity_val_steps`` is -1.
    """

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        before = getattr(pl_module, "initial_val_metrics", {})
        after = getattr(pl_module, "last_val_metrics", {})
        if not after:
            return
        lines = [f"  {'metric':<20} {'before':>10} {'after':>10}"]
        for key, value in after.items():
            old = before.get(key)
            lines.append(f"  {key:<20} {'n/a' if old is None else f'{old:.4f}':>10} {value:.4f}")
        rank_zero_info("Validation before and after training:\n" + "\n".join(lines))
        if log_dir is not None:
            path = Path(log_dir) / "val_before_after.json"
            path.write_text(json.dumps({"before": before, "after": after}, indent=2))


class TestReport(Callback):
    """Write the test metrics of every test set to ``test_metrics.json`` in the run folder."""

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
        results = getattr(pl_module, "test_results", {})
        if trainer.is_global_zero and results and log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / "test_metrics.json").write_text(json.dumps(results, indent=2))


class MaskWriter(BasePredictionWriter):
    """Write one binary mask PNG (0 / 255) per input image, at the image's original size.

    Args:
        output_dir: folder for the masks (default: ``<run folder>/predictions``).
        save_probabilities: also write the foreground probability as an 8-bit PNG (``<id>_prob.png``).
    """

    def __init__(self, output_dir: str | None = None, save_probabilities: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.save_probabilities = save_probabilities

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # trainer.log_dir is a collective call under DDP: every rank asks, once
        base = self.output_dir or str(Path(trainer.log_dir or trainer.default_root_dir) / "predictions")
        self._folder = Path(base)
        self._folder.mkdir(parents=True, exist_ok=True)

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        folder = self._folder
        for name, mask, prob in zip(prediction["id"], prediction["masks"], prediction["probs"]):
            Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255).save(folder / f"{name}.png")
            if self.save_probabilities:
                values = (prob.float().cpu().numpy() * 255).round().astype(np.uint8)
                Image.fromarray(values).save(folder / f"{name}_prob.png")
