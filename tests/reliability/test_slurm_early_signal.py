"""SLURM's requeue signal (``#SBATCH --signal=SIGUSR1@90``) before the fit's first training batch: while
the command starts (the model, the data, a checkpoint loaded) or in the sanity check.

``SlurmRequeue`` put its handler in place at ``on_train_start``: before it the signal's default action
killed the process, and the job ended without being requeued (here: ``python -m samflow fit`` died of
SIGUSR1). ``samflow fit`` in a SLURM job now holds the signal from the command's start
(``samflow.requeue_hold.requeue_signal_held``), and the handler is in place from the sanity check on:
the fit stops before training (nothing to save), exits 1 with one line, and the job is requeued. The
restarted job starts a new fit again, or continues the run it was resuming from the same ``last.ckpt``
to the uninterrupted run's weights. The signal must reach a real process (the default action would end
this one): the early-signalled command runs as ``python -m samflow``, the others in this process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import run_reaped, run_samflow, user_environment
from quickstart_tiny import TINY, samflow
from signal_at import signal_args
from test_signals import STEPS, _ends_as, _slurm_job, _step


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quickstart") / "data"  # written by the first fit


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data) -> Path:
    """The uninterrupted run's folder."""
    cwd = tmp_path_factory.mktemp("whole")
    mp = pytest.MonkeyPatch()
    mp.chdir(cwd)
    try:
        assert samflow("fit", *STEPS, data=data) == 0
    finally:
        mp.undo()
    return cwd / "runs" / "quickstart" / "version_0"


def _in_a_process(command: list[str], data: Path, restart: str | None = None):
    """``samflow COMMAND`` (the tiny quickstart) as ``python -m samflow`` in this job's folder (the working
    directory), with this process's SLURM variables and stand-in ``scontrol``."""
    args = [command[0], *TINY, "--data.init_args.quickstart.root", str(data), *command[1:]]
    here = str(Path(__file__).parent)  # signal_at
    env = {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = restart
    return run_samflow(args, Path.cwd(), env=env, timeout=300)


# ``samflow fit`` ARGS with the requeue signal sent as soon as the command holds it, before its heavy imports
SIGNAL_AT_START = """
import contextlib, os, signal, sys
from samflow import cli
hold = cli.requeue_signal_held
@contextlib.contextmanager
def signalled(command):
    with hold(command):
        print("imported when the signal came:", sorted(m for m in ("torch", "lightning") if m in sys.modules))
        os.kill(os.getpid(), signal.SIGUSR1)  # then torch, Lightning and segment-anything are imported
        yield
cli.requeue_signal_held = signalled
sys.argv = ["samflow", *sys.argv[1:]]
raise SystemExit(cli.main())
"""


def test_the_requeue_signal_while_the_command_imports_torch_and_lightning_requeues_the_job(
    tmp_path, data, monkeypatch
):
    """The signal at the command's start, before torch and Lightning are imported (about 8 s here): held
    from there (``samflow.requeue_hold``, imported without them), the fit stops before training, exit 1,
    the job requeued. Before, ``samflow.cli`` imported torch, Lightning and segment-anything (through
    ``import samflow``) before it held the signal, and a signal then killed the process (status -10)."""
    calls = _slurm_job(tmp_path, monkeypatch)
    args = ["fit", *TINY, "--data.init_args.quickstart.root", str(data), *STEPS]
    # killed after 300 s with every process under it
    stopped = run_reaped([sys.executable, "-c", SIGNAL_AT_START, *args], Path.cwd(), user_environment(), 300)
    out = stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "imported when the signal came: []\n" in stopped.stdout, out
    assert stopped.returncode == 1, out
    assert (
        "samflow: error: fit stopped by SLURM's requeue signal at step 0; no checkpoint was written yet. "
        "SLURM job 4242 requeued: it starts this fit again when it starts again.\n"
    ) in stopped.stderr, out
    assert calls.read_text() == "requeue 4242\n"
    assert not list((tmp_path / "job" / "runs" / "quickstart").glob("version_*"))


def test_the_requeue_signal_in_the_sanity_check_of_a_new_fit_requeues_the_job_which_starts_it_again(
    tmp_path, data, monkeypatch, capsys
):
    """The signal in the first of 2 sanity-check batches: the fit stops after that batch with nothing
    trained, exit 1, ``scontrol requeue`` runs and the new run's folder is removed; the restarted job
    (``SLURM_RESTART_COUNT`` 1, the same command) starts the fit again as ``version_0``. Before, the
    process died of the signal (status -10) and the job was not requeued."""
    calls = _slurm_job(tmp_path, monkeypatch)
    sanity = ["--trainer.num_sanity_val_steps", "2"]
    in_sanity = signal_args(signum="SIGUSR1", validation_batch=0, restart=0)
    command = ["fit", *STEPS, *sanity, *in_sanity]  # the job script's

    stopped = _in_a_process(command, data)
    out = stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert stopped.returncode == 1, out  # was -10: killed by SIGUSR1
    assert (
        "samflow: error: fit stopped by SLURM's requeue signal at step 0; no checkpoint was written yet. "
        "SLURM job 4242 requeued: it starts this fit again when it starts again.\n"
    ) in stopped.stderr, out
    assert calls.read_text() == "requeue 4242\n"
    runs = tmp_path / "job" / "runs" / "quickstart"
    assert not list(runs.glob("version_*"))

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    capsys.readouterr()
    assert samflow(*command, data=data) == 0, capsys.readouterr().err[-3000:]
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"]
    assert _step(runs / "version_0" / "checkpoints" / "last.ckpt") == 6
    assert calls.read_text() == "requeue 4242\n"  # not requeued again


def test_the_requeue_signal_while_the_restarted_job_starts_requeues_again_and_the_run_still_ends_as_uninterrupted(
    tmp_path, data, whole, monkeypatch, capsys
):
    """The job stopped by the signal at step 4 (requeued); its restart gets the signal again while it
    starts (the trainer's setup: the model built, the data listed, before the fit's handlers). It stops
    before training, exit 1, ``last.ckpt`` (step 4) left as it was, the run folder kept, the job requeued
    again; the next start continues the run to the uninterrupted run's weights. Before, the restart
    died of the signal: not requeued, the run left unfinished."""
    calls = _slurm_job(tmp_path, monkeypatch)
    early = signal_args(signum="SIGUSR1", at_setup=True, restart=1)  # only in the job's first restart
    at_step_4 = signal_args(step=4, signum="SIGUSR1")
    command = ["fit", *STEPS, *at_step_4, *early]  # the job script's, in every start
    assert samflow(*command, data=data) == 1
    run = tmp_path / "job" / "runs" / "quickstart" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert _step(last) == 4
    saved = last.read_bytes()

    restarted = _in_a_process(command, data, restart="1")
    out = restarted.stdout[-3000:] + restarted.stderr[-3000:]
    assert restarted.returncode == 1, out  # was -10: killed by SIGUSR1
    assert (
        "samflow: error: fit stopped by SLURM's requeue signal at step 4; "
        "runs/quickstart/version_0/checkpoints/last.ckpt holds it. "
        "SLURM job 4242 requeued: it continues this run when it starts again.\n"
    ) in restarted.stderr, out
    assert calls.read_text() == "requeue 4242\n" * 2
    assert last.read_bytes() == saved
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]

    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    capsys.readouterr()
    assert samflow(*command, data=data) == 0, capsys.readouterr().err[-3000:]
    assert "checkpoint  runs/quickstart/version_0/checkpoints/last.ckpt" in capsys.readouterr().out
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert calls.read_text() == "requeue 4242\n" * 2
    _ends_as(run, whole)
