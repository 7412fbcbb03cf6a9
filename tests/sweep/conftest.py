"""The stand-in for `samflow fit` that the sweep loop's tests run as their trials."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import pytest

from samflow.sweep import run

# A stand-in for `samflow fit`: the override --x=VALUE decides what happens.
STUB = """
import json, math, sys
from pathlib import Path
folder = Path(sys.argv[1])
x = json.loads(sys.argv[2])
if x == "sleep":
    import time
    (folder / "pid").write_text(str(__import__("os").getpid()))
    time.sleep(120)
if x == "bad":
    print("Traceback ...\\nsamflow: error: --x 'bad': expected float (`samflow fit --help` lists the options)")
    sys.exit(1)
values = {0: x / 2, 1: x} if x != "nan" else {0: math.nan}
(folder / "result.json").write_text(json.dumps({"values": values, "pruned": False}))
callbacks = [{"class_path": "samflow.sweep.report.TrialReport", "init_args": {"trial_file": "t"}}]
config = {"model": {"x": x}, "trainer": {"default_root_dir": str(folder), "logger": [], "callbacks": callbacks}}
(folder / "config.yaml").write_text(json.dumps(config))
"""


@pytest.fixture
def stub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def command(sweep, overrides, folder):
        return [sys.executable, "-c", STUB, str(folder), json.dumps(overrides["x"])]

    monkeypatch.setattr(run, "trial_command", command)


def run_interrupted(sweep: run.Sweep, ready: Callable[[], bool], poll: float = 0.05) -> None:
    """Run ``sweep`` and, once ``ready()``, SIGTERM this process, as SLURM's time limit would: the sweep
    stops with ``SystemExit`` (the process's SIGTERM handler is put back after)."""

    def interrupt() -> None:
        while not ready():
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=interrupt, daemon=True).start()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            run.run_optuna(sweep, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
