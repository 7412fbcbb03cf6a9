"""A callback for tests/reliability/test_signals.py: the run sends itself a signal at the end of a given
training step, as a scheduler (SIGTERM, SLURM's SIGUSR1) or a user's Ctrl-C (SIGINT) would, at a place
the test knows. It only sends: weights, generators and metrics are not touched."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class SignalAt(Callback):
    """Send ``signum`` to this process (on process ``rank``) at the end of the training batch after which
    the global step is ``step``, or with ``validation_batch`` at the end of that batch of a validation (with
    ``in_fit``, of the fit's validation after step ``step``, not of its sanity check), or with
    ``at_setup`` in the trainer's ``setup`` (before the fit's own signal handlers are in place). With
    ``restart``, only in that start of a SLURM job (``SLURM_RESTART_COUNT``, 0 when unset): the job
    script's command line is the same in every start."""

    def __init__(
        self,
        step: int = 1,
        signum: str = "SIGTERM",
        rank: int = 0,
        validation_batch: int | None = None,
        in_fit: bool = False,
        at_setup: bool = False,
        restart: int | None = None,
    ) -> None:
        self.step, self.signum, self.rank, self.validation_batch = step, signum, rank, validation_batch
        self.in_fit, self.at_setup, self.restart = in_fit, at_setup, restart
        self.sent = False

    def _send(self, trainer: Trainer) -> None:
        if self.restart is not None and int(os.environ.get("SLURM_RESTART_COUNT") or 0) != self.restart:
            return
        if not self.sent and trainer.global_rank == self.rank:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signum))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.at_setup:
            self._send(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.validation_batch is None and not self.at_setup and trainer.global_step == self.step:
            self._send(trainer)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != self.validation_batch:
            return
        if not self.in_fit or (not trainer.sanity_checking and trainer.global_step == self.step):
            self._send(trainer)


class Killed(Exception):
    """``KillAt``'s stand-in for a kill: the fit ends where it is, nothing saved after."""


class KillAt(Callback):
    """End the fit, as a kill -9 (an OOM, a lost node) would, at the end of ``validation_batch`` of the
    fit's validation after step ``step``: no signal handler runs, so no checkpoint is written; the run
    folder keeps what the fit wrote before (``last.ckpt`` of an earlier step)."""

    def __init__(self, step: int, validation_batch: int = 0) -> None:
        self.step, self.validation_batch = step, validation_batch

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            not trainer.sanity_checking
            and trainer.global_step == self.step
            and batch_idx == self.validation_batch
        ):
            raise Killed(f"killed in the validation after step {self.step}")


def signal_args(**init_args: Any) -> list[str]:
    """The ``samflow`` arguments that add ``SignalAt(**init_args)`` to the trainer's callbacks."""
    return ["--trainer.callbacks+", json.dumps({"class_path": "signal_at.SignalAt", "init_args": init_args})]
