"""The Optuna backend: a study in an RDB storage, one ``samflow fit`` subprocess per trial.

Why a subprocess per trial: a trial that fails in any way (a value a class refuses, a NaN loss, CUDA
out of memory, a segfault, a killed process) ends only that process, and the sweep records its
one-line error and goes on; memory, CUDA state, W&B and Lightning globals start fresh each trial; a
trial on several devices is Lightning's own DDP launch (``samflow fit`` re-runs its argv per rank)
inside the trial's process group, which the sweep ends as a whole when interrupted. The cost is the
start of a Python process per trial (a few seconds), small against training.

Workers: every ``samflow sweep`` with the same ``--storage`` and ``--study`` pulls trials from one
study (``storage`` holds it, with the trials' heartbeats and the re-queueing of a dead worker's trial).
On Linux the trial's process is killed when its worker dies (``PR_SET_PDEATHSIG``), so no trial trains
on without its worker.

Interruptions: a sweep ended by Ctrl-C or SIGTERM ends its running trial (which saves its
``last.ckpt``), marks it failed and queues its values again, as a new trial that continues the ended
trial's run from that ``last.ckpt`` (``--resume`` of its folder) when the sweep is started again. In a
SLURM job, the requeue signal (``#SBATCH --signal=USR1@90``, held from the command's start:
``samflow.requeue_hold``) is passed on to the running trial, whose fit stops at its ``last.ckpt``
without requeuing the job itself (``SWEEP_REQUEUES``); the sweep then marks the trial so, queues it to
continue, runs ``scontrol requeue`` and exits 1, and the restarted job's same command continues the
study with that trial. A trial whose worker died starts again from its first epoch, in a folder of its
own (its folder may be on the dead worker's machine, or still written).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samflow.requeue_hold import (
    SWEEP_REQUEUES,
    HeldSignal,
    requeue_job,
    requeue_requested,
    slurm_job,
    work_done,
)
from samflow.sweep.agent import run_folder_args
from samflow.sweep.check import experiment_path
from samflow.sweep.report import RESULT_FILE, TRIAL_FILE
from samflow.sweep.spec import SweepError, SweepSpec
from samflow.sweep.storage import heartbeat_interval, open_storage, place_of, replaced, run_again

DEFAULT_TRIALS = 20  # random and bayes sweeps without --trials or run_cap
POLL_S = 0.5  # how often a running trial's worker looks for SLURM's requeue signal
LAST_CHECKPOINT = Path("checkpoints", "last.ckpt")  # in a trial's folder (``LastCheckpoint``)
REQUEUED = "stopped by SLURM's requeue signal"  # the error of a trial the signal stopped


@dataclass
class Outcome:
    """How one trial ended: state (complete | pruned | fail), the metric's last value, error, epochs."""

    state: str
    value: float | None = None
    error: str = ""
    epochs: int = 0
    requeued: bool = False  # SLURM's requeue signal stopped it before its end


@dataclass
class Sweep:
    """One sweep being run: the checked file, its experiment, study and folder."""

    spec: SweepSpec
    experiment: Path
    study_name: str
    folder: Path  # runs/<experiment>/sweeps/<study>
    storage_url: str

    @classmethod
    def open(cls, spec: SweepSpec, study: str | None, storage: str | None) -> Sweep:
        experiment = experiment_path(spec)
        name = study or spec.name
        folder = Path("runs") / experiment.stem / "sweeps" / name
        folder.mkdir(parents=True, exist_ok=True)
        url = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
        return cls(spec, experiment, name, folder, url)

    def study(self, *, existing: bool = False) -> Any:
        """The Optuna study (created unless ``existing``), refused when made from another sweep file."""
        import optuna

        # Heartbeats are "experimental" and meant for study.optimize; samflow records them itself.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(self.storage_url)
        if existing and self.study_name not in (names := optuna.get_all_study_names(storage)):
            raise SweepError(
                f"--summary: there is no study {self.study_name!r} in {self.storage_url}; its studies: "
                f"{', '.join(sorted(names)) or 'none'} (name one with --study)."
            )
        direction: Any = self.spec.goal
        study = optuna.create_study(
            storage=storage,
            study_name=self.study_name,
            sampler=self.spec.sampler(),
            pruner=self.spec.pruner(),
            direction=direction,
            load_if_exists=True,
        )
        if study.direction.name.lower() != direction:
            raise SweepError(
                f"study {self.study_name!r} in {self.storage_url} was created to "
                f"{study.direction.name.lower()}; the sweep file says {direction}: use another --study."
            )
        self._check_space(study)
        return study

    def _check_space(self, study: Any) -> None:
        """Record the file's parameters in a new study; refuse a study made from other parameters."""
        mine = self.spec.search_space()
        stored = study.user_attrs.get("search_space")
        if stored is None:
            study.set_user_attr("search_space", mine)
            return
        if stored != mine:
            changed = [
                f"{k}: {stored.get(k, 'absent')} in the study, {mine.get(k, 'absent')} in the file"
                for k in sorted(set(stored) | set(mine))
                if stored.get(k) != mine.get(k)
            ]
            raise SweepError(
                f"study {self.study_name!r} in {self.storage_url} was made from other parameters: "
                f"{'; '.join(changed)}; use another --study or the original file."
            )

    def total(self, trials: int | None) -> int:
        if self.spec.method == "grid":
            return min(trials, self.spec.grid_size()) if trials else self.spec.grid_size()
        return trials or self.spec.run_cap or DEFAULT_TRIALS


