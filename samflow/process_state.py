"""What a run changes for its whole process, put back when it ends (``restored_process_state``).

An in-process ``samflow`` run (a notebook, a W&B agent function, a test, the sweep summary) must leave
the process as it found it: the next run reads its own environment, seeds, verbosity and W&B mode.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["LAUNCH_ENVIRONMENT", "RUN_ENVIRONMENT", "end_wandb_service", "restored_process_state"]

#: Environment variables a run sets for its whole process: W&B's mode (``configure_wandb``),
#: Lightning's seed (``seed_everything``) and cuBLAS workspace (``trainer.deterministic``).
RUN_ENVIRONMENT = ("WANDB_MODE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")

#: Variables that Lightning's DDP launchers set in the process that starts the ranks (rank 0 of ``ddp``,
#: the parent of ``ddp_spawn``), and W&B for the service process a process's first logging run starts.
#: Left behind, a later run of the process took itself for a launched rank (``LOCAL_RANK``: a ``ddp``
#: run waited for ranks nobody started), reused the port, ran on one thread, or a ``samflow`` it started
#: attached to this run's W&B service. Removed when the run ends where the run set them; a value set
#: before the run (the user's, a cluster's, a launched rank's) is never touched.
LAUNCH_ENVIRONMENT = (
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "OMP_NUM_THREADS",
    "WANDB_SERVICE", "LOCAL_WORLD_SIZE",
)  # fmt: skip


@contextlib.contextmanager
def restored_process_state() -> Iterator[None]:
    """Put back, when the block ends (also by an error), what a run changes for its whole process:
    ``sys.argv`` (rewritten for DDP children), the variables of ``RUN_ENVIRONMENT`` and those of
    ``LAUNCH_ENVIRONMENT`` the run set, torch's deterministic-algorithms, cuDNN-benchmark,
    float32-matmul and thread-count settings (Lightning's trainer sets the first two for the process, a
    run with ``trainer.benchmark`` would set the next run's default, a ``ddp`` launch one thread a
    rank), the console's verbosity and log filters (``samflow.console.restored_console``), and what
    the run started for the process: its DDP process group and its W&B service (``end_wandb_service``)
    with the ``sys.exit`` and ``sys.excepthook`` W&B replaced."""
    import torch

    from samflow.console import restored_console

    argv, hooks = list(sys.argv), (sys.exit, sys.excepthook)
    env = {name: os.environ.get(name) for name in RUN_ENVIRONMENT}
    launch = [name for name in LAUNCH_ENVIRONMENT if name not in os.environ]
    grouped = _process_group_initialized()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, matmul = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    threads = torch.get_num_threads()
    try:
        with restored_console():
            yield
    finally:
        if "WANDB_SERVICE" in launch:
            end_wandb_service()
        if not grouped and _process_group_initialized():
            torch.distributed.destroy_process_group()
        sys.argv = argv
        sys.exit, sys.excepthook = hooks
        for name in launch:
            os.environ.pop(name, None)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        torch.set_float32_matmul_precision(matmul)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def end_wandb_service() -> None:
    """End the W&B service process of this process, if one runs (``WANDB_SERVICE`` names it).

    W&B starts it with the first run that logs and keeps it, with the settings read from the
    environment then, for the whole process; a ``samflow`` the process starts later attaches to it.
    ``restored_process_state`` calls this where the run started the service, after the run finished:
    the next run reads its own environment and starts its own.
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None and os.environ.get("WANDB_SERVICE"):
        wandb.teardown()


def _process_group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
