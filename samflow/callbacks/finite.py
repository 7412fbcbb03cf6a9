"""Stop, or skip, a training step whose loss or gradients are not finite (NaN or infinite).

The check runs in two Lightning hooks, both before the optimizer changes a weight:
``on_before_backward`` notes whether the loss is finite, ``on_before_optimizer_step`` (after backward,
before gradient clipping and ``optimizer.step()``) checks the gradients and decides. So a diverging run
never writes a checkpoint with non-finite weights: it stops before the step (``last.ckpt`` and every
other checkpoint, also ModelCheckpoint's ``save_on_exception`` one, hold the last finite weights), or
it skips the step by dropping the gradients (``optimizer.zero_grad(set_to_none=True)``: torch
optimizers leave parameters without a gradient, and their state, untouched).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

__all__ = ["NonFiniteCheck", "NonFiniteError"]

#: How many file names a message lists before it says how many more there are.
MAX_FILES = 16
#: How many skipped steps are reported one line each as they happen (all are counted).
MAX_REPORTED = 10


class NonFiniteError(RuntimeError):
    """Training diverged: a loss or gradient is NaN or infinite (a user error: ``samflow: error: ...``)."""


def batch_files(batch: Any) -> list[str]:
    """The files of a batch (``SamBatch.path``, else ``.id``); ``[]`` for a batch without them."""
    for name in ("path", "id"):
        files = batch.get(name) if isinstance(batch, dict) else getattr(batch, name, None)
        if isinstance(files, (list, tuple)) and files and all(isinstance(f, str) for f in files):
            return list(files)
    return []


def _files_text(files: list[str]) -> str:
    if not files:
        return "files unknown"
    shown = ", ".join(files[:MAX_FILES])
    more = f" (and {len(files) - MAX_FILES} more)" if len(files) > MAX_FILES else ""
    return f"files {shown}{more}"


def half_precision_hint(trainer: Trainer) -> str:
    """A sentence naming float16 on the CPU as the likely cause when the run uses it, else ``""``."""
    precision = str(getattr(trainer.precision_plugin, "precision", ""))
    if precision.startswith("16") and trainer.strategy.root_device.type == "cpu":
        return (
            f"The run computes in float16 on the CPU (--trainer.precision {precision}), whose range SAM "
            "overflows: use --trainer.precision 32-true or bf16-mixed there. "
        )
    return ""


def undecoded_hint(undecoded: bool) -> str:
    """A sentence for runs that trained on batches whose images were not decoded, else ``""``."""
    if not undecoded:
        return ""
    return (
        "Training images were not decoded (model.sam.embedding_store gives their encoder outputs) and "
        "hold NaN: a plugin that reads batch.image must declare `reads_image = True`. "
    )


class NonFiniteCheck(Callback):
    """Stop the run, or skip the step, when a training loss or gradient is NaN or infinite.

    The loss is checked before backward and the gradients before the optimizer step, so no step with
    non-finite values changes the weights and every checkpoint written holds finite weights.

    Args:
        action: ``error`` stops the run at the first non-finite loss or gradient with one line naming
            the global step, the epoch, the batch and its files, and exit status 1; the checkpoints
            already written (``last.ckpt`` included) are the last finite ones. ``skip`` drops that
            step's gradients (the weights and the optimizer state stay as they were), counts it,
            logs the count as ``train/skipped_non_finite`` and reports it at the end; an epoch in
            which every step was skipped (the weights did not change) still stops the run with an
            error. With ``16-mixed`` precision, non-finite gradients are left to the GradScaler (it
            skips those steps and lowers its scale) and only a NaN loss counts.
    """

    def __init__(self, action: Literal["error", "skip"] = "error") -> None:
        if action not in ("error", "skip"):
            raise ValueError(f"non_finite: action must be 'error' or 'skip', not {action!r}")
        self.action = action
        self.skipped = 0  # steps skipped in the whole run
        self.steps = 0  # optimizer steps checked in the whole run
        self.skipped_files: list[str] = []  # files of the skipped steps' batches, in order
        self._epoch_steps = 0
        self._epoch_skipped = 0
        self._window: list[tuple[int, list[str]]] = []  # (batch_idx, files) since the last step
        self._undecoded = False  # whether a batch without pixels (the embedding store's) was trained on
        self._losses: list[tuple[int, Tensor]] = []  # (index in the window, detached loss)
        self._stepped = False
        self._last_message = ""

    # ---- state: the count survives a resume ----
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "steps": self.steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.steps = int(state_dict.get("steps", 0))

    # ---- collecting ----
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_steps = self._epoch_skipped = 0
        self._window, self._losses, self._stepped = [], [], False

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._stepped:  # the batches of the last optimizer step are done
            self._window, self._losses, self._stepped = [], [], False
        self._window.append((batch_idx, batch_files(batch)))
        self._undecoded = self._undecoded or getattr(batch, "pixels", True) is False

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self._window:
            self._losses.append((len(self._window) - 1, loss.detach()))

    # ---- deciding, before the optimizer step ----
    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        bad_losses = self._bad_losses(nan_only=scaler is not None)
        bad_grads = [] if scaler is not None else self._bad_gradients(pl_module, optimizer)
        local = bool(bad_losses or bad_grads)
        # Every rank decides alike (a loss may be NaN on one rank only), as EarlyStopping does.
        diverged = trainer.strategy.reduce_boolean_decision(local, all=False)
        self._stepped = True
        self.steps += 1
        self._epoch_steps += 1
        if not diverged:
            return
        message = self._describe(trainer, pl_module, bad_losses, bad_grads)
        self._last_message = message
        if self.action == "error":
            raise NonFiniteError(
                f"Training diverged: {message}. Stopped before the optimizer step: no checkpoint holds "
                f"non-finite weights. {half_precision_hint(trainer)}{undecoded_hint(self._undecoded)}"
                "Lower the learning rate or check these "
                "files; --non_finite.action skip skips such steps instead."
            )
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self._epoch_skipped += 1
        indices = sorted({i for i, _ in bad_losses}) or range(len(self._window))
        for i in indices:
            self.skipped_files += self._window[i][1]
        if self.skipped <= MAX_REPORTED:
            more = " (later ones are only counted)" if self.skipped == MAX_REPORTED else ""
            rank_zero_info(f"samflow: skipped a step: {message}{more}")

    def _bad_losses(self, nan_only: bool) -> list[tuple[int, float]]:
        """(window index, value) of each non-finite loss since the last step; one device sync."""
        if not self._losses:
            return []
        values = torch.stack([loss.float().reshape(-1)[0] for _, loss in self._losses]).cpu()
        bad = values.isnan() if nan_only else ~values.isfinite()
        return [(self._losses[i][0], float(values[i])) for i in bad.nonzero().flatten().tolist()]

    @staticmethod
    def _bad_gradients(pl_module: LightningModule, optimizer: Optimizer) -> list[str]:
        """Names of the parameters of ``optimizer`` whose gradient is not finite; one device sync."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return []
        grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in params]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).cpu()
        if bool(finite.all()):
            return []
        names = {id(p): name for name, p in pl_module.named_parameters()}
        return [names.get(id(p), "an unnamed parameter") for p, ok in zip(params, finite.tolist()) if not ok]

    def _describe(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        bad_losses: list[tuple[int, float]],
        bad_grads: list[str],
    ) -> str:
        if bad_losses:
            what = f"non-finite loss ({bad_losses[0][1]})"
            indices = sorted({i for i, _ in bad_losses})
        elif bad_grads:
            more = f" and {len(bad_grads) - 1} more" if len(bad_grads) > 1 else ""
            what = f"non-finite gradient of {bad_grads[0]}{more}"
            indices = list(range(len(self._window)))
        else:  # only under DDP: another rank's line names its batch and files
            return (
                f"non-finite loss or gradient on another process at global step {trainer.global_step}, "
                f"epoch {trainer.current_epoch} (that process's line names its files)"
            )
        batches = [self._window[i][0] for i in indices]
        files = [f for i in indices for f in self._window[i][1]]
        batch = f"batch {batches[0]}" if len(batches) == 1 else "batches " + ", ".join(map(str, batches))
        return (
            f"{what} at global step {trainer.global_step}, epoch {trainer.current_epoch}, {batch}, "
            f"{_files_text(files)}"
        )

    # ---- counting and reporting ----
    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.action == "skip":
            pl_module.log(
                "train/skipped_non_finite",
                float(self.skipped),
                on_step=False,
                on_epoch=True,
                reduce_fx="max",
                batch_size=1,
            )

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Also at the end of a run stopped inside an epoch (max_steps): Lightning ends the epoch then.
        if self._epoch_steps and self._epoch_skipped == self._epoch_steps:
            raise NonFiniteError(
                f"Training diverged: all {self._epoch_steps} steps of epoch {trainer.current_epoch} had a "
                f"non-finite loss or gradient and were skipped, so the weights did not change (last: "
                f"{self._last_message}). Lower the learning rate or check the data."
            )

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.skipped:
            return
        rank_zero_info(
            f"samflow: skipped {self.skipped} of {self.steps} training steps with a non-finite loss or "
            f"gradient (logged as train/skipped_non_finite); their batches held "
            f"{_files_text(list(dict.fromkeys(self.skipped_files)))}."
        )
