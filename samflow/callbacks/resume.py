"""Exact resume: the random generators' states in every checkpoint, and ``last.ckpt`` during an epoch.

A run resumed from a checkpoint (``samflow fit ... --ckpt_path <run>/checkpoints/last.ckpt`` or
``--resume <run>``) ends with the uninterrupted run's weights and metrics when three things are saved
and restored: the weights, optimizer and loop state (Lightning), the training batches' order and
per-sample randomness (``samflow.data.ResumableLoader``), and the process's random generators, which
draw the augmentation and anything random in the training step (``RandomState`` here). ``LastCheckpoint``
writes ``last.ckpt`` every N training steps as well as at the end of each epoch, so a run killed
mid-epoch loses at most N steps. ``BestCheckpoint`` keeps the best checkpoints' scores across a resume
from another path to the run folder. ``PlateauResume`` makes the ``ReduceLROnPlateau`` update that
Lightning leaves out at the first epoch end of a resumed run.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from samflow.callbacks.accumulation import AccumulatedGradients, inside_window
from samflow.callbacks.run_folder import first_process
from samflow.console import shown
from samflow.outputs import partial_path, write_whole
from samflow.requeue_hold import HeldSignal, requeue_job, requeued_by_sweep, slurm_job

__all__ = [
    "BestCheckpoint",
    "LastCheckpoint",
    "PlateauResume",
    "RandomState",
    "SlurmRequeue",
    "before_training",
    "capture_rng",
    "ignore_hpc_checkpoints",
    "note_sigterm_only",
    "restore_rng",
    "stopping",
]


def before_training(trainer: Trainer) -> bool:
    """Whether the fit has not trained yet, so that its sanity check is the validation before training.

    Lightning repeats the sanity check in a fit resumed from a checkpoint of an epoch end (it counts such
    a fit as not restarting), on the checkpoint's trained weights; the restored progress tells it apart.
    """
    return trainer.global_step == 0 and trainer.current_epoch == 0


def capture_rng() -> dict[str, Any]:
    """The states of the global torch (CPU and every CUDA device), numpy and ``random`` generators."""
    kind, keys, pos, has_gauss, gauss = cast(tuple, np.random.get_state())
    state: dict[str, Any] = {  # tensors and plain values: loadable with torch.load(weights_only=True)
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the generators to ``state`` (from ``capture_rng``); CUDA states only onto as many devices."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


#: the connector's attribute where, under DDP, a signal is noted until ``stopping`` shares it
_NOTED = "_samflow_signal_noted"


def _note_signal(trainer: Trainer) -> None:
    """Stop after the batch: at once in one process; under DDP noted, for ``stopping`` to share."""
    if trainer.world_size > 1:
        setattr(trainer._signal_connector, _NOTED, True)
    else:
        trainer._signal_connector.received_sigterm = True


def stopping(trainer: Trainer) -> bool:
    """Whether a SIGTERM (or SLURM's requeue signal, ``SlurmRequeue``) reached this process or, under DDP,
    any: then every process stops after the batch. Under DDP the signal is only noted where it lands
    (``note_sigterm_only``) and shared here, at the end of each training batch and each batch of a fit's
    validation, so that every process stops at the same batch: Lightning stopped a process once it got
    the signal itself, so that the others went on to wait for it in their next step or the rest of the
    validation, without a checkpoint. A requeue follows the signal of whichever process got it."""
    connector = trainer._signal_connector
    requeues = [c for c in trainer.callbacks if isinstance(c, SlurmRequeue)]  # type: ignore[attr-defined]
    got = bool(getattr(trainer, "received_sigterm", False) or getattr(connector, _NOTED, False))
    got = got or any(c.requeue for c in requeues)  # also one noted before ``note_sigterm_only`` reset it
    if trainer.world_size > 1:
        flags = torch.tensor(
            [int(got), int(any(c.requeue for c in requeues))], device=trainer.strategy.root_device
        )
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
        got = bool(flags[0].item())
        if got:  # Lightning raises SIGTERMException after this batch on every process
            connector.received_sigterm = True
        if flags[1].item():
            for callback in requeues:
                callback.requeue = True
    return got


def note_sigterm_only(trainer: Trainer) -> None:
    """Under DDP, put in place of Lightning's SIGTERM handler one that only notes the signal (and passes it
    on to the processes Lightning started, as Lightning's does); ``stopping`` shares the note after the
    batch. Lightning 2.6's handler runs ``dist.broadcast`` inside the handler, on the signalled process
    alone, at whatever point of the step the signal lands: a SIGTERM reaching one rank, or the ranks at
    different moments (torchrun passing one on to every worker), left them waiting for each other in
    collectives that do not match. Lightning's own teardown puts back the handlers from before the fit.
    Called at the sanity check's start (Lightning registers its handler just before it) and again at
    ``on_train_start`` (a fit without one), where it leaves a handler in place, and its note, as it is."""
    if trainer.world_size <= 1 or threading.current_thread() is not threading.main_thread():
        return
    connector = trainer._signal_connector
    handlers = getattr(signal.getsignal(signal.SIGTERM), "signal_handlers", None)  # Lightning's compose
    lightnings = getattr(connector, "_sigterm_notifier_fn", None)
    if not isinstance(handlers, list) or lightnings not in handlers:
        return
    setattr(connector, _NOTED, False)

    def note(signum: int, frame: Any) -> None:
        if not getattr(connector, _NOTED, False) and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)
        _note_signal(trainer)

    handlers[handlers.index(lightnings)] = note


def validates_after_batch(trainer: Trainer) -> bool:
    """At ``on_train_batch_end`` of a fit: whether Lightning's training loop runs a validation after this
    batch (``val_check_interval``, or the epoch's end), by the loop's own decision
    (``_TrainingEpochLoop.on_advance_end``)."""
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None or trainer.sanity_checking or loop._skip_next_val:
        return False
    return bool(loop._should_check_val_fx(fetcher))


def keeps_gradients(trainer: Trainer) -> bool:
    """Whether a checkpoint written between two accumulated batches keeps the gradients (``AccumulatedGradients``)."""
    return any(isinstance(c, AccumulatedGradients) for c in trainer.callbacks)  # type: ignore[attr-defined]


class RandomState(Callback):
    """Save the random generators' states in every checkpoint; restore them when training resumes.

    The states are taken when the checkpoint is written (after the step it follows) and set back at
    ``on_train_start`` of the resumed run, just before its first training step. The module's
    ``initial_val_metrics`` (the validation before training, which a resumed run does not repeat: the
    sanity check Lightning runs again in a fit resumed from a checkpoint of an epoch end validates
    trained weights, ``before_training``) travel along, back in the module as the checkpoint is loaded,
    so the before/after report stays complete.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng(), "initial_val_metrics": self._initial_metrics}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)
        # the numbers go to the module now (Lightning restores after ``setup``): a resumed fit with no
        # epoch left never reaches ``on_train_start`` and still reports them; not for validate / test
        module, saved = getattr(self, "_module", None), self._pending.get("initial_val_metrics")
        fitting = module is not None and getattr(self, "_stage", None) == "fit"
        if fitting and saved and not getattr(module, "initial_val_metrics", None):
            setattr(module, "initial_val_metrics", dict(saved))  # noqa: B010

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module, self._stage = pl_module, stage

    @property
    def _initial_metrics(self) -> dict[str, float]:
        return dict(getattr(getattr(self, "_module", None), "initial_val_metrics", None) or {})

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        if pending.get("initial_val_metrics") and not getattr(pl_module, "initial_val_metrics", None):
            setattr(pl_module, "initial_val_metrics", dict(pending["initial_val_metrics"]))  # noqa: B010
        restore_rng(pending["rng"])


