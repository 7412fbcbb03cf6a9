"""A trial's place in the sweep (``storage.places``) is computed once, when the trial starts, whoever
needs it (a grid's sampler picks the place's point, the trial loop records it for Hyperband's bracket),
and a trial that runs an interrupted trial's values again takes that trial's place."""

from __future__ import annotations

import sys

import pytest
from conftest import STUB, run_interrupted
from test_sweep_loop import write_sweep

from samflow.sweep import run, storage
from samflow.sweep.load import load_sweep


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """How many times the sweep computed places (one entry per call): ``storage.places`` and any name
    the trial loop imported it under."""
    calls: list[int] = []
    real = storage.places

    def places(trials):
        calls.append(len(trials))
        return real(trials)

    monkeypatch.setattr(storage, "places", places)
    if hasattr(run, "places"):
        monkeypatch.setattr(run, "places", places)
    return calls


def test_a_grid_trials_place_is_computed_once_and_a_rerun_takes_its_originals(
    stub, tmp_path, monkeypatch, counted
):
    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [sleep, 0.5, 0.75]}\n")))
    sweep = run.Sweep.open(spec, None, None)
    pid_files = [sweep.folder / f"trial-{n}" / "pid" for n in range(3)]
    run_interrupted(sweep, lambda: any(p.is_file() for p in pid_files))
    monkeypatch.setattr(
        run, "trial_command", lambda s, overrides, folder: [sys.executable, "-c", STUB, str(folder), "0.25"]
    )
    trials = run.run_optuna(sweep, None).get_trials()

    assert len(counted) == len(trials)  # once per trial started, retried or not
    rerun = next(t for t in trials if "retry_of" in t.system_attrs)
    interrupted = trials[rerun.system_attrs["retry_of"]]
    assert rerun.system_attrs[storage.PLACE] == interrupted.system_attrs[storage.PLACE]
    fresh = [t for t in trials if t is not rerun]
    assert [t.system_attrs[storage.PLACE] for t in fresh] == list(range(len(fresh)))
    assert all(t.system_attrs["grid_id"] == t.system_attrs[storage.PLACE] for t in fresh)  # its point


def test_a_random_trials_place_is_computed_once(stub, tmp_path, counted):
    path = tmp_path / "s.yaml"
    path.write_text(
        "method: random\nmetric: {name: val/iou, goal: maximize}\nprogram: quickstart\n"
        "parameters:\n  x: {min: 0.1, max: 0.9}\n"
    )
    trials = run.run_optuna(run.Sweep.open(load_sweep(str(path)), None, None), 3).get_trials()
    assert len(counted) == 3
    assert [t.system_attrs[storage.PLACE] for t in trials] == [0, 1, 2]
