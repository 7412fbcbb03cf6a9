"""Run folders: where a run's files go, and how later commands find the run again.

A ``fit`` writes ``runs/<experiment>/version_N/`` (``metrics.csv``, ``config.yaml``,
``checkpoints/``, sample grids) and ``run.json`` there, which records the W&B run id. A later
command given a checkpoint of that folder (``.../version_N/checkpoints/*.ckpt``) uses the folder
again: ``fit`` resumes into it and the same W&B run; ``validate``, ``test`` and ``predict`` write into
a subfolder named after the command (``test/``, then ``test_1/``, ...) and log to the same W&B run.
``RunCSVLogger`` appends to the folder's ``metrics.csv`` where Lightning's ``CSVLogger`` deletes it.

Several processes may start runs of one experiment at once (sweep agents, SLURM jobs, a ``test`` beside
a ``fit``): a new ``version_N`` and a command's subfolder are claimed by creating the folder, which
fails for all but one process, and the others take the next name. A fit holds its folder's lock file
(``.fit.lock``) while it trains, so that no second fit continues the same run meanwhile; ``samflow embed``
and the predict commands hold a lock file of their own in the folder they write (``hold_folder``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override

from samflow.callbacks.resume_config import ResumeError
from samflow.console import local_log_dir, shown
from samflow.requeue_hold import slurm_job

__all__ = [
    "INFO_FILE",
    "LOCK_FILE",
    "RunCSVLogger",
    "RunInfo",
    "RunLock",
    "claim_folder",
    "command_folder",
    "first_process",
    "folder_in_use",
    "hold_folder",
    "last_checkpoint",
    "read_run_info",
    "remove_unwritten",
    "requeued_run",
    "run_folder_of",
    "run_in_use",
    "slurm_job",
]

INFO_FILE = "run.json"
LOCK_FILE = ".fit.lock"  # held by the fit training into the folder (``RunLock``)
_MARKERS = (INFO_FILE, "config.yaml", "metrics.csv", "hparams.yaml")
#: what a command writes into its folder as it starts (LightningCLI's config, the logger's hparams)
START_FILES = frozenset({"config.yaml", "hparams.yaml"})
#: and a fit into its run folder before its first training step: ``run.json``, a ``metrics.csv`` without
#: rows, the sanity check's sample pictures (``samples/*.png``) and an empty ``checkpoints/``
_RUN_START_FILES = START_FILES | {INFO_FILE, "metrics.csv"}


def run_folder_of(ckpt_path: str | Path | None) -> Path | None:
    """The run folder of a checkpoint in ``<run>/checkpoints/``, or None (a checkpoint elsewhere)."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return None
    path = Path(ckpt_path).expanduser().resolve()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and any((run / marker).is_file() for marker in _MARKERS):
        return run
    return None