class PlateauResume(Callback):
    """Make the epoch's ``ReduceLROnPlateau`` update that Lightning skips at a resumed run's first epoch end.

    Lightning updates plateau schedulers after ``on_train_epoch_end`` (after the checkpoints of the epoch
    end are written), except while the fit loop is restarting: the epoch a run resumes in, from a
    checkpoint of its middle or of its end, ends without the update, and every later rate differs from
    the uninterrupted run's. Here that update is made just after, at the next epoch's start (or the end of
    training), with the monitored value of that epoch end: the logged one, or, when the resumed run did
    not log it again (a checkpoint of the epoch end, after its validation), the one saved in the
    checkpoint. Checkpoints written at that epoch end still hold the scheduler before the update, as the
    uninterrupted run's do, so a second resume from one of them makes it again.
    """

    def __init__(self) -> None:
        self._saved: dict[str, float] = {}
        self._missed: list[tuple[Any, float]] = []

    @override
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        logged = trainer.callback_metrics if trainer is not None else {}
        monitors = {c.monitor for c in getattr(trainer, "lr_scheduler_configs", []) if c.reduce_on_plateau}
        return {"monitored": {m: float(logged[m]) for m in monitors if m in logged}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = dict(state_dict.get("monitored", {}))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # resumed from a checkpoint of an epoch end (``last.ckpt``): Lightning counts that epoch as done
        # and never updates the plateau schedulers for it; its value is the one the checkpoint saved
        if trainer.fit_loop.resumed_on_epoch_end:
            self._collect(trainer, trainer.current_epoch, {})
            self._apply(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loop = trainer.fit_loop
        progress = loop.epoch_loop.batch_progress
        ended = progress.is_last_batch or progress.current.ready == trainer.num_training_batches
        if loop.restarting and ended:  # else Lightning makes the update itself
            self._collect(trainer, trainer.current_epoch + 1, trainer.callback_metrics)

    def _collect(self, trainer: Trainer, epochs_done: int, logged: Any) -> None:
        """The plateau updates due after ``epochs_done`` epochs, with the logged or else the saved value."""
        if not trainer.lightning_module.automatic_optimization:
            return
        for config in trainer.lr_scheduler_configs:
            monitor = config.monitor
            if not config.reduce_on_plateau or config.interval != "epoch" or epochs_done % config.frequency:
                continue
            if monitor is None:  # Lightning refuses a plateau scheduler without one
                continue
            value = logged.get(monitor, self._saved.get(monitor))
            if value is not None:
                self._missed.append((config, float(value)))
        self._saved = {}

    def _apply(self, trainer: Trainer) -> None:
        missed, self._missed = self._missed, []
        progress = trainer.fit_loop.epoch_loop.scheduler_progress
        for config, value in missed:
            progress.increment_ready()
            trainer.lightning_module.lr_scheduler_step(config.scheduler, value)
            progress.increment_completed()

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer)


class LastCheckpoint(Checkpoint):
    """Write ``<run>/checkpoints/last.ckpt`` every ``every_n_train_steps`` steps and after each epoch.

    The file is written next to it and renamed over it, so a run killed while saving keeps the
    previous ``last.ckpt``. Resume with ``--ckpt_path <run>/checkpoints/last.ckpt`` (or ``--resume
    <run>``); see ``samflow.callbacks.resume``.

    Args:
        every_n_train_steps: also save after every N optimizer steps (0: only at the end of each epoch).
        dirpath: the folder; default the run's ``checkpoints`` folder (``ModelCheckpoint``'s).
    """

    FILE = "last.ckpt"
    #: how the stop line of a signal names the command and the flag that continues it (``on_exception``)
    command = "fit"
    resume_flag: str | None = None  # default: ``--resume <run folder>``

    def __init__(self, every_n_train_steps: int = 50, dirpath: str | None = None) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"last.every_n_train_steps must be 0 or more, got {every_n_train_steps}.")
        self.every_n_train_steps = every_n_train_steps
        self.dirpath = dirpath
        self._saved_step = -1
        self._written_step: int | None = None  # the step last.ckpt holds, once this process wrote it
        self._generators: dict[str, Any] | None = None  # after the last training batch (``capture_rng``)
        self._in_validation = False  # saving in a stopped validation (``on_validation_batch_end``)
        self._before_validation = False  # saving at a batch that a validation follows (``_save_batch``)
        self._validation_batches = (0, 0)  # of this validation: seen here, that every process has

    @property
    @override
    def state_key(self) -> str:
        return "LastCheckpoint"

    def folder(self, trainer: Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath).expanduser()
        best = trainer.checkpoint_callback
        if best is not None and getattr(best, "dirpath", None):
            return Path(best.dirpath)  # type: ignore[attr-defined]
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def save(self, trainer: Trainer) -> Path:
        """Write ``last.ckpt`` now (every rank calls it; rank 0 writes)."""
        path = self.folder(trainer) / self.FILE
        if trainer.is_global_zero:
            write_whole(path, trainer.save_checkpoint)
        else:  # the other ranks join the collectives of saving; rank 0 writes
            trainer.save_checkpoint(partial_path(path))
        trainer.strategy.barrier("LastCheckpoint.save")
        self._saved_step = self._written_step = trainer.global_step
        return path

    def _skip(self, trainer: Trainer) -> bool:
        return bool(
            trainer.sanity_checking
            or getattr(trainer, "fast_dev_run", False)
            or self._saved_step == trainer.global_step
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the step the run starts from (0, or the resumed checkpoint's) counts as saved: a batch that
        # only accumulated gradients ends at that step, and a checkpoint then would lose them
        self._saved_step = trainer.global_step
        note_sigterm_only(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if validates_after_batch(trainer):  # a stop in that validation saves the generators of before it
            self._generators = capture_rng()
        if stopping(trainer):  # a SIGTERM: Lightning stops after this batch, and last.ckpt holds it
            window = inside_window(trainer)  # batches added to the gradients since the optimizer step
            trained = window or self._saved_step != trainer.global_step
            ended = trainer.sanity_checking or getattr(trainer, "fast_dev_run", False)
            if trained and not ended and (not window or keeps_gradients(trainer)):
                self._save_batch(trainer)
            return
        # written only when the optimizer has just stepped (global_step moved past the last save): with
        # ``accumulate_grad_batches`` the batches between optimizer steps hold gradients no checkpoint keeps
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and not self._skip(trainer):
            self._save_batch(trainer)

    def _save_batch(self, trainer: Trainer) -> None:
        """Save at the end of a training batch. When a validation follows it, the checkpoint is marked
        as stopped in that validation's first batch (``on_save_checkpoint``), so that a fit resumed from
        it runs the validation, as the uninterrupted fit did: a run killed in it or after it, before the
        next ``last.ckpt`` (kill -9, out of memory, a lost node: no handler runs), resumed with the next
        training batch and lost that validation's rows, its best checkpoint, plateau and early-stopping
        decisions; at an epoch's end Lightning took such a checkpoint for the epoch's end and left the
        next epoch out."""
        self._before_validation = validates_after_batch(trainer)
        try:
            self.save(trainer)
        finally:
            self._before_validation = False

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
        """A signal during a fit's validation: Lightning stops after this batch, the validation unfinished.
        ``last.ckpt`` then holds the training as it was when the validation began, marked as stopped
        in its first batch, so that the resumed fit runs the whole validation again, then trains on, as
        the uninterrupted fit did (it was not saved: the steps since the last ``last.ckpt`` were lost).
        Under DDP every process takes the decision at the same batch (``stopping``), shared here at each
        batch that every process has: a process stopping alone left the others waiting in the validation."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        seen, every = self._validation_batches
        self._validation_batches = (seen + 1, every)
        if (trainer.world_size > 1 and seen >= every) or not stopping(trainer):  # a collective under DDP
            return
        if trainer.sanity_checking:  # every process stops after this batch (``on_sanity_check_start``)
            return
        if inside_window(trainer) and not keeps_gradients(trainer):
            return
        self._in_validation = True
        try:
            self.save(trainer)
        finally:
            self._in_validation = False

    @override
    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A SIGTERM in a fit's sanity check stops it after the batch, with nothing to save: under DDP
        Lightning's handler, in place until ``on_train_start``, ran ``dist.broadcast`` inside the
        handler on the signalled process alone, and the processes waited for each other for good (a
        2-process fit with SIGTERM to process 1 in its sanity check hung); here the signal is noted
        (``note_sigterm_only``), shared after each batch (``on_validation_batch_end``), and Lightning
        stops every process after the same batch (or before the first training batch)."""
        note_sigterm_only(trainer)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # samflow shards evaluation sets without padding: a process may have a batch fewer, where the
        # others must not wait for it in ``stopping``; a signal there stops after the next training batch
        if trainer.world_size <= 1 or trainer.state.fn != TrainerFn.FITTING:
            return
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        counts = [n for n in batches if n != float("inf")]
        every = sum(int(n) for n in counts) if len(counts) == len(batches) else 0
        every = int(
            trainer.strategy.all_gather(torch.tensor(every, device=trainer.strategy.root_device)).min()
        )
        self._validation_batches = (0, every)

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not (self._in_validation or self._before_validation):
            return
        loops = checkpoint["loops"]["fit_loop"]
        if self._before_validation:
            # the training batch as it is when its validation starts: completed (Lightning counts it
            # after ``on_train_batch_end``), as a checkpoint saved in the validation has it
            for counts in (loops["epoch_loop.batch_progress"][key] for key in ("total", "current")):
                counts["completed"] = counts["processed"]
        # Lightning 2.6 runs a validation again from its start when the checkpoint's validation progress
        # is that of a batch started and not processed (``_EvaluationLoop.restarted_mid_evaluation``);
        # saved at the end of a batch it skipped the validation
        progress = loops["epoch_loop.val_loop.batch_progress"]
        before = progress["total"]["completed"]  # the batches of the epoch's earlier validations
        if self._in_validation:  # less this one's ("current" holds the last validation's before it starts)
            before -= progress["current"]["completed"]
        started = {"ready": before + 1, "started": before + 1}
        progress["total"] = {**started, "processed": before, "completed": before}
        progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
        progress["is_last_batch"] = False
        trained = trainer.fit_loop.epoch_loop.batch_progress
        if trained.is_last_batch or trained.current.ready >= trainer.num_training_batches:
            # the validation of an epoch's end: the resumed fit reads no batch of it, and the training
            # loader's position (every batch handed out) would skip them in the next epoch
            checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] = []
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, RandomState) and self._generators is not None:
                checkpoint["callbacks"][callback.state_key]["rng"] = self._generators

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Say how to continue a fit stopped by a signal: a SIGTERM's line is the command's error line
        (``samflow.cli``), a Ctrl-C's is printed here (Lightning exits with status 1 after it)."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        if not trainer.is_global_zero or trainer.state.fn != TrainerFn.FITTING:
            return
        path = self.folder(trainer) / self.FILE
        flag = self.resume_flag or f"--resume {shown(path.parent.parent)}"
        requeue = any(isinstance(c, SlurmRequeue) and c.requeue for c in trainer.callbacks)  # type: ignore[attr-defined]
        held = f"{shown(path)}" + (f" (step {self._written_step})" if self._written_step is not None else "")
        if not path.is_file():  # a requeued job starts the fit again (SlurmRequeue's note)
            where = "no checkpoint was written yet" + ("" if requeue else "; start the run again")
        elif requeue:  # SlurmRequeue's note says how the run goes on
            where = f"{held} holds it"
        else:
            where = f"{held} is its last checkpoint; continue with the same command and {flag}"
        step = trainer.global_step
        if isinstance(exception, SIGTERMException):
            cause = "SLURM's requeue signal" if requeue else "SIGTERM"
            # first: SlurmRequeue (called before the checkpoint callbacks) says whether the job was requeued
            notes = exception.__dict__.setdefault("__notes__", [])
            notes.insert(0, f"{self.command} stopped by {cause} at step {step}; {where}.")
        else:
            sys.stderr.write(f"samflow: {self.command} interrupted (Ctrl-C) at step {step}; {where}.\n")
            sys.stderr.flush()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the epoch's validation and every other callback's epoch end: ModelCheckpoint has
        # saved its best already, so its state in this file is current
        if not (trainer.sanity_checking or getattr(trainer, "fast_dev_run", False)):
            self._saved_step = -1
            self.save(trainer)


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose best checkpoints carry over into a resumed run wherever its folder is.

    Lightning restores the scores of the best checkpoints (``best_k_models``, ``best_model_score``)
    only when the checkpoint folder is spelled as when they were saved: a fit started with
    ``runs/...`` and resumed through an absolute path, from another working directory, or in a moved
    or copied run folder forgot them, kept the earlier best file and saved the next one as the best
    whatever its score. Here each saved path is read relative to the saved folder and placed in this
    run's checkpoint folder; those whose file is there are kept (a best checkpoint deleted or not
    copied is dropped, the best and the k-th taken from the rest). Files of the run's old place are
    never touched. Resuming, it does not warn that the checkpoint folder "exists and is not empty":
    the run's own checkpoints are expected there (a new run into a used folder is still warned).

    A run killed after saving a best checkpoint and before the next ``last.ckpt`` leaves that file
    behind, unknown to the state it resumes from; the resumed run replays those steps and writes the
    checkpoint again under its own name instead of beside it as ``...-v1.ckpt``.
    """

    #: checkpoint files in the folder at resume that the restored state does not know (see above)
    _leftovers: frozenset[str] = frozenset()
    #: the fit starts from a checkpoint: set by samflow's CLI (Lightning tells ``trainer.ckpt_path`` only
    #: after ``setup``, where the warning is given)
    resuming: bool = False

    @property
    @override
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints of either class load into the other
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            # not trainer.ckpt_path: None at setup, or an earlier call's in a reused trainer
            if self.resuming:
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        self._strategy = trainer.strategy

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, here = state_dict.get("dirpath"), self.dirpath
        if saved is None or here is None:
            super().load_state_dict(state_dict)
            return

        def placed(path: str | None) -> str:
            """``path`` in this run's folder when it was in the saved one, else ``""``."""
            try:
                return os.path.join(here, Path(path or "").relative_to(saved)) if path else ""
            except ValueError:
                return ""

        paths = [
            *state_dict.get("best_k_models", {}),
            state_dict.get("best_model_path"),
            state_dict.get("last_model_path"),
        ]
        here_now = {new for new in map(placed, paths) if new and os.path.isfile(new)}
        files = os.listdir(here) if os.path.isdir(here) else []
        leftovers = {
            os.path.normpath(os.path.join(here, name)) for name in files if name.endswith(self.FILE_EXTENSION)
        }
        leftovers -= {os.path.normpath(path) for path in here_now}
        strategy = getattr(self, "_strategy", None)
        if strategy is not None:  # rank 0's view of the files, so that every rank keeps the same
            here_now, leftovers = strategy.broadcast((here_now, leftovers))
        self._leftovers = frozenset(leftovers)

        def kept(path: str | None) -> str:
            return new if (new := placed(path)) in here_now else ""

        best_k = {
            new: score for path, score in state_dict.get("best_k_models", {}).items() if (new := kept(path))
        }
        best = kept(state_dict.get("best_model_path"))
        state = {
            **state_dict,
            "dirpath": here,
            "best_k_models": best_k,
            "last_model_path": kept(state_dict.get("last_model_path")),
        }
        if best_k:
            best = (min if self.mode == "min" else max)(best_k, key=best_k.__getitem__)
            kth = (max if self.mode == "min" else min)(best_k, key=best_k.__getitem__)
            state.update(best_model_score=best_k[best], kth_best_model_path=kth, kth_value=best_k[kth])
        elif state_dict.get("best_k_models") or not best:  # none of the best files is here
            best = ""
            state.update(best_model_score=None, kth_best_model_path="", kth_value=self.kth_value)
        super().load_state_dict({**state, "best_model_path": best})

    @override
    def file_exists(self, filepath: str | Path, trainer: Trainer) -> bool:
        # a leftover of the interrupted run is written over once (the same step saved again), not
        # kept beside a "-v1" copy; the same on every rank (``_leftovers`` is rank 0's)
        path = os.path.normpath(str(filepath))
        if path in self._leftovers:
            self._leftovers = self._leftovers - {path}
            return False
        return super().file_exists(filepath, trainer)


