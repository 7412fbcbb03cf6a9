"""Several samflow processes on one experiment at once: sweep agents or SLURM jobs started together into
one ``runs/<experiment>``, a ``test`` beside another ``test`` of one checkpoint, ``--resume last`` while
the newest run still trains.

Found here: a new run's ``version_N`` was chosen by listing the folders when the trainer was built and
created only at setup (after the data module's setup: the file checks of a whole dataset), so two runs
started within that window both took ``version_0`` and wrote their config, checkpoints, metrics and
``run.json`` (W&B id) into one folder; two ``samflow test --ckpt_path`` of one run likewise both took
``test/``. The folder is now claimed as it is named (``os.mkdir``, which fails for all but one process;
the others take the next name). ``--resume last`` continued the newest run even while its fit was still
training, two processes then writing one folder and W&B run; a fit now holds its folder's
``.fit.lock`` (an ``flock``, gone with its process however it ends) and a fit continuing a held run is
refused in one line naming the process.

Covered elsewhere: two ``samflow sweep`` workers of one study take distinct trial numbers and folders
(``../sweep/test_sweep_quickstart.py``), and the schema race of their shared storage
(``../sweep/test_sweep_storage.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import kill_tree
from lightning.fabric.loggers import csv_logs
from lightning.fabric.utilities.rank_zero import rank_zero_only
from quickstart_tiny import TINY
from quickstart_tiny import samflow as run_tiny

from samflow.callbacks.run_folder import LOCK_FILE, RunCSVLogger, RunLock, command_folder, run_in_use


def test_two_new_runs_choosing_their_version_at_once_get_two_folders(tmp_path):
    """Both loggers choose before either run writes a file (the window of two jobs started together)."""
    first, second = RunCSVLogger(tmp_path, name="exp"), RunCSVLogger(tmp_path, name="exp")
    assert (first.version, second.version) == (0, 1)
    assert Path(first.log_dir).is_dir() and Path(second.log_dir).is_dir()  # claimed as they were named
    third = RunCSVLogger(tmp_path, name="exp")
    assert third.version == 2


def test_a_rank_that_writes_nothing_claims_no_folder(tmp_path, monkeypatch):
    """Under DDP only the first process claims: a launched rank 1 leaves no ``version_1`` behind."""
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert RunCSVLogger(tmp_path, name="exp").version == 0
    assert not (tmp_path / "exp").exists()


def test_a_claimed_folder_is_removed_only_while_it_holds_only_what_a_fit_writes_as_it_starts(tmp_path):
    empty, started, trained, logged = (RunCSVLogger(tmp_path, name="exp") for _ in range(4))
    assert [logger.version for logger in (empty, started, trained, logged)] == [0, 1, 2, 3]
    for logger in (started, trained, logged):
        folder = Path(logger.log_dir)
        (folder / "samples").mkdir()
        (folder / "checkpoints").mkdir()
        for name in ("config.yaml", "hparams.yaml", "run.json", "samples/val_sanity.png"):
            (folder / name).write_text("x")
        (folder / "metrics.csv").write_text("epoch,step\n")
    (Path(trained.log_dir) / "checkpoints" / "last.ckpt").write_text("x")
    (Path(logged.log_dir) / "metrics.csv").write_text("epoch,step\n0,1\n")
    for logger in (empty, started, trained, logged):
        logger.release_claim()
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["version_2", "version_3"]
    assert (tmp_path / "exp" / "version_2" / "config.yaml").is_file()  # nothing of it removed


def test_two_commands_naming_their_subfolder_at_once_get_two(tmp_path):
    """Two ``samflow test --ckpt_path`` of one run, both naming their subfolder before either writes."""
    assert [command_folder(tmp_path, "test") for _ in range(2)] == ["test", "test_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test", "test_1"]


def test_a_fit_started_while_another_takes_version_0_writes_version_1(tmp_path, monkeypatch):
    """The interleaving of two jobs started together, forced: right after this fit lists the run folders,
    the other job creates ``version_0`` and writes its config. This fit took ``version_0`` too and
    overwrote it; it now writes ``version_1`` and leaves the other's files alone."""
    monkeypatch.chdir(tmp_path)
    listing = csv_logs.CSVLogger._get_next_version
    other = tmp_path / "runs" / "quickstart" / "version_0"

    def listed_then_the_other_job_starts(self: csv_logs.CSVLogger) -> int:
        version = listing(self)
        if not other.exists():
            other.mkdir(parents=True)
            (other / "config.yaml").write_text("the other job's config\n")
        return version

    monkeypatch.setattr(csv_logs.CSVLogger, "_get_next_version", listed_then_the_other_job_starts)
    assert run_tiny("fit", data=tmp_path / "data") == 0
    assert (other / "config.yaml").read_text() == "the other job's config\n"
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml"]
    mine = tmp_path / "runs" / "quickstart" / "version_1"
    assert (mine / "checkpoints" / "last.ckpt").is_file() and (mine / "run.json").is_file()
    assert not (mine / LOCK_FILE).exists()  # released when the fit ended


HOLD = """
import sys, time
from pathlib import Path
from samflow.callbacks.run_folder import RunLock
lock = RunLock(Path(sys.argv[1]))
assert lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_resume_last_while_the_run_still_trains_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """A live process holds the newest run's lock (as its fit does while it trains): ``--resume last``
    stops in one line naming the run and the process, before writing anything; once that process is
    gone (killed), nothing holds the run."""
    monkeypatch.chdir(tmp_path)
    assert run_tiny("fit", data=tmp_path / "data") == 0
    run = tmp_path / "runs" / "quickstart" / "version_0"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert run_in_use(run) == f"pid {holder.pid} on {os.uname().nodename}"
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
        capsys.readouterr()
        assert run_tiny("fit", "--resume", "last", "--trainer.max_epochs", "2", data=tmp_path / "data") == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (
            "samflow: error: --resume last: runs/quickstart/version_0 is being trained by another samflow fit "
            f"(pid {holder.pid} on {os.uname().nodename}); wait until it ends, or start a new run without "
            "--resume."
        ), err
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
        assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    finally:
        holder.kill()
        holder.wait()
    assert run_in_use(run) is None and RunLock(run).acquire()


def test_a_fit_holds_its_run_folder_while_it_trains(tmp_path):
    """A real ``samflow fit`` in another process holds its folder from setup to its end."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    slow = '{"class_path": "resume_slow_steps.SlowSteps", "init_args": {"after": 0, "seconds": 3}}'
    run = tmp_path / "runs" / "quickstart" / "version_0"
    args = [*TINY, "--trainer.limit_train_batches", "2", "--data.init_args.batch_size", "2"]
    args += ["--data.init_args.quickstart.root", str(tmp_path / "data"), "--trainer.callbacks+", slow]
    proc = subprocess.Popen(
        [sys.executable, "-m", "samflow", "fit", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and not (run / "run.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert run_in_use(run) == f"pid {proc.pid} on {os.uname().nodename}"
        assert not RunLock(run).acquire()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)  # the fit and every process under it
            proc.wait()
    assert run_in_use(run) is None and not (run / LOCK_FILE).exists()


@pytest.fixture(autouse=True)
def _first_process(monkeypatch):
    """The tests run as a single process (rank 0), whatever a launched test process's environment holds."""
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.delenv("NODE_RANK", raising=False)
