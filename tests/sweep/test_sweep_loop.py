"""The Optuna backend's trial loop with stand-in trials (a failing trial fails alone, NaN fails, the
summary and best config), and the trial callback pruning a real Lightning run early."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer

from samflow.sweep import run
from samflow.sweep.load import load_sweep
from samflow.sweep.report import RESULT_FILE, TRIAL_FILE, TrialMetricError, TrialReport
from samflow.sweep.summary import summarize


def write_sweep(tmp_path: Path, parameters: str, extra: str = "", metric: str = "goal: maximize") -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(
        f"method: grid\nmetric: {{name: val/iou, {metric}}}\nprogram: quickstart\n{extra}parameters:\n{parameters}"
    )
    return path


def test_a_failing_trial_fails_alone_and_the_sweep_goes_on(stub, tmp_path, capsys):
    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [0.25, bad, 0.75, nan]}\n")))
    sweep = run.Sweep.open(spec, None, None)
    assert sweep.folder == Path("runs/quickstart/sweeps/s")
    study = run.run_optuna(sweep, None)
    by_x = {t.user_attrs["overrides"]["x"]: t for t in study.get_trials()}
    assert set(by_x) == {0.25, "bad", 0.75, "nan"}
    assert by_x["bad"].state == optuna.trial.TrialState.FAIL
    assert (
        by_x["bad"].user_attrs["error"]
        == "--x 'bad': expected float (`samflow fit --help` lists the options)"
    )
    assert by_x["nan"].state == optuna.trial.TrialState.FAIL
    assert by_x["nan"].user_attrs["error"] == "val/iou is nan after epoch 0"
    assert [by_x[x].state for x in (0.25, 0.75)] == [optuna.trial.TrialState.COMPLETE] * 2
    assert (by_x[0.25].value, by_x[0.75].value) == (0.25, 0.75)  # the last validation epoch's value
    for t in by_x.values():
        assert Path(t.user_attrs["folder"]) == sweep.folder / f"trial-{t.number}"
        assert (
            json.loads((sweep.folder / f"trial-{t.number}" / TRIAL_FILE).read_text())["trial_id"]
            == t._trial_id
        )

    capsys.readouterr()
    best = summarize(sweep, study)
    out = capsys.readouterr().out
    table = [line.split()[:3] for line in out.splitlines()[2:6]]
    assert table[:2] == [
        [str(by_x[0.75].number), "complete", "0.7500"],
        [str(by_x[0.25].number), "complete", "0.2500"],
    ]
    assert sorted(row[1] for row in table[2:]) == ["fail", "fail"]  # failed trials last
    rows = (sweep.folder / "trials.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[1].startswith(f"{by_x[0.75].number},complete,0.7500")
    assert best == sweep.folder / "s_best.yaml"
    config = yaml.safe_load(best.read_text())
    assert config["model"] == {"x": 0.75}
    assert config["trainer"] == {
        "callbacks": None
    }  # no sweep callback, folder or loggers: a plain experiment
    assert (sweep.folder / "plots" / "history.png").is_file()

    # Rerunning the command resumes the study: the grid is covered, nothing runs again.
    assert len(run.run_optuna(sweep, None).get_trials()) == 4


def test_trials_is_the_studys_total(stub, tmp_path):
    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [0.1, 0.2, 0.3]}\n")))
    sweep = run.Sweep.open(spec, "two", None)
    assert len(run.run_optuna(sweep, 2).get_trials()) == 2
    assert len(run.run_optuna(sweep, 3).get_trials()) == 3  # a rerun with more trials resumes


def test_target_stops_the_sweep(stub, tmp_path):
    parameters = "  x: {values: [0.1, 0.2, 0.3, 0.9]}\n"
    spec = load_sweep(str(write_sweep(tmp_path, parameters, metric="goal: maximize, target: 0.5")))
    study = run.run_optuna(run.Sweep.open(spec, None, None), None)
    values = [t.value for t in study.get_trials()]
    assert values[-1] == 0.9 and all(v < 0.5 for v in values[:-1])  # stopped at the first value >= 0.5
    assert len(values) < 4  # the grid's order (seed 0) puts 0.9 before the last point


def test_a_killed_sweep_ends_its_trial_and_marks_it_failed(stub, tmp_path):
    import os

    from conftest import run_interrupted

    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [sleep]}\n")))
    sweep = run.Sweep.open(spec, None, None)
    pid_file = sweep.folder / "trial-0" / "pid"

    run_interrupted(sweep, pid_file.is_file)  # once the trial started
    trial_pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(trial_pid, 0)  # the trial's process is gone with the sweep
    trial, queued = optuna.load_study(study_name="s", storage=sweep.storage_url).get_trials()
    assert (
        trial.state == optuna.trial.TrialState.FAIL
        and trial.user_attrs["error"] == "the sweep was interrupted"
    )
    # its values wait for the sweep to be started again (tests/sweep/test_sweep_resume.py)
    assert queued.state == optuna.trial.TrialState.WAITING and queued.system_attrs["retry_of"] == 0


def test_outcome_of_a_process(tmp_path):
    (tmp_path / "fit.log").write_text(
        "Epoch 0\nTraceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory.\n"
    )
    assert run.outcome(1, tmp_path, "val/iou").error == "torch.OutOfMemoryError: CUDA out of memory."
    assert run.outcome(-signal.SIGKILL, tmp_path, "val/iou").error == "killed by SIGKILL (out of memory?)"
    (tmp_path / RESULT_FILE).write_text(json.dumps({"values": {"0": 0.3, "1": 0.5}, "pruned": True}))
    assert run.outcome(0, tmp_path, "val/iou") == run.Outcome("pruned", 0.5, "", 2)
    (tmp_path / RESULT_FILE).unlink()
    assert run.outcome(0, tmp_path, "val/iou") == run.Outcome(
        "fail", None, "no validation epoch reported val/iou", 0
    )


class Scored(LightningModule):
    """Logs val/iou = 0.1 every validation epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/iou", 0.1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return [torch.zeros(1)]

    def val_dataloader(self):
        return [torch.zeros(1)]


