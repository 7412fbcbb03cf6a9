"""``AccumulatedGradients``: a checkpoint written inside a window of ``accumulate_grad_batches`` keeps it.

With ``--trainer.accumulate_grad_batches 2`` the optimizer steps after every second batch; the batches in
between only add to the parameters' ``.grad``. A checkpoint written between them (``BestCheckpoint``
after a validation every ``val_check_interval`` batches when that is not a multiple of 2, or any
``trainer.save_checkpoint`` then) held the weights and the optimizer of the step before, not those
gradients: a run resumed from it stepped after the next batch with that batch's gradient alone. Here the
gradients go into such a checkpoint and are set back before the resumed run's first batch, which adds to
them as the uninterrupted run's did (``last.ckpt`` is written only after optimizer steps and needs none
of this).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from samflow.callbacks.resume_config import ResumeError

__all__ = ["AccumulatedGradients", "inside_window"]


def inside_window(trainer: Trainer) -> bool:
    """Whether the batches trained so far this epoch end inside an accumulation window (no step yet).

    Lightning steps after every ``accumulate_grad_batches``-th batch of an epoch and after its last.
    """
    every = trainer.accumulate_grad_batches
    progress = trainer.fit_loop.epoch_loop.batch_progress
    done = progress.current.processed  # type: ignore[attr-defined]  # a _BatchProgress's tracker has it
    last = progress.is_last_batch or done == trainer.num_training_batches
    return every > 1 and done % every != 0 and not last


class AccumulatedGradients(Callback):
    """Save the accumulated gradients in a checkpoint written between two optimizer steps; restore them.

    Under several processes each holds its own gradients until the step (DDP does not reduce them while
    accumulating); such a checkpoint records only that it was written inside a window, and a resume from
    it is refused with the way out (``last.ckpt``, written after a step).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] = {}

    @property
    @override
    def state_key(self) -> str:
        return "AccumulatedGradients"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or not inside_window(trainer):
            return {}
        if trainer.world_size > 1:
            return {"processes": trainer.world_size, "batches": trainer.accumulate_grad_batches}
        named = trainer.lightning_module.named_parameters()
        grads = {name: p.grad.detach().clone() for name, p in named if p.grad is not None}
        return {"grads": grads, "batches": trainer.accumulate_grad_batches}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        where = f"--ckpt_path {trainer.ckpt_path}" if trainer.ckpt_path else "the checkpoint"
        if pending.get("processes"):
            raise ResumeError(
                f"{where} was written between two optimizer steps of --trainer.accumulate_grad_batches "
                f"{pending['batches']} by {pending['processes']} processes, whose accumulated gradients it "
                "cannot hold; resume from the run's checkpoints/last.ckpt (written after a step) instead."
            )
        if pending["batches"] != trainer.accumulate_grad_batches:
            raise ResumeError(
                f"{where} was written inside a window of --trainer.accumulate_grad_batches "
                f"{pending['batches']}; resume it with that value, not {trainer.accumulate_grad_batches}."
            )
        params = dict(pl_module.named_parameters())
        unknown = sorted(set(pending["grads"]) - set(params))
        if unknown:
            raise ResumeError(
                f"{where} holds accumulated gradients of {len(unknown)} parameter(s) this model lacks "
                f"({unknown[0]}, ...); resume it with the run's model.plugins."
            )
        for name, grad in pending["grads"].items():
            param = params[name]
            param.grad = grad.to(device=param.device, dtype=param.dtype)
