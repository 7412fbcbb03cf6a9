"""SLURM's requeue signal held from the start of a ``samflow`` command, before its imports.

A SLURM job's ``#SBATCH --signal=SIGUSR1@90`` ends a process whose handler is not in place yet: the
signal's default action. ``samflow.cli`` enters ``requeue_signal_held`` before it imports torch or
Lightning (``import samflow`` imports neither), so the signal is held from about the first tenth of a
second of the command; ``samflow.callbacks.resume.SlurmRequeue`` takes it over in a fit, the store writers
(``samflow embed``, ``samflow proposals``) stop at their next chunk and requeue the job
(``requeue_requested``, ``store_requeued``), ``samflow sweep`` stops its running trial at that trial's
``last.ckpt`` and requeues the job (``samflow.sweep.run``; the trial's own fit leaves the requeue to
it: ``SWEEP_REQUEUES``), and the other commands report it. This module imports nothing of samflow's at
its top, and no third-party package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = [
    "HELD_COMMANDS",
    "REQUEUED_COMMANDS",
    "STORE_COMMANDS",
    "SWEEP_COMMANDS",
    "SWEEP_REQUEUES",
    "HeldSignal",
    "requeue_job",
    "requeue_requested",
    "requeue_signal_held",
    "requeued_by_sweep",
    "slurm_job",
    "store_requeued",
    "work_done",
]


def slurm_job() -> str | None:
    """This SLURM job's id as ``scontrol requeue`` takes it (``<array job>_<task>`` in a job array), or None."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


class HeldSignal:
    """SLURM's requeue signal held from the start of a ``samflow`` command (``requeue_signal_held``), or
    through a validate / test / predict (``SlurmRequeue``): noted, never acted on, where its default
    action killed the process. The ``SlurmRequeue`` of a fit (or of ``samflow student``) takes it over;
    for any other command it only says so, in one line on process 0 (``report``)."""

    #: the hold of the command running in this process
    current: ClassVar[HeldSignal | None] = None

    def __init__(self, signum: signal.Signals, command: str = "fit") -> None:
        self.signum = signum
        self.command = command
        self.got = False
        self.seen = False  # came at some time (``got`` is reset by ``take``)
        self.reported = False
        self.given_back = False
        #: what a requeued command (fit, student: "training"; embed, proposals: "store"; sweep: "study")
        #: finished; a signal then is only noted (``report``)
        self.work_done: str | None = None
        self.previous = signal.signal(signum, self._hold)

    def _hold(self, signum: int, frame: Any) -> None:
        self.got = self.seen = True

    def take(self) -> bool:
        """Whether the signal came since the last call."""
        got, self.got = self.got, False
        return got

    def report(self, trainer: Trainer | None = None) -> None:
        """Once, after the signal came to a command that is not requeued: say so on process 0
        (``first_process``, and ``trainer``'s global rank 0), outside the handler (a line written inside it
        could land within another write to the stream). Nothing is asked before the signal came: it runs
        at every batch's end."""
        if not self.seen or self.reported:
            return
        self.reported = True
        from samflow.callbacks.run_folder import first_process

        if (trainer is None or trainer.is_global_zero) and first_process():
            if self.command in SWEEP_COMMANDS and not self.work_done:  # a sweep requeues from its trial loop
                line = f"`samflow {self.command}` ended before it could stop a trial and requeue the job."
            else:
                why = f"its {self.work_done} is done" if self.work_done else f"only {_REQUEUED_NAMES} are"
                line = (
                    f"`samflow {self.command}` is not requeued ({why}); it goes on until it ends or the "
                    "job's time limit."
                )
            sys.stderr.write(f"samflow: SLURM's requeue signal: {line}\n")
            sys.stderr.flush()

    def give_back(self, deliver: bool = True) -> None:
        """Put back the handler from before; a signal held and not taken is delivered to it now with
        ``deliver`` (a fit's hold: as without the hold, the default action ends the process), else only
        reported (``report``)."""
        if self.given_back:
            return
        self.given_back = True
        signal.signal(self.signum, self.previous if self.previous is not None else signal.SIG_DFL)
        if not deliver:
            self.report()
        elif self.take():
            signal.raise_signal(self.signum)


