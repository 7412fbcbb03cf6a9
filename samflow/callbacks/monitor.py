"""Refuse a ``ModelCheckpoint`` monitor that the run does not log, when it is first known.

Lightning finds out only when it would save the first checkpoint (after a whole epoch) and raises
its ``MisconfigurationException``. ``MonitorCheck`` looks at the end of the sanity check (for a
validation metric, ``val/...``: the sanity check logs every one of them) and of every validation of a
fit, before the checkpoint callbacks run (Lightning calls them last), and names the monitor and the
metrics that were logged.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

__all__ = ["MonitorCheck", "MonitorError"]


class MonitorError(ValueError):
    """``checkpoint.monitor`` names a metric the run does not log (a user error: ``samflow: error: ...``)."""


class MonitorCheck(Callback):
    """Stop a fit whose checkpoint ``monitor`` is not among the logged metrics, naming both."""

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        logged = {*trainer.callback_metrics, "epoch", "step"}  # ModelCheckpoint adds epoch and step
        for callback in trainer.checkpoint_callbacks:
            monitor = callback.monitor if isinstance(callback, ModelCheckpoint) else None
            if not monitor or monitor in logged:
                continue
            if trainer.sanity_checking and not monitor.startswith("val/"):
                continue  # a training metric is logged once training has run
            names = ", ".join(sorted(logged)) or "none"
            raise MonitorError(
                f"--checkpoint.monitor {monitor!r}: the run logs no such metric; the logged metrics are "
                f"{names}. Monitor one of them, or leave --checkpoint.monitor unset to monitor the "
                "experiment's main metric (the first of model.metrics)."
            )
