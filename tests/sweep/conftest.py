"""The stand-in for `samflow fit` that the sweep loop's tests run as their trials."""

from __future__ import annotations

import json
import sys

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