def run_optuna(sweep: Sweep, trials: int | None) -> Any:
    """Run trials until the study holds ``sweep.total(trials)`` of them (or the grid is covered); the study."""
    study = sweep.study()
    total = sweep.total(trials)
    print(
        f"samflow sweep: {sweep.spec.method} over {len(sweep.spec.sampled)} parameter(s), {total} trials in "
        f"study {sweep.study_name!r} ({sweep.storage_url}); folders under {sweep.folder}",
        flush=True,
    )
    previous = None
    if threading.current_thread() is threading.main_thread():  # a kill (SLURM, timeout) ends the trial too
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _run_trials(sweep, study, total)
        work_done("study")  # SLURM's requeue signal from now on is only noted
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return study


def _run_trials(sweep: Sweep, study: Any, total: int) -> None:
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    distributions = {k: p.distribution for k, p in sweep.spec.sampled.items()}
    while True:
        optuna.storages.fail_stale_trials(study)
        every = study.get_trials(deepcopy=False)
        dead = replaced(every)
        existing = [t for t in every if t.number not in dead]  # a dead worker's trial runs again
        queued = any(t.state == TrialState.WAITING for t in existing)  # study.ask takes it first
        if _target_reached(sweep.spec, existing) or (not queued and len(existing) >= total):
            break
        grid = sweep.spec.method == "grid"
        if grid and not queued and len(_grid_started(existing)) >= sweep.spec.grid_size():
            break
        if requeue_requested():  # SLURM's requeue signal came before this trial started
            raise SweepError(_requeued(sweep, "stopped between trials"))
        trial = _ask(study, distributions)
        if sweep.spec.method == "grid" and _grid_taken(study, trial):
            # another worker took the grid's last point between our count and our ask
            trial.set_user_attr("skipped", "grid point already taken by another worker")
            study.tell(trial, state=TrialState.FAIL)
            break
        overrides = sweep.spec.overrides(trial.params)
        attrs = storage.get_trial(trial._trial_id).system_attrs
        resume = continued_run(attrs)
        folder = resume or sweep.folder / f"trial-{trial.number}"
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("folder", str(folder))
        shown = " ".join(f"{k}={v}" for k, v in overrides.items() if k in distributions)
        goes_on = f" (continues {folder / LAST_CHECKPOINT})" if resume else ""
        if resume is None and "resume_from" in attrs:
            gone = Path(attrs["resume_from"]) / LAST_CHECKPOINT
            goes_on = f" (trial {attrs['retry_of']}'s {gone} is gone: it starts over)"
        print(f"trial {trial.number}: {shown}{goes_on}", flush=True)
        outcome = run_trial(sweep, study, trial, overrides, folder, storage, resume=resume is not None)
        trial.set_user_attr("epochs", outcome.epochs)
        if outcome.error:
            trial.set_user_attr("error", outcome.error)
        if outcome.requeued:  # stopped at its last.ckpt: its values go on from there in the restarted job
            study.tell(trial, state=TrialState.FAIL)
            continues = queue_again(study, storage.get_trial(trial._trial_id), folder)
            kept = f"at {folder / LAST_CHECKPOINT}" if continues else "before training"
            raise SweepError(
                _requeued(sweep, f"trial {trial.number} stopped {kept}, and runs on as a new trial")
            )
        if outcome.state == "complete":
            study.tell(trial, outcome.value)
        elif outcome.state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, state=TrialState.FAIL)
        value = "" if outcome.value is None else f" {sweep.spec.metric}={outcome.value:.4g}"
        detail = f": {outcome.error}" if outcome.error else ""
        print(
            f"trial {trial.number} {outcome.state}{value} after {outcome.epochs} epoch(s){detail}", flush=True
        )


