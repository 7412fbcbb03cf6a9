"""Where a run writes: ``--resume`` found, the loggers pointed at the run folder of ``--ckpt_path``.

``fit`` from a checkpoint continues its run folder and W&B run; ``validate`` / ``test`` / ``predict``
write into a new subfolder of it (``samflow.callbacks.run_folder``). Called by ``SamflowCLI`` before
anything is built.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

from jsonargparse import Namespace

from samflow.callbacks.resume import LastCheckpoint
from samflow.callbacks.run_folder import (
    RunCSVLogger,
    command_folder,
    first_process,
    last_checkpoint,
    read_run_info,
    requeued_run,
    run_folder_of,
    run_in_use,
)
from samflow.config_checks import ConfigError
from samflow.console import shown

__all__ = ["new_wandb_id", "place_run", "resume_checkpoint"]


def new_wandb_id() -> str:
    """A new W&B run id (8 characters of [a-z0-9])."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _runs_under_root_dir(config: Namespace, run_name: str, entries: list[Namespace]) -> None:
    """``--trainer.default_root_dir D``: samflow's own loggers write the runs there (``D/version_N``, the
    W&B files in ``D/wandb``), where ``--resume last`` and a requeued SLURM job look for them; they wrote
    to ``runs/<experiment>`` whatever D was (Lightning uses D only without loggers). Loggers the user
    configured are left as they are."""
    root = config.get("trainer.default_root_dir")
    if not root or Path(root) == Path("runs", run_name):
        return
    default = [
        (str(entry.get("class_path", "")), options)
        for entry in entries
        if (options := entry.get("init_args")) is not None and options.get("save_dir") == "runs"
    ]
    csv = [o for kind, o in default if kind.endswith("CSVLogger") and o.get("name") == run_name]
    if not csv:  # the loggers are the user's own (a sweep's trial folders among them)
        return
    csv[0]["save_dir"], csv[0]["name"] = str(root), ""
    for kind, options in default:
        if kind.endswith("WandbLogger"):
            options["save_dir"] = str(root)


def resume_checkpoint(resume: str, config: Namespace, run_name: str) -> Path:
    """The checkpoint ``--resume`` names: ``last`` (the newest run of the experiment), a run folder, a file."""
    if resume == "last":
        runs = Path(config.get("trainer.default_root_dir") or f"runs/{run_name}")
        found = last_checkpoint(runs)
        if found is None:
            raise FileNotFoundError(
                f"--resume last: no run under {runs} has checkpoints/last.ckpt; start the run without --resume."
            )
        return found
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / LastCheckpoint.FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"--resume {resume}: {path} does not exist; give a run folder that holds checkpoints/last.ckpt."
            )
    elif not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such run folder or checkpoint.")
    return path


def place_run(config: Namespace, command: str, run_name: str) -> tuple[Path | None, Path | None]:
    """Point the loggers at the run folder of ``--ckpt_path`` (or ``--resume``), and give W&B its run id;
    the run folder (None for a new run) and the subfolder a validate / test / predict writes into (None
    for fit).

    ``fit`` continues that folder and W&B run (refused while another live fit trains into it:
    ``run_in_use``); ``validate`` / ``test`` / ``predict`` write into a new subfolder of it named after
    the command (``test``, ``test_1``, ...), claimed as it is named. A new fit gets a W&B id of its own,
    recorded in ``run.json``.
    """
    loggers = config.get("trainer.logger")
    entries = [e for e in (loggers if isinstance(loggers, list) else [loggers]) if isinstance(e, Namespace)]
    _runs_under_root_dir(config, run_name, entries)
    resume = config.get("resume")
    if resume:
        if command != "fit":
            raise ConfigError(
                f"--resume continues a fit; give `samflow {command}` the checkpoint with --ckpt_path."
            )
        if config.get("ckpt_path"):
            raise ConfigError("Give either --resume or --ckpt_path, not both.")
        config["ckpt_path"] = str(resume_checkpoint(str(resume), config, run_name))
        config["resume"] = None

    def options(kind: str) -> list[Namespace]:
        return [e.init_args for e in entries if str(e.get("class_path", "")).endswith(kind)]

    if command == "fit" and not config.get("ckpt_path"):  # a SLURM job requeued: its run goes on
        runs = Path(config.get("trainer.default_root_dir") or f"runs/{run_name}")
        requeued = requeued_run(runs)
        if requeued is not None:
            config["ckpt_path"] = str(requeued / "checkpoints" / LastCheckpoint.FILE)
    run = run_folder_of(config.get("ckpt_path"))
    if run is None:
        if command == "fit":
            for wandb in options("WandbLogger"):
                if not wandb.get("id"):
                    wandb["id"] = new_wandb_id()
        return None, None
    if command == "fit":  # appending to metrics.csv, which Lightning's CSVLogger would delete
        holder = run_in_use(run) if first_process() else None
        if holder is not None:
            given = f"--resume {resume}" if resume else "--ckpt_path"
            raise ConfigError(
                f"{given}: {shown(run)} is being trained by another samflow fit ({holder}); wait until it "
                "ends, or start a new run without --resume."
            )
        parent, folder, root = run.parent, run.name, run
        for entry in entries:
            if entry.get("class_path") == "lightning.pytorch.loggers.CSVLogger":
                entry["class_path"] = f"{RunCSVLogger.__module__}.{RunCSVLogger.__name__}"
    else:
        parent, folder = run, command_folder(run, command)
        root = run / folder
    for csv in options("CSVLogger"):
        csv["save_dir"], csv["name"], csv["version"] = str(parent), "", folder
    wandb_id = read_run_info(run).get("wandb_id")
    for wandb in options("WandbLogger"):
        wandb["id"] = wandb_id or wandb.get("id") or new_wandb_id()
        wandb["resume"] = "allow" if wandb_id else wandb.get("resume")
    config["trainer.default_root_dir"] = str(root)  # shown in the run header (``RunHeader``)
    return run, None if command == "fit" else root