def ignore_hpc_checkpoints() -> None:
    """A trainer with ``SlurmRequeue`` (every samflow command's) never loads ``hpc_ckpt_N.ckpt`` by
    Lightning's automatic HPC resume, and says so in one line. Lightning loads the newest such file of
    ``default_root_dir`` (``runs/<experiment>``) into any fit, validate, test or predict without a
    ``ckpt_path`` whenever it detects SLURM: a file left by Lightning's own auto-requeue (an older samflow,
    a validate of one, plain Lightning) made every later new fit of the experiment in a SLURM job resume
    it, or refuse it as another experiment's. samflow continues a run only with ``--resume`` /
    ``--ckpt_path`` or in its requeued job (``run.json``, ``samflow.run_placement``). Lightning's
    ``_CheckpointConnector._hpc_resume_path`` is wrapped once; other trainers keep Lightning's behaviour."""
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    found = _CheckpointConnector.__dict__.get("_hpc_resume_path")
    if not isinstance(found, property) or found.fget is None or getattr(found.fget, "samflow", False):
        return
    lightnings = found.fget

    def _hpc_resume_path(connector: _CheckpointConnector) -> str | None:
        path = lightnings(connector)
        trainer = connector.trainer
        if path is None or not any(isinstance(c, SlurmRequeue) for c in trainer.callbacks):  # type: ignore[attr-defined]
            return path
        warned: set[str] = connector.__dict__.setdefault("_samflow_hpc_warned", set())
        if path not in warned and trainer.is_global_zero and first_process():
            sys.stderr.write(
                f"samflow: warning: {shown(path)} is ignored: Lightning's auto-requeue checkpoint (an older "
                "samflow's, or plain Lightning's); samflow continues a run only with --resume or in its "
                "requeued SLURM job. It can be deleted.\n"
            )
            sys.stderr.flush()
        warned.add(path)
        return None

    _hpc_resume_path.samflow = True  # type: ignore[attr-defined]
    _CheckpointConnector._hpc_resume_path = property(_hpc_resume_path)  # type: ignore[method-assign,assignment]


