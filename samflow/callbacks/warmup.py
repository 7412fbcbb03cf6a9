"""``LinearWarmup``: mmcv's linear learning-rate warm-up over the first optimizer steps, as a callback.

The experiment's scheduler (stepped per epoch, e.g. ``MultiStepLR`` at epochs 8 and 11) sets the
*regular* rate; during the first ``steps`` optimizer steps the rate used is the regular one times
``ratio + (1 - ratio) * step / steps`` (mmcv ``warmup='linear'``: 0.001 at step 0, 1 at ``steps``).
The regular rate is put back after each step, so the scheduler never sees the warm-up factor.
Chosen in an experiment as ``trainer.callbacks: [{class_path: samflow.callbacks.warmup.LinearWarmup,
init_args: {steps: 500, ratio: 0.001}}]``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["LinearWarmup"]


class LinearWarmup(Callback):
    """Scale every parameter group's learning rate linearly from ``ratio`` to 1 over ``steps`` steps.

    Args:
        steps: optimizer steps of the warm-up (SAPNet's recipe: 500).
        ratio: the factor at step 0 (mmcv's ``warmup_ratio``: 0.001).
    """

    def __init__(self, steps: int = 500, ratio: float = 0.001) -> None:
        if steps < 0 or not 0 < ratio <= 1:
            raise ValueError(f"LinearWarmup: steps must be >= 0 and 0 < ratio <= 1, got {steps}, {ratio}.")
        self.steps, self.ratio = steps, ratio
        self._regular: list[list[float]] = []

    def factor(self, step: int) -> float:
        """The warm-up factor at optimizer step ``step`` (1 from ``steps`` on)."""
        if step >= self.steps:
            return 1.0
        return self.ratio + (1 - self.ratio) * step / self.steps

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        factor = self.factor(trainer.global_step)
        self._regular = []
        if factor == 1.0:
            return
        for optimizer in trainer.optimizers:
            self._regular.append([group["lr"] for group in optimizer.param_groups])
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for optimizer, rates in zip(trainer.optimizers, self._regular, strict=False):
            for group, lr in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = lr
        self._regular = []