#: the commands whose start ``requeue_signal_held`` covers: ``fit`` and ``student``, which ``SlurmRequeue``
#: stops and requeues, the store writers (``STORE_COMMANDS``), ``sweep`` (its trials' worker), and those
#: that go on through the signal (``samflow predict --prompts`` is ``predict``)
HELD_COMMANDS = (
    "fit",
    "sweep",
    "student",
    "embed",
    "proposals",
    "validate",
    "test",
    "predict",
    "predict-slide",
    "pseudo-masks",
)
#: those of them that ``SlurmRequeue`` stops and requeues (the others go on through the signal)
REQUEUED_COMMANDS = ("fit", "student")
#: the resumable store writers: stopped at their next chunk of images (``requeue_requested``) and requeued
#: (``store_requeued``); the restarted job's same command finishes the store
STORE_COMMANDS = ("embed", "proposals")
#: ``samflow sweep`` (Optuna's backend) stops its running trial at the trial's ``last.ckpt``, marks it to
#: continue from there and requeues the job (``samflow.sweep.run``)
SWEEP_COMMANDS = ("sweep",)
*_first, _last = (*REQUEUED_COMMANDS, *STORE_COMMANDS, *SWEEP_COMMANDS)
_REQUEUED_NAMES = (
    f"{', '.join(_first)} and {_last}"  # the report's words: "fit, student, embed, proposals and sweep"
)
#: set by ``samflow sweep`` in its trials' environment: a trial's fit stopped by the requeue signal leaves
#: ``scontrol requeue`` to the sweep, which continues the trial from its ``last.ckpt`` in the restarted job
SWEEP_REQUEUES = "SAMFLOW_SWEEP_REQUEUES"


def requeued_by_sweep() -> bool:
    """Whether this process is a ``samflow sweep`` trial's (``SWEEP_REQUEUES``): its sweep requeues the job."""
    return os.environ.get(SWEEP_REQUEUES) == "1"


def requeue_requested() -> bool:
    """Whether SLURM's requeue signal came to this command's hold (``requeue_signal_held``) at some time:
    a store writer (``STORE_COMMANDS``) asks before each chunk, and stops."""
    held = HeldSignal.current
    return held is not None and held.seen


def work_done(what: str) -> None:
    """A store writer finished its store, or a sweep its study (``what``): a requeue signal that came is
    only noted (``report``)."""
    if HeldSignal.current is not None:
        HeldSignal.current.work_done = what


def requeue_job(job: str) -> str:
    """Run ``scontrol requeue <job>``; returns why it failed, "" when it did not."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
    except OSError as err:
        return str(err)
    if done.returncode == 0:
        return ""
    return " ".join(done.stderr.split()) or f"exit status {done.returncode}"


def store_requeued(command: str, written: str, first: bool) -> str:
    """The one line of a store writer (``samflow embed``, ``samflow proposals``) that SLURM's requeue signal
    stopped before its store was complete (``written``: how much of it is), once every rank has stopped;
    process 0 (``first``) requeues the job: the same command in the restarted job finishes the store."""
    if HeldSignal.current is not None:
        HeldSignal.current.reported = True  # this line says it
    job = slurm_job()
    stopped = f"samflow {command}: SLURM's requeue signal: stopped with {written} (kept)"
    if not first:
        return f"{stopped}; process 0 requeues SLURM job {job}."
    failed = requeue_job(job) if job else "not in a SLURM job"
    if failed:
        return (
            f"{stopped}; `scontrol requeue {job}` failed ({failed}): run the same command again to finish it."
        )
    return (
        f"{stopped}; SLURM job {job} requeued: the same command finishes the store when the job starts again."
    )


@contextlib.contextmanager
def requeue_signal_held(command: str) -> Iterator[None]:
    """Around a ``samflow`` command: in a SLURM job (``slurm_job``), hold SLURM's requeue signal
    (``SIGUSR1``) from the command's start. ``fit`` (and ``student``, the same way) holds it until
    ``SlurmRequeue`` takes it over, so that a signal before the fit's handler (the imports, the config,
    the model, the data listing, a checkpoint loaded) stops the fit and requeues the job instead of
    killing the process (``SlurmRequeue``); a fit whose
    ``SlurmRequeue`` does not handle it gives it back at ``on_fit_start``, and at the end of the command
    the handler from before is put back, and a held signal that no fit took is delivered to it.
    ``validate``, ``test``, ``predict`` (with or without a trainer: ``--prompts``), ``predict-slide``
    and ``pseudo-masks`` hold it to their end: it is noted, reported in one line on process 0, and never
    delivered, so that the command goes on (it has no run to requeue); so does ``student`` once its
    training ended (``SlurmRequeue.on_fit_end``: in its test). ``embed`` and ``proposals`` hold it to their
    end too, and stop at their next chunk of images when it came (``requeue_requested``,
    ``store_requeued``). ``sweep`` holds it to its end: its worker passes it on to the running trial, which
    stops at its ``last.ckpt``, and requeues the job (``samflow.sweep.run``). Nothing is held outside
    SLURM or for another command."""
    if (
        command not in HELD_COMMANDS
        or slurm_job() is None
        or HeldSignal.current is not None
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    held = HeldSignal.current = HeldSignal(signal.SIGUSR1, command)
    try:
        yield
    finally:
        HeldSignal.current = None
        held.give_back(deliver=command in REQUEUED_COMMANDS and not held.work_done)