def trial_with_a_better_one_done(tmp_path: Path, early_terminate: str, metric: str = "val/iou") -> Path:
    """A study in which one trial completed at 0.9 every epoch, and a new trial's trial.json."""
    sweep = write_sweep(tmp_path, "  x: {values: [1, 2]}\n", early_terminate).with_suffix(".yaml")
    sweep_spec = load_sweep(str(sweep))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize", pruner=sweep_spec.pruner())
    dist = optuna.distributions.CategoricalDistribution([1, 2])
    study.add_trial(
        optuna.trial.create_trial(
            value=0.9,
            params={"x": 1},
            distributions={"x": dist},
            intermediate_values={e: 0.9 for e in range(5)},
        )
    )
    trial = study.ask({"x": dist})
    folder = tmp_path / "trial"
    folder.mkdir()
    info = {
        "sweep": str(sweep),
        "storage": url,
        "study": "s",
        "trial_id": trial._trial_id,
        "number": trial.number,
        "metric": metric,
    }
    (folder / TRIAL_FILE).write_text(json.dumps(info))
    return folder


def fit(folder: Path, epochs: int = 5) -> Trainer:
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=[TrialReport(str(folder / TRIAL_FILE))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(Scored())
    return trainer


def test_a_pruned_trial_stops_early(tmp_path):
    folder = trial_with_a_better_one_done(
        tmp_path, "early_terminate: {type: median, n_startup_trials: 1, n_warmup_steps: 1}\n"
    )
    trainer = fit(folder)
    assert trainer.current_epoch == 2  # epochs 0 and 1 ran (warm-up: epoch 0 is never pruned), not 5
    result = json.loads((folder / RESULT_FILE).read_text())
    assert result == {"values": {"0": pytest.approx(0.1), "1": pytest.approx(0.1)}, "pruned": True}
    assert run.outcome(0, folder, "val/iou").state == "pruned"
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.trials[1].intermediate_values == {0: pytest.approx(0.1), 1: pytest.approx(0.1)}


def test_without_early_terminate_every_epoch_runs(tmp_path):
    folder = trial_with_a_better_one_done(tmp_path, "")
    assert fit(folder, epochs=3).current_epoch == 3
    assert json.loads((folder / RESULT_FILE).read_text())["pruned"] is False
    assert math.isclose(run.outcome(0, folder, "val/iou").value or 0, 0.1, rel_tol=1e-6)


def test_a_metric_the_run_does_not_log_is_one_clear_error(tmp_path):
    folder = trial_with_a_better_one_done(tmp_path, "", metric="val/dice")
    with pytest.raises(
        TrialMetricError, match=r"metric 'val/dice' is not logged by this run \(logged: val/iou\)"
    ):
        fit(folder, epochs=1)