def _ask(study: Any, distributions: dict[str, Any]) -> Any:
    """A new trial with its values, its first heartbeat recorded (from then on a dead worker's trial is
    found stale); a trial whose values cannot be sampled is failed, and that is the sweep's error."""
    trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    place_of(study, trial)  # what Hyperband's bracket follows (a grid's sampler may have computed it)
    try:
        for name, distribution in distributions.items():
            trial._suggest(name, distribution)
    except Exception as err:  # noqa: BLE001 - whatever the sampler refuses, no trial stays RUNNING
        reason = " ".join(str(err).split())[:300]
        trial.set_user_attr("error", f"no values: {reason}")
        study.tell(trial, state=_failed())
        raise SweepError(
            f"study {study.study_name!r}: trial {trial.number} got no values: {reason}"
        ) from None
    return trial


def queue_again(study: Any, trial: Any, folder: Path) -> bool:
    """Queue the values of ``trial``, which the sweep's interruption or SLURM's requeue signal ended, as a
    new trial that continues its run from ``folder``'s ``last.ckpt``; one stopped before it saved any
    (before its first step) starts over, in a folder of its own (``run_again``). Whether it continues."""
    continues = (folder / LAST_CHECKPOINT).is_file()
    run_again(study, trial, resume=folder if continues else None)
    return continues


def continued_run(system_attrs: dict[str, Any]) -> Path | None:
    """The folder whose run a trial (its ``system_attrs``) continues: that of the interrupted trial it
    runs again (``run_again``'s ``resume_from``), when it holds ``checkpoints/last.ckpt``; else None."""
    folder = system_attrs.get("resume_from")
    if folder and (Path(folder) / LAST_CHECKPOINT).is_file():
        return Path(folder)
    return None


def _requeued(sweep: Sweep, stopped: str) -> str:
    """The line of a sweep that SLURM's requeue signal stopped (``stopped``: where); the job requeued."""
    if HeldSignal.current is not None:
        HeldSignal.current.reported = True  # this line says it
    job = slurm_job()
    head = f"samflow sweep: SLURM's requeue signal: {stopped}"
    failed = requeue_job(job) if job else "not in a SLURM job"
    if failed:
        return f"{head}; `scontrol requeue {job}` failed ({failed}): run the same command again to go on."
    return (
        f"{head}; SLURM job {job} requeued: the same command goes on with study {sweep.study_name!r} when "
        "the job starts again."
    )


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM as SystemExit, so that ``run_trial`` ends the trial's process group and marks it failed."""
    raise SystemExit(128 + signum)


def _target_reached(spec: SweepSpec, trials: list[Any]) -> bool:
    from optuna.trial import TrialState

    if spec.target is None:
        return False
    values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not values:
        return False
    best = max(values) if spec.goal == "maximize" else min(values)
    return best >= spec.target if spec.goal == "maximize" else best <= spec.target


def _grid_started(trials: list[Any]) -> set[int]:
    return {t.system_attrs["grid_id"] for t in trials if "grid_id" in t.system_attrs}


def _grid_taken(study: Any, trial: Any) -> bool:
    """Whether ``trial``'s grid point belongs to an earlier trial (possible only past the grid's size)."""
    mine = study._storage.get_trial(trial._trial_id).system_attrs.get("grid_id")
    trials = study.get_trials(deepcopy=False)
    dead = replaced(trials)
    return any(
        t.system_attrs.get("grid_id") == mine and t.number != trial.number and t.number not in dead
        for t in trials
    )


def flag(key: str, value: Any) -> str:
    """``--key=value`` for an override (a non-string value as JSON, which jsonargparse reads as YAML)."""
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def trial_command(sweep: Sweep, overrides: dict[str, Any], folder: Path) -> list[str]:
    """The ``samflow fit`` of one trial: the experiment, the sweep's fixed flags, the trial's values, its
    folder and W&B group, and the ``TrialReport`` callback."""
    report = {
        "class_path": "samflow.sweep.report.TrialReport",
        "init_args": {"trial_file": str(folder / TRIAL_FILE)},
    }
    return [
        sys.executable,
        "-m",
        "samflow",
        "fit",
        "--experiment",
        str(sweep.experiment),
        *sweep.spec.args,
        *(flag(k, v) for k, v in overrides.items()),
        *run_folder_args(
            folder,
            sweep.study_name,
            project=sweep.spec.raw.get("project"),
            entity=sweep.spec.raw.get("entity"),
        ),
        f"--trainer.callbacks+={json.dumps(report)}",
    ]


