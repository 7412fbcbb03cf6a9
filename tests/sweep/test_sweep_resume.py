"""A sweep interrupted (SIGTERM, Ctrl-C) and started again runs the interrupted trial's values again; the
best trial is chosen by the metric's goal and printed with its run folder; without the ``sweep`` extra
``samflow sweep`` says what to install in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
from conftest import STUB, run_interrupted
from test_sweep_loop import write_sweep

from samflow.cli import main
from samflow.sweep import run
from samflow.sweep.load import load_sweep
from samflow.sweep.summary import summarize


def test_a_trial_the_interruption_ended_runs_again_when_the_sweep_is_started_again(
    stub, tmp_path, monkeypatch, capsys
):
    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [sleep, 0.5]}\n")))
    sweep = run.Sweep.open(spec, None, None)
    pid_files = [sweep.folder / f"trial-{n}" / "pid" for n in (0, 1)]

    run_interrupted(sweep, lambda: any(p.is_file() for p in pid_files))  # once a trial started

    # Started again: the interrupted point runs again (here it completes), no point runs twice.
    monkeypatch.setattr(
        run, "trial_command", lambda s, overrides, folder: [sys.executable, "-c", STUB, str(folder), "0.25"]
    )
    study = run.run_optuna(sweep, None)
    trials = study.get_trials()
    interrupted = [t for t in trials if t.user_attrs.get("error") == "the sweep was interrupted"]
    assert len(interrupted) == 1 and interrupted[0].state == optuna.trial.TrialState.FAIL
    again = [t for t in trials if t.system_attrs.get("retry_of") == interrupted[0].number]
    assert len(again) == 1 and again[0].params == interrupted[0].params
    assert again[0].state == optuna.trial.TrialState.COMPLETE
    assert sorted(json.dumps(t.params) for t in trials if t.state.name == "COMPLETE") == sorted(
        json.dumps({"x": x}) for x in ("sleep", 0.5)
    )  # each grid point completed once
    assert len(run.run_optuna(sweep, None).get_trials()) == len(trials)  # nothing more to run
    capsys.readouterr()
    summarize(sweep, study)
    assert f"the sweep was interrupted; run again as trial {again[0].number}" in capsys.readouterr().out


@pytest.mark.parametrize(("goal", "best_x"), [("minimize", 0.25), ("maximize", 0.75)])
def test_the_best_trial_follows_the_goal_and_is_printed_with_its_run_folder(
    stub, tmp_path, capsys, goal, best_x
):
    spec = load_sweep(
        str(write_sweep(tmp_path, "  x: {values: [0.5, 0.25, 0.75]}\n", metric=f"goal: {goal}"))
    )
    sweep = run.Sweep.open(spec, None, None)
    study = run.run_optuna(sweep, None)
    best = next(t for t in study.get_trials() if t.params["x"] == best_x)
    capsys.readouterr()
    assert summarize(sweep, study) == sweep.folder / "s_best.yaml"
    out = capsys.readouterr().out
    assert (
        f"best: trial {best.number} (val/iou {best_x:.4f}), run folder {sweep.folder / f'trial-{best.number}'}"
        in out
    )
    assert f"samflow fit --experiment {sweep.folder / 's_best.yaml'}" in out


def test_a_best_trial_without_its_config_names_its_folder_and_no_command(stub, tmp_path, capsys):
    """A trial run by a worker on another machine (or a folder removed) has no config.yaml here: the best
    trial and its folder are still named, and no ``samflow fit --experiment None`` is printed."""
    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [0.5]}\n")))
    sweep = run.Sweep.open(spec, None, None)
    study = run.run_optuna(sweep, None)
    (sweep.folder / "trial-0" / "config.yaml").unlink()
    capsys.readouterr()
    assert summarize(sweep, study) is None
    out = capsys.readouterr().out
    assert f"best: trial 0 (val/iou 0.5000), run folder {sweep.folder / 'trial-0'}" in out
    assert "None" not in out and "--experiment" not in out
    assert f"has no {Path(sweep.folder / 'trial-0' / 'config.yaml')}" in out


@pytest.mark.parametrize("module", ["optuna", "sqlalchemy", "matplotlib", "sklearn"])
def test_without_the_sweep_extra_one_line_says_what_to_install(monkeypatch, capsys, tmp_path, module):
    """Optuna installed alone (without matplotlib or scikit-learn) ran every trial and failed at the plots."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # as if only part of samflow[sweep] were installed
    assert main(["sweep", "quickstart_lr"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"samflow: error: samflow sweep needs {module}") and "\n" not in err
    assert "pip install 'samflow[sweep]'" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()  # no trial started
