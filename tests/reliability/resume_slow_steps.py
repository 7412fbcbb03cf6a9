"""A callback for tests/reliability/test_resume.py: slow steps after a given one, so the test can
kill the run in a wide window. It only sleeps: weights, generators and metrics are not touched."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class SlowSteps(Callback):
    def __init__(self, after: int = 0, seconds: float = 1.0) -> None:
        self.after = after
        self.seconds = seconds

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > self.after:
            time.sleep(self.seconds)