def run_trial(
    sweep: Sweep,
    study: Any,
    trial: Any,
    overrides: dict[str, Any],
    folder: Path,
    storage: Any,
    *,
    resume: bool = False,
) -> Outcome:
    """Run one trial's ``samflow fit`` in its own process group (with ``resume``, continuing the run of
    ``folder``); its output goes to ``folder/fit.log`` (appended to when it continues a run). SLURM's
    requeue signal is passed on to the trial's processes, which stop at their ``last.ckpt`` (under
    ``srun`` SLURM signals them too); a trial that then fails is ``Outcome.requeued``."""
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "sweep": str(sweep.spec.path),
        "storage": sweep.storage_url,
        "study": sweep.study_name,
        "trial_id": trial._trial_id,
        "number": trial.number,
        "metric": sweep.spec.metric,
    }
    (folder / TRIAL_FILE).write_text(json.dumps(info, indent=1))
    (folder / RESULT_FILE).unlink(missing_ok=True)  # a continued run's TrialReport writes it again
    command = trial_command(sweep, overrides, folder)
    if resume:
        command.append(f"--resume={folder}")
    (folder / "command.txt").write_text(" ".join(command) + "\n")
    beat = heartbeat_interval()
    passed_on = False
    # a continued run's fit.log holds the interrupted run's lines before its own
    start = (folder / "fit.log").stat().st_size if resume and (folder / "fit.log").is_file() else 0
    with open(folder / "fit.log", "a" if resume else "w") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),  # noqa: PLW1509 - only prctl and getppid run there
            env={**os.environ, SWEEP_REQUEUES: "1"},  # its fit leaves the job's requeue to the sweep
        )
        try:
            beaten = time.monotonic()
            while True:
                try:
                    proc.wait(timeout=min(beat, POLL_S))
                    break
                except subprocess.TimeoutExpired:
                    pass
                if not passed_on and requeue_requested():  # the trial stops at its last.ckpt
                    passed_on = True
                    _signal_group(proc, signal.SIGUSR1)
                if time.monotonic() - beaten >= beat:
                    storage.record_heartbeat(trial._trial_id)
                    beaten = time.monotonic()
        except BaseException:  # Ctrl-C or a kill of the sweep: end the trial's whole process group
            _end_group(proc)
            trial.set_user_attr("error", "the sweep was interrupted")
            study.tell(trial, state=_failed())
            # its values run again when the sweep is started again, from its last.ckpt
            queue_again(study, storage.get_trial(trial._trial_id), folder)
            raise
    ended = outcome(proc.returncode, folder, sweep.spec.metric, log_start=start)
    # A failed trial that the signal may have stopped: the worker passed it on, or SLURM signalled the
    # trial's processes itself (all of an ``srun`` step's) and they ended before the worker looked. One
    # that ended with status 0 is done.
    if proc.returncode != 0 and requeue_requested():
        return Outcome("fail", ended.value, REQUEUED, ended.epochs, requeued=True)
    return ended


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):  # ended already
        pass


def _die_with(worker: int) -> Callable[[], None] | None:
    """Linux: the trial's process gets SIGKILL when its worker dies (``PR_SET_PDEATHSIG``), even by
    SIGKILL, so it never trains on orphaned; elsewhere None (the worker's SIGTERM handling remains)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:  # in the child, between fork and exec
        prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != worker:  # the worker died before prctl took effect
            os._exit(1)

    return arm


def _failed() -> Any:
    from optuna.trial import TrialState

    return TrialState.FAIL


def _end_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def outcome(returncode: int, folder: Path, metric: str, log_start: int = 0) -> Outcome:
    """The trial's ``Outcome`` from its exit status, ``result.json`` and ``fit.log`` (its part from byte
    ``log_start`` on: a continued run's log is appended to the interrupted run's)."""
    result = json.loads((folder / RESULT_FILE).read_text()) if (folder / RESULT_FILE).is_file() else {}
    values = [v for _, v in sorted((int(k), v) for k, v in result.get("values", {}).items())]
    last = values[-1] if values else None
    if returncode != 0:
        return Outcome("fail", last, _error_line(returncode, folder / "fit.log", log_start), len(values))
    if last is None:
        return Outcome("fail", None, f"no validation epoch reported {metric}", 0)
    if not math.isfinite(last):
        return Outcome("fail", last, f"{metric} is {last} after epoch {len(values) - 1}", len(values))
    return Outcome("pruned" if result.get("pruned") else "complete", last, "", len(values))


def _error_line(returncode: int, log: Path, start: int = 0) -> str:
    """The one line that says why a trial's process failed (its output: ``log`` from byte ``start``)."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("samflow: error:"):
            return line.removeprefix("samflow: error:").strip()
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if returncode == -signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    for line in reversed(lines):  # a traceback's last line: "SomeError: message"
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")):
            return line[:500]
    return f"exit status {returncode}: {lines[-1][:300] if lines else 'no output'}"