class SlurmRequeue(Callback):
    """SLURM's requeue signal (``#SBATCH --signal=SIGUSR1@90``) stops the fit as a SIGTERM does, and the
    job is requeued to continue the same run.

    Lightning's own auto-requeue (``SLURMEnvironment(auto_requeue=True)``, its default under SLURM) saved
    ``hpc_ckpt_N.ckpt`` from inside the signal handler, part way through a step, into
    ``runs/<experiment>/`` (outside the run folder), and its restarted job loaded that file into a new
    ``version_N`` and a new W&B run, without samflow's check of the experiment; a later fit of the
    experiment in any SLURM job loaded it again. Here it is turned off: the signal stops the fit after the
    batch it comes in, with ``last.ckpt`` holding that batch (``LastCheckpoint``), then process 0 runs
    ``scontrol requeue <job>``. The restarted job (``SLURM_RESTART_COUNT``) continues the run whose
    ``run.json`` names the job (``samflow.run_placement``), in its folder and W&B run, exactly as
    ``--resume`` does. ``SLURMEnvironment(auto_requeue=False)`` in ``trainer.plugins`` turns both off.
    Under ``torchrun`` in a SLURM job Lightning takes torchrun's environment: the signal is ``SIGUSR1``,
    which torchrun passes on to every process only when started with ``--signals-to-handle
    SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`` (else it dies of it), then waits 30 s for them
    (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``); before, the processes had no handler and died of it too.

    The signal before the first training batch: ``samflow fit`` holds it from the command's start
    (``requeue_signal_held``: imports, the model, the data listing, the checkpoint loaded), and this
    callback's handler is in place from the sanity check on. A signal held, or one in the sanity check's
    last batch, stops the fit at the sanity check's start or before the first training batch, whichever
    comes first; one in an earlier batch of the sanity check stops it after that batch (as a SIGTERM).
    Nothing is trained, so nothing is saved: the job is requeued, and the restarted job starts the fit
    again (a new fit's folder is removed, as after any stop before its first step) or continues the run
    from the ``last.ckpt`` it was resumed from, which is left as it was. Before, the signal's default
    action killed the process: the job ended without being requeued. Every process takes the decision
    together under DDP. A ``requeue_signal`` other than ``SIGUSR1``, and a signal in the first tenth of a
    second of the process (Python's start, before ``samflow.cli`` holds it), are not held.
    ``samflow student`` is requeued the same way (its ``--out`` holds the ``run.json``). A ``samflow
    sweep`` trial's fit (``SWEEP_REQUEUES`` in its environment) stops the same way and leaves
    ``scontrol requeue`` to its sweep, which continues the trial from this ``last.ckpt``.

    ``samflow validate``, ``test`` and ``predict`` in a SLURM job are not requeued (they have no run to
    continue): Lightning's auto-requeue is off for them too (it saved ``hpc_ckpt_N.ckpt`` from inside the
    handler and ran ``scontrol requeue``, and the command finished with status 0; a later new fit of the
    experiment loaded that file and was refused). The signal is held from the command's start
    (``requeue_signal_held``) to its end, and noted only: the command goes on to the result and exit
    status it has without the signal, and process 0 prints one line saying so. ``samflow predict
    --prompts`` and ``predict-slide`` (no trainer) hold it the same way. A signal held by these commands
    is never delivered at their end (a fit's is, when no ``SlurmRequeue`` took it: the process ends as
    it did without the hold). No samflow command loads an ``hpc_ckpt_N.ckpt`` by Lightning's automatic
    HPC resume (``ignore_hpc_checkpoints``): a fit continues a run only with ``--resume`` /
    ``--ckpt_path`` or in its requeued job (``run.json``).
    """

    def __init__(self) -> None:
        self.requeue = False
        #: what the restarted job starts again when nothing was trained (``samflow student``: its run)
        self.what = "fit"
        self._environment: Any = None
        self._signal: signal.Signals | None = None
        self._held: HeldSignal | None = None  # validate / test / predict: the signal noted (``setup``)
        self._own_hold = False  # that hold is this callback's, given back at the stage's end
        ignore_hpc_checkpoints()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """validate / test / predict in a SLURM job: before Lightning registers its signal handlers, turn
        its auto-requeue off (it saved ``hpc_ckpt_N.ckpt`` and ran ``scontrol requeue`` from the handler,
        then let the command finish) and hold the requeue signal (the command's hold,
        ``requeue_signal_held``, or one of this callback's to the stage's end): the command goes on, with
        one line on process 0, as without the signal."""
        from lightning.fabric.plugins.environments import SLURMEnvironment

        self._held, self._own_hold = None, False
        if trainer.state.fn == TrainerFn.FITTING or slurm_job() is None:
            return
        environment = trainer._accelerator_connector.cluster_environment
        requeue: signal.Signals | None = signal.SIGUSR1  # also under torchrun (its ``--signals-to-handle``)
        if isinstance(environment, SLURMEnvironment):
            requeue = environment.requeue_signal
            if environment.auto_requeue:
                environment.auto_requeue = False
                self._environment = environment
        held = HeldSignal.current
        if held is not None and held.signum == requeue:
            self._held = held
        elif requeue is not None and threading.current_thread() is threading.main_thread():
            self._held, self._own_hold = HeldSignal(requeue, stage), True

    def _report(self, trainer: Trainer) -> None:
        if self._held is not None:
            self._held.report(trainer)

    def _end_stage(self, trainer: Trainer) -> None:
        """The end of a validate / test / predict (also by an error): the environment and the signal's
        handler as they were; a signal held and not yet reported is reported, never delivered. The
        environment also when nothing was held (a stage outside the main thread)."""
        environment, self._environment = self._environment, None
        if environment is not None:
            environment.auto_requeue = True
        held, self._held = self._held, None
        if held is None:
            return
        held.report(trainer)
        if self._own_hold:
            self._own_hold = False
            held.give_back(deliver=False)

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
        self._report(trainer)

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._report(trainer)

    @override
    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._report(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._end_stage(trainer)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # before Lightning registers its signal handlers: it leaves the requeue signal to this callback
        from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

        environment = trainer._accelerator_connector.cluster_environment
        self._signal = None
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and slurm_job():
            environment.auto_requeue = False
            self._environment = environment
            self._signal = environment.requeue_signal
        elif isinstance(environment, TorchElasticEnvironment) and slurm_job():
            # torchrun in a SLURM job: Lightning takes torchrun's environment and handles no requeue
            # signal (the process died of it); torchrun passes it on with ``--signals-to-handle``
            self._signal = signal.SIGUSR1
        self.requeue = False
        held = HeldSignal.current
        if held is not None and held.signum != self._signal:  # not this fit's requeue signal
            held.give_back()

    @override
    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_over(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_over(trainer)

    def _take_over(self, trainer: Trainer) -> None:
        """Put the fit's handler in place (Lightning's are; its teardown puts back the ones from before the
        fit); a requeue signal held since the command's start (``requeue_signal_held``), or noted in the
        sanity check, stops the fit now, on every process."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        requeue = self._signal
        if requeue is None:
            return
        if threading.current_thread() is threading.main_thread():

            def requeue_signal(signum: int, frame: Any) -> None:
                self.requeue = True
                _note_signal(trainer)  # stop after the batch, as a SIGTERM does

            signal.signal(requeue, requeue_signal)
        held = HeldSignal.current
        got = (held is not None and held.signum == requeue and held.take()) or self.requeue
        if trainer.world_size > 1:  # every process reaches this hook: the same decision on each
            flag = torch.tensor(int(got), device=trainer.strategy.root_device)
            got = bool(trainer.strategy.reduce(flag, reduce_op="sum").item())
        if got:
            self.requeue = True
            raise SIGTERMException

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._give_environment_back()
        held = HeldSignal.current
        if held is not None:  # trained to the end: a signal from now on is noted, the command goes on
            held.work_done = "training"

    def _give_environment_back(self) -> None:
        environment, self._environment = self._environment, None
        if environment is not None:
            environment.auto_requeue = True  # the trainer's environment as it was

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._end_stage(trainer)
        if not (self.requeue and isinstance(exception, SIGTERMException)):
            return
        self._give_environment_back()
        job = slurm_job()
        if not trainer.is_global_zero or job is None:
            return
        if requeued_by_sweep():  # a sweep's trial: the sweep continues it from last.ckpt and requeues the job
            exception.add_note(f"samflow sweep requeues SLURM job {job} and continues this trial's run.")
            return
        failed = requeue_job(job)
        # nothing trained (stopped before the first step of a new fit): the restarted job starts it again
        trained = bool(trainer.global_step)
        goes_on = "it continues this run" if trained else f"it starts this {self.what} again"
        exception.add_note(
            f"SLURM job {job} requeued: {goes_on} when it starts again."
            if not failed
            else f"`scontrol requeue {job}` failed ({failed}): resubmit the job"
            + (" with --resume." if trained else ".")
        )
