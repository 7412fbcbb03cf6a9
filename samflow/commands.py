"""What samflow's argparse commands (``samflow.cli.COMMANDS``) share with ``samflow fit``; torch is
imported where it is used, so that the ``samflow`` command starts without it (``samflow.cli``).

- ``experiment_from_argv``: ``--experiment NAME`` resolved and rewritten to ``--config /abs/path``;
- ``build_experiment``: the model and data module of an experiment, as ``samflow fit`` builds them;
- ``init_process_group``, ``rank_and_world``, ``barrier``: torchrun's process group, joined once, for
  the commands that split their work over ranks (``embed``, ``proposals``, ``predict-slide``), and
  waits for the other ranks that last as long as their work does (``barrier``);
- ``ranks_from_slurm``: the tasks of ``srun`` (no torchrun) join as torchrun's ranks would.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from samflow.experiment_files import ExperimentError, resolve_experiment
from samflow.plugin_check import check_plugins

__all__ = [
    "barrier",
    "build_experiment",
    "experiment_from_argv",
    "init_process_group",
    "rank_and_world",
    "ranks_from_slurm",
]


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


def build_experiment(
    experiment: str, overrides: list[str], before_build: Callable[[Any], object] | None = None
) -> tuple[Any, Any]:
    """The experiment's model and data module, as `samflow fit` builds them (no trainer run);
    ``before_build(config)`` is given the parsed config before anything is built (``samflow embed`` takes
    its store's lock there: ``model.sam.embedding_store``)."""
    from samflow.lightning_cli import SamflowCLI

    args, name = experiment_from_argv(["--experiment", experiment, *overrides])
    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments are given: LightningCLI need not warn
    try:
        cli = SamflowCLI(
            name or "embed", args=[*args, "--trainer.logger=false"], run=False, before_build=before_build
        )
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule


# ---- torchrun's process group ----
# how long ``barrier`` waits for a rank that is alive but never arrives: no deadline in practice (the
# ranks' shares may finish hours apart); a rank that stops ends the wait at once
WAIT_LIMIT = timedelta(days=365)
_waits: list[tuple[Any, Any]] = []  # (the default group, the gloo group ``barrier`` waits in)


def init_process_group() -> None:
    """Join torchrun's process group, once: NCCL on GPUs, each process on its ``LOCAL_RANK``'s GPU (so
    NCCL's collectives need not guess the device), gloo on the CPU; then the gloo group that
    ``barrier`` waits in (made by every rank together, while none is busy)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    cpu_group()


def cpu_group() -> Any:
    """A gloo group beside the default one: ``barrier`` waits on the CPU, whatever the default group's
    backend (NCCL's barrier is a collective on the GPU, aborted by NCCL's watchdog at its timeout)."""
    import torch.distributed as dist

    world = dist.group.WORLD
    if not _waits or _waits[0][0] is not world:  # none yet, or one of a destroyed default group
        _waits[:] = [(world, dist.new_group(backend="gloo"))]
    return _waits[0][1]


def ranks_from_slurm() -> None:
    """Under ``srun`` without torchrun (SLURM's tasks: ``SLURM_NTASKS`` > 1), set torchrun's variables
    from SLURM's, as Lightning's ``SLURMEnvironment`` reads them (``samflow fit`` joins the same way):
    ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (``--ntasks-per-node``), and
    ``MASTER_ADDR`` / ``MASTER_PORT`` (the node list's first host, a port from the job id, unless set).
    Else each task took itself for the only process, and all wrote every output into one folder.

    Nothing changes under torchrun (``WORLD_SIZE`` set, also ``srun --ntasks-per-node 1 torchrun``), in
    one task (an ``sbatch`` script's), or in an interactive job (job name ``bash`` / ``interactive``:
    Lightning's rule, there the command is one process). Like Lightning, it needs ``--ntasks-per-node``
    (one line, before anything is written, without it)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from samflow.usage import UsageError

    if not SLURMEnvironment.detect():
        return
    try:
        slurm = SLURMEnvironment()
    except RuntimeError as err:  # SLURM_NTASKS_PER_NODE unset: which tasks share a node is unknown
        tasks = os.environ["SLURM_NTASKS"]
        raise UsageError(
            f"{tasks} SLURM tasks without --ntasks-per-node (Lightning's SLURMEnvironment needs it, as "
            "`samflow fit` does); run `srun --ntasks-per-node N samflow ...` (N tasks on each node) or "
            "`srun --ntasks-per-node 1 torchrun --nproc_per_node N -m samflow ...`."
        ) from err
    world = slurm.world_size()
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(slurm.global_rank()),
        LOCAL_RANK=str(slurm.local_rank()),
        LOCAL_WORLD_SIZE=str(min(world, int(os.environ["SLURM_NTASKS_PER_NODE"]))),
        MASTER_ADDR=slurm.main_address,
        MASTER_PORT=str(slurm.main_port),
    )


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: under torchrun (``WORLD_SIZE`` > 1), or SLURM's tasks once
    ``ranks_from_slurm`` has run (each command calls it first), after joining its process group
    (``init_process_group``), else (0, 1)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group()
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier(while_waiting: Callable[[], object] | None = None) -> None:
    """Wait for every rank (a no-op in one process): a step all of them must have finished first.

    The wait lasts as long as the other ranks' work, without the process group's timeout (gloo 30 min,
    NCCL 10 min), which would fail a run whose ranks finish hours apart (a resumed run whose rank 0 has
    nothing left to do, rank 0 generating the data first). It ends at once when another rank has
    stopped, whatever stopped it (gloo sees its connection close), with gloo's ``RuntimeError``; a rank
    that hangs keeps the others waiting (``WAIT_LIMIT``). ``while_waiting`` is called about once a
    second meanwhile (rank 0's progress bar, counting the other ranks' work).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    work = dist.barrier(group=cpu_group(), async_op=True, timeout=WAIT_LIMIT)
    pause = 0.01
    while not work.is_completed():
        if while_waiting is not None:
            while_waiting()
        time.sleep(pause)
        pause = min(2 * pause, 1.0)
    work.wait()  # raises the group's error when a rank stopped


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank (on the CPU group, ``cpu_group``); every rank calls it at the
    same point. In one process: ``flag``."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, group=cpu_group())
    return bool(value.item())


def wait_for_ranks(
    error: Callable[[str], Exception],
    command: str,
    kept: str,
    while_waiting: Callable[[], object] | None = None,
) -> None:
    """``barrier(while_waiting)``; when another rank has stopped (printing its own error), raise ``error``
    in one line, ``"<command>: another rank stopped, its error is above (<gloo's words>); <kept>"``, not
    the process group's traceback, which reads as the cause. Each rank then stops with exit status 1."""
    try:
        barrier(while_waiting)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise error(f"{command}: another rank stopped, its error is above ({detail}); {kept}") from err
