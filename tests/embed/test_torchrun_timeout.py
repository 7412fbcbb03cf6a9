"""The timeout of ``helpers.run_torchrun`` (``helpers.run_reaped``), under which the torchrun tests of this
folder (and of proposals, wsi, sapnet_e2e) run: a command still running at its timeout is killed with
every process under it. torchrun starts its workers in sessions of their own, so ``subprocess.run``'s
kill of torchrun (and a ``killpg`` of its group) left a hung test's workers waiting idle until their own
timeout (gloo's 30 min, ``samflow.commands.WAIT_LIMIT`` 365 days), holding their stores' locks.

The command here stands for torchrun without its cost: it starts a child in a session of its own (as
torchrun starts a worker), which starts one of its own (as a worker starts its data loader's); both
sleep until killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import run_reaped

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
