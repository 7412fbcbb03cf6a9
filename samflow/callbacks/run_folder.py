"""Run folders: where a run's files go, and how later commands find the run again.

A ``fit`` writes ``runs/<experiment>/version_N/`` (``metrics.csv``, ``config.yaml``,
``checkpoints/``, sample grids) and ``run.json`` there, which records the W&B run id. A later
command given a checkpoint of that folder (``.../version_N/checkpoints/*.ckpt``) uses the folder
again: ``fit`` resumes into it and the same W&B run; ``validate``, ``test`` and ``predict`` write into
a subfolder named after the command (``test/``, then ``test_1/``, ...) and log to the same W&B run.
``RunCSVLogger`` appends to the folder's ``metrics.csv`` where Lightning's ``CSVLogger`` deletes it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override

from samflow.console import local_log_dir

__all__ = [
    "INFO_FILE",
    "RunCSVLogger",
    "RunInfo",
    "command_folder",
    "last_checkpoint",
    "read_run_info",
    "requeued_run",
    "run_folder_of",
    "slurm_job",
]

INFO_FILE = "run.json"
_MARKERS = (INFO_FILE, "config.yaml", "metrics.csv", "hparams.yaml")


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


def command_folder(run: Path, command: str) -> str:
    """The first free subfolder name for ``command`` in ``run``: ``test``, ``test_1``, ``test_2``, ..."""
    name, n = command, 0
    while (run / name).exists():
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


def slurm_job() -> str | None:
    """This SLURM job's id as ``scontrol requeue`` takes it (``<array job>_<task>`` in a job array), or None."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeued_run(runs: Path) -> Path | None:
    """In a SLURM job started again after a requeue (``SLURM_RESTART_COUNT`` 1 or more: by samflow's
    ``SlurmRequeue``, ``scontrol requeue`` or a preemption), the newest run under ``runs``
    (``runs/<experiment>``) that this job started and that has ``last.ckpt``; else None."""
    job = slurm_job()
    if job is None or int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    found = [
        p
        for p in runs.glob("version_*")
        if read_run_info(p).get("slurm_job") == job and (p / "checkpoints" / "last.ckpt").is_file()
    ]
    return max(found, key=_version) if found else None


class RunInfo(Callback):
    """Write ``run.json`` (the W&B run id, the experiment, the SLURM job) into the run folder when a fit starts."""

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = local_log_dir(trainer) if trainer.is_global_zero else None
        if log_dir is None:
            return
        run = Path(log_dir)
        info = read_run_info(run)
        info["experiment"] = self.experiment
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                info["wandb_id"] = logger.version
        job = slurm_job()
        if job is not None:  # its restart after a requeue continues this run (``requeued_run``)
            info["slurm_job"] = job
        run.mkdir(parents=True, exist_ok=True)
        (run / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


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

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if not isinstance(self._experiment, ExperimentWriter):  # None before the first use
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir, drop_from_step=self.drop_from_step)
        return self._experiment
