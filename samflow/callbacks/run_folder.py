"""Run folders: where a run's files go, and how later commands find the run again.

A ``fit`` writes ``runs/<experiment>/version_N/`` (``metrics.csv``, ``config.yaml``,
``checkpoints/``, sample grids) and ``run.json`` there, which records the W&B run id. A later
command given a checkpoint of that folder (``.../version_N/checkpoints/*.ckpt``) uses the folder
again: ``fit`` resumes into it and the same W&B run; ``validate``, ``test`` and ``predict`` write into
a subfolder named after the command (``test/``, then ``test_1/``, ...) and log to the same W&B run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from samflow.console import local_log_dir

__all__ = ["INFO_FILE", "RunInfo", "command_folder", "last_checkpoint", "read_run_info", "run_folder_of"]

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


class RunInfo(Callback):
    """Write ``run.json`` (the W&B run id, the experiment) into the run folder when a fit starts."""

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
        run.mkdir(parents=True, exist_ok=True)
        (run / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
