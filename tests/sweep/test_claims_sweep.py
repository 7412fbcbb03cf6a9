"""README ("Sweeps") claims on defaults: ``--trials`` is the study's total, by default a grid's size,
else the file's ``run_cap``, else 20; a dead worker's trial is taken for dead after 2 minutes of no
heartbeat unless ``SAMFLOW_SWEEP_GRACE_S`` says otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from samflow.sweep.load import parse_sweep
from samflow.sweep.run import Sweep
from samflow.sweep.storage import grace_period


def _sweep(method: str, **extra) -> Sweep:
    raw = {
        "method": method,
        "metric": {"name": "val/iou", "goal": "maximize"},
        "parameters": {"model.optimizer.init_args.lr": {"values": [1e-4, 1e-3, 1e-2]}, "seed_everything": {"values": [0, 1]}},
        "command": ["samflow", "fit", "--experiment", "quickstart"],
        **extra,
    }  # fmt: skip
    spec = parse_sweep(raw, Path("s.yaml"))
    return Sweep(spec, Path("quickstart.yaml"), "s", Path("runs"), "sqlite://")


@pytest.mark.parametrize(
    ("method", "extra", "trials", "total"),
    [
        ("grid", {}, None, 6),  # the grid's size: 3 x 2
        ("grid", {}, 4, 4),
        ("grid", {}, 40, 6),  # never past the grid
        ("random", {}, None, 20),
        ("bayes", {"run_cap": 7}, None, 7),
        ("random", {"run_cap": 7}, 9, 9),  # --trials wins over run_cap
    ],
)
def test_the_number_of_trials(method, extra, trials, total):
    assert _sweep(method, **extra).total(trials) == total


def test_the_grace_period_is_two_minutes_unless_set(monkeypatch):
    monkeypatch.delenv("SAMFLOW_SWEEP_GRACE_S", raising=False)
    assert grace_period() == 120
    monkeypatch.setenv("SAMFLOW_SWEEP_GRACE_S", "7")
    assert grace_period() == 7
