"""The timeout of ``helpers.run_torchrun`` (``helpers.run_reaped``), under which the torchrun tests of this
folder (and of proposals, wsi, sapnet_e2e) run: a command still running at its timeout is killed with
every process under it. torchrun starts its workers in sessions of their own, so ``subprocess.run``'s
kill of torchrun (and a ``killpg`` of its group) left a hung test's workers waiting idle until their own
timeout (gloo's 30 min, ``samflow.commands.WAIT_LIMIT`` 365 days), holding their stores' locks. So with
the timeouts of ``helpers.run_at_once`` (the tasks of an ``srun`` job), ``helpers.run_samflow`` and
``helpers.run_samflow_commands``, whose ``ddp`` commands start rank 1 as a child (Lightning's launcher):
they killed the command alone.

The command here stands for torchrun (or a ``ddp`` samflow command) without its cost: it starts a child
in a session of its own (as torchrun starts a worker), which starts one of its own (as a worker starts
its data loader's); both sleep until killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import run_at_once, run_reaped, run_samflow, run_samflow_commands

# a child of the command, in a session of its own: it starts a child of its own, writes both pids to
# the file argv[1], and sleeps
CHILD = """
import os, subprocess, sys, time
from pathlib import Path
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
Path(sys.argv[1]).write_text(f"{os.getpid()} {grandchild.pid}")
time.sleep(600)
"""
# the command: starts the child (its code argv[1], the pid file argv[2]) and sleeps
COMMAND = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
print("started", flush=True)
time.sleep(600)
"""

# ``samflow.cli.main`` as the command's stand-in, for ``run_samflow_commands``'s script: ARGS are the
# child's code and its pid file
CLI = """
import subprocess, sys, time
def main(args):
    subprocess.Popen([sys.executable, "-c", *args], start_new_session=True)
    print("started", flush=True)
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_command_past_its_timeout_is_killed_with_the_processes_it_started_in_other_sessions(tmp_path: Path):
    pids = tmp_path / "pids"
    command = [sys.executable, "-c", COMMAND, CHILD, str(pids)]
    found: list[int] = []
    try:
        with pytest.raises(subprocess.TimeoutExpired) as expired:
            # ample for two Python starts without imports, however loaded the machine
            run_reaped(command, tmp_path, dict(os.environ), timeout=3)
        assert pids.is_file(), "the child never started: the timeout was too short for this machine"
        found = [int(pid) for pid in pids.read_text().split()]
        assert len(found) == 2
        deadline = time.monotonic() + 10  # the kernel's, then init's, part of reaping them
        while any(alive(pid) for pid in found) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in found if alive(pid)], "processes left behind by the timed-out command"
        assert expired.value.stdout == "started\n"  # the output up to the timeout comes with it
    finally:
        for pid in found:  # a helper that left them: end them here, not at their 600 s
            if alive(pid):
                psutil.Process(pid).kill()


def left_behind(pid_files: list[Path]) -> list[int]:
    """The processes whose pids ``pid_files`` hold (children's and grandchildren's) still alive 10 s after
    (the kernel's, then init's, part of reaping them); killed here, not left to their 600 s."""
    found = [int(pid) for path in pid_files if path.is_file() for pid in path.read_text().split()]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in found) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in found if alive(pid)]
    for pid in left:
        psutil.Process(pid).kill()
    assert len(found) == 2 * len(pid_files), "a child never started: the timeout was too short here"
    return left


def fake_samflow(root: Path, main: str, cli: str = "") -> Path:
    """``root/samflow``: a stand-in package, its ``__main__`` ``main``, its ``cli`` module ``cli``."""
    (root / "samflow").mkdir(parents=True)
    (root / "samflow" / "__init__.py").write_text("")
    (root / "samflow" / "__main__.py").write_text(main)
    (root / "samflow" / "cli.py").write_text(cli)
    return root


def test_tasks_past_their_timeout_are_killed_with_the_processes_they_started_in_other_sessions(
    tmp_path: Path,
):
    """``run_at_once``: each task (as a ``ddp`` task starts rank 1) starts a child; all are killed."""
    pid_files = [tmp_path / "pids0", tmp_path / "pids1"]
    commands = [[sys.executable, "-c", COMMAND, CHILD, str(path)] for path in pid_files]
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            run_at_once(commands, tmp_path, [dict(os.environ)] * 2, timeout=4)
    finally:
        assert not left_behind(pid_files), "processes left behind by the timed-out tasks"


def test_a_samflow_command_past_its_timeout_is_killed_with_the_processes_it_started(tmp_path: Path):
    """``run_samflow``: ``python -m samflow`` (here a stand-in package first on the path) starts a child, as
    a ``ddp`` fit starts rank 1; both are killed."""
    pids = tmp_path / "pids"
    path = fake_samflow(tmp_path / "path", COMMAND)
    try:
        with pytest.raises(subprocess.TimeoutExpired) as expired:
            run_samflow([CHILD, str(pids)], tmp_path, pythonpath=path, timeout=3)
        assert expired.value.stdout == "started\n"
    finally:
        assert not left_behind([pids]), "processes left behind by the timed-out command"


def test_samflow_commands_past_their_timeout_are_killed_with_the_processes_they_started(tmp_path: Path):
    """``run_samflow_commands``: its script's ``samflow.cli.main`` (a stand-in package beside the script)
    starts a child, as a ``ddp`` fit starts rank 1; both are killed."""
    pids = tmp_path / "pids"
    work = fake_samflow(tmp_path / "work", "", CLI)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            run_samflow_commands(work, {"hung": [CHILD, str(pids)]}, timeout=3)
    finally:
        assert not left_behind([pids]), "processes left behind by the timed-out commands"
