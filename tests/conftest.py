"""Shared fixtures: a tiny random SAM, W&B disabled, deterministic seeds."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# Lightning's import sets up its logging (rank_zero_only.rank, the loggers' level): done here, before the
# first test's _lightning_logging_kept, as when samflow.sam imported Lightning (it no longer does).
import lightning.pytorch  # noqa: F401
import pytest
import torch
from helpers import randomize
from lightning_utilities.core.rank_zero import rank_zero_only

from samflow.sam import build_sam


@pytest.fixture
def tiny_sam():
    """A frozen tiny SAM (128 px) with non-zero position tables."""
    return randomize(build_sam("tiny", seed=0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def _lightning_logging() -> tuple:
    """What decides whether Lightning's ``rank_zero_info`` lines are logged in this process (and reach
    ``caplog``): ``rank_zero_only.rank``, ``logging.disable``'s level, and the Lightning loggers' level,
    ``disabled`` and ``propagate``."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    return (
        getattr(rank_zero_only, "rank", None),
        logging.root.manager.disable,
        [(logger.name, logger.level, logger.disabled, logger.propagate) for logger in loggers],
    )


@pytest.fixture(autouse=True)
def _lightning_logging_kept():
    """Fail a test that leaves Lightning's logging changed for the rest of its worker: a test that
    called ``samflow.cli._verbosity_from_argv`` with ``--quiet`` outside ``main`` left the Lightning
    loggers at WARNING, and a later test of the same pytest-xdist worker saw none of ``samflow embed``'s
    ``rank_zero_info`` lines. Put back with ``monkeypatch`` or ``samflow.console.restored_console``."""
    before = _lightning_logging()
    yield
    after = _lightning_logging()
    assert after == before, f"the test left Lightning's logging changed: {before} -> {after}"


# what a process launched by a test inherits or a computation's bits depend on: the torch threads and the
# launcher's variables (helpers.LAUNCHED)
_PROCESS_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
)


def _process_settings() -> tuple:
    return torch.get_num_threads(), {name: os.environ.get(name) for name in _PROCESS_VARIABLES}


@pytest.fixture(autouse=True)
def _process_settings_kept():
    """Fail a test that leaves the worker's torch threads or launcher variables changed: float results
    depend on the thread count, so a later test comparing a run in a subprocess (which takes
    ``OMP_NUM_THREADS`` from the environment) with one in the worker bit for bit failed in CI
    (``test_student_resume.py``'s SIGKILL case: ``head.up.weight``, reproduced by a 1-thread subprocess
    beside a 2-thread worker). Put back with ``monkeypatch`` or ``try``/``finally``."""
    before = _process_settings()
    yield
    after = _process_settings()
    assert after == before, (
        f"the test left the process's threads or launcher variables changed: {before} -> {after}"
    )