def read_run_info(run: Path) -> dict[str, Any]:
    """The run's ``run.json`` (``{"wandb_id": ...}``), or ``{}``."""
    try:
        info = json.loads((run / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def first_process() -> bool:
    """Whether this process is the first of its run as the environment says before the ranks are set up
    (torchrun's ``RANK``, ``SLURM_PROCID``, a launched rank's ``LOCAL_RANK``, ``NODE_RANK``): the one
    that claims the run's folders. A single process is the first."""
    rank = getattr(rank_zero_only, "rank", 0)
    return rank == 0 and os.environ.get("NODE_RANK", "0") in ("", "0")


def claim_folder(path: Path) -> bool:
    """Create ``path`` (its parents as needed) as this process's claim; False when it exists already
    (another process claimed it first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        return False
    return True


def remove_unwritten(folder: Path, run: bool = False) -> None:
    """Remove ``folder`` while it holds nothing but what its command wrote as it started
    (``START_FILES``; with ``run``, a fit's run folder: also ``run.json``, a ``metrics.csv`` without rows,
    the sanity check's sample pictures and an empty ``checkpoints/``). Left, a command's subfolder took
    its name from the next one, and a run folder a version number and ``--resume last``'s eye. A folder
    holding anything else, or written to meanwhile, stays."""
    if not folder.is_dir():
        return
    files = [p for p in folder.rglob("*") if not p.is_dir()]
    folders = sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    if not all(_start_file(p.relative_to(folder), run) for p in files):
        return
    if not all(run and p.relative_to(folder).as_posix() in ("samples", "checkpoints") for p in folders):
        return
    if any(p.name == "metrics.csv" and len(p.read_text(errors="ignore").splitlines()) > 1 for p in files):
        return  # metric rows: something ran
    with contextlib.suppress(OSError):  # another rank, or a file written meanwhile: the folder stays
        for path in files:
            path.unlink()
        for path in [*folders, folder]:
            path.rmdir()


def _start_file(path: Path, run: bool) -> bool:
    """Whether ``path`` (relative to its folder) is a file its command writes as it starts."""
    if len(path.parts) == 1:
        return path.name in (_RUN_START_FILES if run else START_FILES)
    return run and len(path.parts) == 2 and path.parts[0] == "samples" and path.suffix == ".png"


def command_folder(run: Path, command: str) -> str:
    """The first free subfolder name for ``command`` in ``run``: ``test``, ``test_1``, ``test_2``, ...;
    the first process of the command claims it (``claim_folder``), so that two commands started at
    once take two names."""
    name, n = command, 0
    while (run / name).exists() or (first_process() and not claim_folder(run / name)):
        n += 1
        name = f"{command}_{n}"
    return name


def _version(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def last_checkpoint(runs: Path) -> Path | None:
    """``last.ckpt`` of the newest ``version_N`` under ``runs`` (``runs/<experiment>``) that has one."""
    found = [p for p in runs.glob("version_*") if (p / "checkpoints" / "last.ckpt").is_file()]
    return max(found, key=_version) / "checkpoints" / "last.ckpt" if found else None


def fit_command() -> list[str]:
    """This fit's command line as ``samflow.cli.main`` put it in ``sys.argv``: a requeued job runs it again."""
    return [str(arg) for arg in sys.argv[1:]]


def requeued_run(runs: Path) -> Path | None:
    """In a SLURM job started again after a requeue (``SLURM_RESTART_COUNT`` 1 or more: by samflow's
    ``SlurmRequeue``, ``scontrol requeue`` or a preemption), the newest run under ``runs``
    (``runs/<experiment>``) that this job started with this command line and that has ``last.ckpt``;
    else None. A job script of several fits of one experiment continues each fit's own run (the
    newest of the job was another command's, which the first fit took over)."""
    job = slurm_job()
    if job is None or int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    command = fit_command()
    found = []
    for p in runs.glob("version_*"):
        info = read_run_info(p)
        ours = info.get("slurm_job") == job and info.get("slurm_command", command) == command
        if ours and (p / "checkpoints" / "last.ckpt").is_file():
            found.append(p)
    return max(found, key=_version) if found else None


def _holder(path: Path) -> str:
    """Who holds the lock file ``path``, as its holder wrote it (``pid N on HOST``)."""
    with contextlib.suppress(OSError):
        return path.read_text().strip() or "another process"
    return "another process"


def run_in_use(run: Path) -> str | None:
    """Who trains into ``run`` now (``pid N on HOST``): a live process holding its ``LOCK_FILE``; else None.
    A killed fit holds nothing: its lock ended with its process."""
    lock = RunLock(run)
    try:
        if lock.acquire():
            return None
        return _holder(run / LOCK_FILE)
    finally:
        lock.release()


def folder_in_use(folder: Path, name: str) -> str | None:
    """Who holds the lock file ``name`` of ``folder`` now (``pid N on HOST``): a live process; else None.
    Creates nothing (a missing lock file is held by no one: a holder's file stays at its path until it
    lets go), so it can be asked before a command has decided to write."""
    try:
        import fcntl
    except ImportError:  # no flock on this system
        return None
    path = folder / name
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below, which ends the shared lock
    except OSError:
        return None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: two askers never refuse each other
        except BlockingIOError:
            return _holder(path)
        except OSError:  # a filesystem without flock
            return None
    return None


def hold_folder(folder: Path, name: str, refusal: Callable[[str], Exception]) -> RunLock:
    """Take ``folder``'s lock file ``name`` (``RunLock``) for the command about to write there; when a live
    process holds it, raise ``refusal(holder)`` (``holder``: ``pid N on HOST``) having written nothing."""
    lock = RunLock(folder, name)
    if not lock.acquire():
        raise refusal(_holder(lock.path))
    return lock


class RunLock:
    """The lock a fit holds on its run folder while it trains (``LOCK_FILE``, an ``flock``, released by
    the kernel when the process ends however it ends); ``name``: another lock file (``samflow embed``'s
    on its store, the predict commands' on their output folder). A filesystem without ``flock`` (or a
    folder this process cannot write) locks nothing; NFS and Lustre mounted with ``flock`` lock across
    machines. The folders ``acquire`` had to create are removed again by ``release`` while empty."""

    def __init__(self, run: Path, name: str = LOCK_FILE) -> None:
        self.path = run / name
        self._file: IO[str] | None = None
        self._made: list[Path] = []  # the folders acquire created, innermost first

    def acquire(self) -> bool:
        """Take the lock; False when another process holds it."""
        try:
            import fcntl
        except ImportError:  # no flock on this system
            return True
        missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                file = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is held
            except OSError:  # a folder this process cannot write: nothing to lock
                return True
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                return False
            except OSError:  # a filesystem without flock
                file.close()
                return True
            try:
                same = os.fstat(file.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder removed as we opened it
                break
            file.close()
        file.truncate(0)
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file
        self._made = [p for p in missing if p.is_dir()]
        return True

    def release(self) -> None:
        """Remove the lock file and end the lock (nothing when not held); then the folders ``acquire``
        created, while they hold nothing."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._file.close()
        self._file = None
        with contextlib.suppress(OSError):  # a folder something was written into stays, and its parents
            for folder in self._made:
                folder.rmdir()
        self._made = []


class RunInfo(Callback):
    """Write ``run.json`` (the W&B run id, the experiment, the SLURM job) into the run folder when a fit
    starts, and hold the folder's ``RunLock`` until the fit ends; a fit whose folder another live fit
    holds stops before writing anything there."""

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        self._lock: RunLock | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = local_log_dir(trainer) if trainer.is_global_zero else None
        if log_dir is None:
            return
        run = Path(log_dir)
        self._release()
        lock = RunLock(run)
        if not lock.acquire():
            raise ResumeError(
                f"{shown(run)} is being trained by another samflow fit ({_holder(lock.path)}); wait until it "
                "ends, or start a new run without --resume."
            )
        self._lock = lock
        info = read_run_info(run)
        info["experiment"] = self.experiment
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                info["wandb_id"] = logger.version
        job = slurm_job()
        if job is not None:  # its restart after a requeue continues this run (``requeued_run``)
            info["slurm_job"] = job
            info["slurm_command"] = fit_command()  # and the command: the job may run several fits
        run.mkdir(parents=True, exist_ok=True)
        (run / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv`` under its header; with
    ``drop_from_step``, without its rows of that step and later."""

    def __init__(self, log_dir: str, drop_from_step: int | None = None) -> None:
        self.drop_from_step = drop_from_step
        super().__init__(log_dir=log_dir)  # reads the file (_check_log_dir_exists)

    @override
    def _check_log_dir_exists(self) -> None:  # Lightning deletes the file here
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            text = file.read()
        kept = text if not text or text.endswith("\n") else text[: text.rfind("\n") + 1]  # a row cut short
        if self.drop_from_step is not None:
            lines = kept.splitlines(keepends=True)
            column = next(csv.reader(lines[:1]), []).index("step") if lines else -1
            kept = "".join(
                line
                for i, line in enumerate(lines)
                if i == 0 or _step_before(next(csv.reader([line]))[column], self.drop_from_step)
            )
        if kept != text:
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                file.write(kept)
        # Lightning's writer adds keys not in the header yet and rewrites the file under all of them
        self.metrics_keys = next(csv.reader(io.StringIO(kept)), [])


def _step_before(value: str, step: int) -> bool:
    """Whether a row's ``step`` cell is empty or below ``step``."""
    return not value or int(float(value)) < step


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that appends to the run folder's ``metrics.csv`` instead of deleting it.

    A resumed fit logs into the folder of the run it continues: the rows there stay (also those the
    killed run logged after its last checkpoint, which the resumed run logs again), new rows follow,
    and a key the header lacks rewrites the file once under a header of every key, so each row's
    values stay under their keys. A last row cut short by a kill is dropped.

    Args:
        drop_from_step: also drop the rows logged at this optimizer step or later (``samflow student
            --resume``: those of the killed run after its checkpoint, which the resumed run logs again).
        **kwargs: ``CSVLogger``'s.
    """

    def __init__(self, *args: Any, drop_from_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop_from_step = drop_from_step
        self.claimed: Path | None = None  # the new version_N folder this process created

    @override
    def _get_next_version(self) -> int:
        """The next ``version_N``; the first process of the run claims it by creating its folder
        (``claim_folder``), taking the next N while another process's run holds it."""
        version = super()._get_next_version()
        if "://" in self.root_dir or not first_process():  # a remote folder; a rank that writes nothing
            return version
        while not claim_folder(Path(self.root_dir, f"version_{version}")):
            version += 1
        self.claimed = Path(self.root_dir, f"version_{version}")
        return version

    def release_claim(self) -> None:
        """Remove the ``version_N`` this process claimed while it holds only what a fit writes before its
        first training step (``remove_unwritten``): a new run stopped or failed before it trained."""
        if self.claimed is not None:
            remove_unwritten(self.claimed, run=True)

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if not isinstance(self._experiment, ExperimentWriter):  # None before the first use
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir, drop_from_step=self.drop_from_step)
        return self._experiment
