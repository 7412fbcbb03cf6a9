"""``LinearWarmup``: mmcv's linear learning-rate warm-up over the first optimizer steps, as a callback.

The experiment's scheduler (stepped per epoch, e.g. ``MultiStepLR`` at epochs 8 and 11) sets the
*regular* rate; during the first ``steps`` optimizer steps the rate used is the regular one times
``ratio + (1 - ratio) * step / steps`` (mmcv ``warmup='linear'``: 0.001 at step 0, 1 at ``steps``).
The factor is applied inside each optimizer step (its closure, i.e. the training step, included) and
the regular rate put back right after, so the scheduler never sees it.
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

    def factor(self, step: int) -> float:
        """The warm-up factor at optimizer step ``step`` (1 from ``steps`` on)."""
        if step >= self.steps:
            return 1.0
        return self.ratio + (1 - self.ratio) * step / self.steps

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Wrap each optimizer's ``step``: the warmed rate holds exactly for the step (and its closure).

        Lightning may step an epoch scheduler before the batch-end hooks run, so restoring the regular
        rate in a hook could undo the scheduler; inside ``step`` nothing else runs.
        """
        for optimizer in trainer.optimizers:
            if getattr(optimizer.step, "_samflow_warmup", False):
                continue
            optimizer.step = self._wrap(trainer, optimizer, optimizer.step)  # type: ignore[method-assign]

    def _wrap(self, trainer: Trainer, optimizer: Any, step: Any) -> Any:
        def warmed_step(*args: Any, **kwargs: Any) -> Any:
            factor = self.factor(trainer.global_step)
            if factor == 1.0:
                return step(*args, **kwargs)
            regular = [group["lr"] for group in optimizer.param_groups]
            for group, lr in zip(optimizer.param_groups, regular, strict=True):
                group["lr"] = lr * factor
            try:
                return step(*args, **kwargs)
            finally:
                for group, lr in zip(optimizer.param_groups, regular, strict=True):
                    group["lr"] = lr

        warmed_step._samflow_warmup = True  # type: ignore[attr-defined]
        if hasattr(step, "_wrapped_by_lr_sched"):  # a scheduler's wrapper, still called inside
            warmed_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # else torch warns
        return warmed_step
