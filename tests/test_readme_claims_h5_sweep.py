"""README "Sweeps": where a sweep name is looked up, the study's default name and storage, what a trial's
folder holds and the plots of the summary, with stand-in trials (a short Python process per trial).

(Outside tests/sweep/, which has its own ``stub`` fixture: this file has its own stand-in.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import yaml

from samflow.sweep import run
from samflow.sweep.load import PACKAGED, load_sweep
from samflow.sweep.summary import summarize

# A stand-in for `samflow fit`: validation values from the overrides x and y, and its resolved config.
STUB = """
import json, sys
from pathlib import Path
folder, x, y = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
print(f"stand-in fit x={x} y={y}")
(folder / "result.json").write_text(json.dumps({"values": {0: x + y}, "pruned": False}))
(folder / "config.yaml").write_text(json.dumps({"model": {"x": x, "y": y}, "trainer": {}}))
"""


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def command(sweep, overrides, folder):
        return [sys.executable, "-c", STUB, str(folder), str(overrides["x"]), str(overrides["y"])]

    monkeypatch.setattr(run, "trial_command", command)


SWEEP = """method: grid
metric: {name: val/iou, goal: maximize}
program: quickstart
parameters:
  x: {values: [0.1, 0.2, 0.4]}
  y: {values: [0.0, 0.5]}
"""


def test_a_sweep_name_is_looked_up_in_experiments_sweeps_first_then_the_packaged_ones(stand_in, tmp_path):
    packaged = load_sweep("quickstart_lr")
    assert packaged.path == (PACKAGED / "sweeps" / "quickstart_lr.yaml").resolve()
    # the README's "2 x 2 learning rates, 5 epochs each"
    assert packaged.grid_size() == 4 and [len(p.distribution.choices) for p in packaged.params.values()] == [
        2,
        2,
    ]
    assert "--trainer.max_epochs=5" in packaged.args
    local = tmp_path / "experiments" / "sweeps"
    local.mkdir(parents=True)
    (local / "quickstart_lr.yaml").write_text(SWEEP)  # no name: the study is named after the stem
    mine = load_sweep("quickstart_lr")
    assert mine.path == (local / "quickstart_lr.yaml").resolve() and set(mine.params) == {"x", "y"}
    assert mine.name == "quickstart_lr"
    (local / "other.yaml").write_text("name: chosen\n" + SWEEP)
    assert load_sweep("other").name == "chosen"  # the file's name: wins over its stem


def test_a_trials_folder_and_the_summarys_files(stand_in, tmp_path, capsys):
    (tmp_path / "grid.yaml").write_text(SWEEP)
    sweep = run.Sweep.open(load_sweep(str(tmp_path / "grid.yaml")), None, None)
    # --study: the file's stem; --storage: runs/<experiment>/sweeps/<study>/study.db
    assert sweep.study_name == "grid" and sweep.folder == Path("runs/quickstart/sweeps/grid")
    assert sweep.storage_url == f"sqlite:///{(tmp_path / 'runs/quickstart/sweeps/grid/study.db').resolve()}"
    study = run.run_optuna(sweep, None)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 6
    assert (tmp_path / "runs/quickstart/sweeps/grid/study.db").is_file()
    for t in trials:
        folder = sweep.folder / f"trial-{t.number}"
        x, y = t.params["x"], t.params["y"]
        assert (folder / "command.txt").read_text().split()[-2:] == [str(x), str(y)]  # the command run
        assert f"stand-in fit x={x} y={y}" in (folder / "fit.log").read_text()  # its output
        assert (folder / "config.yaml").is_file()
    capsys.readouterr()
    best = summarize(sweep, study)
    out = capsys.readouterr().out
    assert best == sweep.folder / "grid_best.yaml"
    assert yaml.safe_load(best.read_text())["model"] == {"x": 0.4, "y": 0.5}  # the best trial's config
    assert str(sweep.folder / "trial-") in out  # the best trial with its run folder
    plots = sorted(p.name for p in (sweep.folder / "plots").glob("*.png"))
    assert plots == ["history.png", "importances.png", "parallel_coordinates.png"]
