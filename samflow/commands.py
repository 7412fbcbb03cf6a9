"""What samflow's argparse commands (``samflow.cli.COMMANDS``) share with ``samflow fit``.

- ``experiment_from_argv``: ``--experiment NAME`` resolved and rewritten to ``--config /abs/path``;
- ``build_experiment``: the model and data module of an experiment, as ``samflow fit`` builds them;
- ``init_process_group``, ``rank_and_world``, ``barrier``: torchrun's process group, joined once, for
  the commands that split their work over ranks (``embed``, ``proposals``, ``predict-slide``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from samflow.experiment_files import ExperimentError, resolve_experiment
from samflow.plugin_check import check_plugins

__all__ = ["barrier", "build_experiment", "experiment_from_argv", "init_process_group", "rank_and_world"]


# ---- experiments ----
def experiment_from_argv(argv: list[str]) -> tuple[list[str], str | None]:
    """Replace ``--experiment NAME`` (or ``--experiment=NAME``) by ``--config /abs/path``.

    ``argv`` starts with the subcommand. The experiment's ``--config`` moves to the front, right after
    it, so that every flag and every other ``--config`` overrides the experiment, also those given
    before ``--experiment`` (jsonargparse applies arguments in order).
    """
    out: list[str] = []
    configs: list[str] = []
    name = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--experiment" or arg.startswith("--experiment="):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise ExperimentError("--experiment needs a name or a YAML path.")
            path = resolve_experiment(value)
            check_plugins(path)
            name = path.stem
            configs += ["--config", str(path)]
        else:
            out.append(arg)
        i += 1
    if configs and out and not out[0].startswith("-"):
        return [out[0], *configs, *out[1:]], name
    return configs + out, name


def build_experiment(experiment: str, overrides: list[str]) -> tuple[Any, Any]:
    """The experiment's model and data module, as `samflow fit` builds them (no trainer run)."""
    from samflow.lightning_cli import SamflowCLI

    args, name = experiment_from_argv(["--experiment", experiment, *overrides])
    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments are given: LightningCLI need not warn
    try:
        cli = SamflowCLI(name or "embed", args=[*args, "--trainer.logger=false"], run=False)
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule


# ---- torchrun's process group ----
def init_process_group() -> None:
    """Join torchrun's process group, once: NCCL on GPUs, each process on its ``LOCAL_RANK``'s GPU (so
    NCCL's collectives need not guess the device), gloo on the CPU."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: under torchrun (``WORLD_SIZE`` > 1) after joining its process
    group (``init_process_group``), else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group()
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    """Wait for every rank (a no-op in one process): a step all of them must have finished first."""
    if dist.is_initialized():
        dist.barrier()
