"""A sweep interrupted mid-trial and started again equals an uninterrupted one: the interrupted trial's
run goes on from its last.ckpt as a new trial, with the same intermediate and final values (real
`samflow fit` trials), whether the interruption was a SIGTERM or SLURM's requeue signal (the job
requeued); every validation is its own step for Optuna; the pruner does not count an interrupted trial
beside its rerun, and a continued run's earlier values reach its new trial as they reached the old."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml
from conftest import run_interrupted
from lightning.pytorch import LightningModule, Trainer

from samflow.data.quickstart import make_quickstart_data
from samflow.requeue_hold import requeue_signal_held
from samflow.sweep import run
from samflow.sweep.load import load_sweep
from samflow.sweep.report import RESULT_FILE, TRIAL_FILE, TrialReport
from samflow.sweep.spec import SweepError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from test_signals import _slurm_job  # noqa: E402

# `samflow sweep FILE --study reference` without the file's check and the summary's plots
UNINTERRUPTED = """
import sys
from samflow.sweep import run
from samflow.sweep.load import load_sweep
run.run_optuna(run.Sweep.open(load_sweep(sys.argv[1]), "reference", None), None)
"""
EPOCHS = 3


def tiny_sweep(tmp_path: Path) -> Path:
    """A one-point grid on the quickstart: 3 epochs of four 64 px batches, no sanity check."""
    data = tmp_path / "data"
    make_quickstart_data(data, n_train=4, n_val=2)
    sweep = {
        "method": "grid",
        "metric": {"name": "val/iou", "goal": "maximize"},
        "parameters": {"model.optimizer.init_args.lr": {"values": [5.0e-3]}},
        "command": [
            "${env}", "samflow", "fit", "--experiment", "quickstart",
            f"--trainer.max_epochs={EPOCHS}", "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            f"--data.init_args.quickstart={{root: {data}, n_train: 4, n_val: 2}}",
            "--data.init_args.batch_size=1", "--data.init_args.img_size=64", "--model.sam.img_size=64",
            "${args}",
        ],
    }  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize("interruption", ["sigterm", "slurm_requeue"])
def test_a_sweep_interrupted_mid_trial_and_started_again_has_the_uninterrupted_sweeps_trials(
    tmp_path, monkeypatch, interruption
):
    path = tiny_sweep(tmp_path)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    env.pop("SAMFLOW_DEBUG", None)
    reference = subprocess.Popen(  # the uninterrupted sweep, beside the interrupted one (2 cores)
        [sys.executable, "-c", UNINTERRUPTED, str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reference_folder = tmp_path / "runs" / "quickstart" / "sweeps" / "reference"
    scontrol = _slurm_job(tmp_path, monkeypatch) if interruption == "slurm_requeue" else None

    sweep = run.Sweep.open(load_sweep(str(path)), None, None)
    folder = sweep.folder / "trial-0"

    def reported() -> bool:
        try:
            return bool(json.loads((folder / RESULT_FILE).read_text()).get("values"))
        except (OSError, ValueError):  # not written yet, or half-written
            return False

    # mid-trial, after its first validation
    if scontrol is None:
        run_interrupted(sweep, reported)
    else:
        monkeypatch.setattr(run, "POLL_S", 0.05)

        def requeue_signal() -> None:
            while not reported():
                threading.Event().wait(0.02)
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's --signal=B:USR1@90 sends it

        threading.Thread(target=requeue_signal, daemon=True).start()
        with requeue_signal_held("sweep"), pytest.raises(SweepError, match="SLURM job 4242 requeued"):
            run.run_optuna(sweep, None)
        assert scontrol.read_text() == "requeue 4242\n"  # by the sweep; its trial left it to the sweep
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with requeue_signal_held("sweep"):
        resumed = run.run_optuna(sweep, None).get_trials()  # started again

    out = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, out[-3000:]
    (whole,) = optuna.load_study(
        study_name="reference", storage=f"sqlite:///{reference_folder / 'study.db'}"
    ).get_trials()
    assert whole.state == optuna.trial.TrialState.COMPLETE
    assert list(whole.intermediate_values) == list(range(EPOCHS))

    interrupted, again = resumed
    assert interrupted.state == optuna.trial.TrialState.FAIL
    error = "the sweep was interrupted" if scontrol is None else run.REQUEUED
    assert interrupted.user_attrs["error"] == error
    steps = len(interrupted.intermediate_values)
    assert 1 <= steps < EPOCHS
    assert interrupted.intermediate_values == {s: whole.intermediate_values[s] for s in range(steps)}
    # Its run went on from its last.ckpt, in its folder, as a new trial: the same trial as the
    # uninterrupted sweep's, each epoch reported once, result.json holding every epoch.
    assert again.system_attrs["retry_of"] == interrupted.number and again.params == whole.params
    assert again.user_attrs["folder"] == str(folder) and not (sweep.folder / "trial-1").exists()
    assert (folder / "command.txt").read_text().rstrip().endswith(f"--resume={folder}")
    assert again.state == whole.state and again.value == whole.value
    assert again.intermediate_values == whole.intermediate_values
    result = json.loads((folder / RESULT_FILE).read_text())
    assert {int(k): v for k, v in result["values"].items()} == whole.intermediate_values
    assert again.user_attrs["epochs"] == whole.user_attrs["epochs"] == EPOCHS
    # the continued fit trained only what was left: its training rows are the uninterrupted run's, once
    assert _train_rows(folder / "metrics.csv") == _train_rows(reference_folder / "trial-0" / "metrics.csv")


def _train_rows(metrics: Path) -> list[tuple[str, str]]:
    import csv

    with open(metrics) as f:
        return [(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


class Counted(LightningModule):
    """Logs ``val/iou`` = the number of validations run so far; 4 training batches an epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def on_validation_epoch_start(self) -> None:
        self.validations += 1

    def validation_step(self, batch, batch_idx):
        self.log("val/iou", float(self.validations))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)


class Constant(Counted):
    """Logs ``val/iou`` = ``value`` every validation."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def validation_step(self, batch, batch_idx):
        self.log("val/iou", self.value)


def new_trial(tmp_path: Path, early_terminate: str, done: list[dict]) -> tuple[Path, str]:
    """A study holding the trials ``done`` (create_trial keywords), a new trial and its trial.json."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "method: grid\nmetric: {name: val/iou, goal: maximize}\nprogram: quickstart\n"
        f"{early_terminate}parameters:\n  x: {{values: [1, 2]}}\n"
    )
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(
        storage=url, study_name="s", direction="maximize", pruner=load_sweep(str(sweep)).pruner()
    )
    for trial in done:
        study.add_trial(optuna.trial.create_trial(**trial))
    trial = study.ask()
    folder = tmp_path / "trial"
    folder.mkdir()
    info = {"sweep": str(sweep), "storage": url, "study": "s", "trial_id": trial._trial_id}
    (folder / TRIAL_FILE).write_text(json.dumps({**info, "number": trial.number, "metric": "val/iou"}))
    return folder, url


def fit(folder: Path, module: LightningModule, ckpt_path: Path | None = None, **trainer: object) -> Trainer:
    run_trainer = Trainer(
        callbacks=[TrialReport(str(folder / TRIAL_FILE))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        **trainer,  # type: ignore[arg-type]
    )
    run_trainer.fit(module, ckpt_path=ckpt_path)
    return run_trainer


def test_several_validations_in_an_epoch_are_each_reported_as_their_own_step(tmp_path):
    folder, url = new_trial(tmp_path, "", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(folder, Counted(), max_epochs=2, val_check_interval=0.5)  # 2 validations an epoch
    assert not [w for w in caught if "already reported" in str(w.message)]
    (trial,) = optuna.load_study(study_name="s", storage=url).get_trials()
    assert trial.intermediate_values == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}  # each validation, in order
    result = json.loads((folder / RESULT_FILE).read_text())
    assert result["values"] == {str(k): v for k, v in trial.intermediate_values.items()}
    # the objective is the last value Optuna holds too
    assert run.outcome(0, folder, "val/iou") == run.Outcome("complete", 4.0, "", 4)


def test_the_pruner_does_not_count_an_interrupted_trial_beside_its_rerun(tmp_path):
    """Hyperband (one bracket, eta 2, rung 0 at the second validation): the new trial's 0.7 is promoted
    among the finished trials' rung values 0.9, 0.5, 0.4 (top half); counting the interrupted trial's 0.9
    a second time beside its rerun's would prune it."""

    def finished(value: float, state: str = "COMPLETE", **system_attrs: object) -> dict:
        return {
            "state": optuna.trial.TrialState[state],
            "value": value if state == "COMPLETE" else None,
            "intermediate_values": {0: value, 1: value},
            "system_attrs": {"completed_rung_0": value, **system_attrs},
        }

    done = [
        finished(0.9, "FAIL"),  # trial 0: interrupted after its second validation
        finished(0.9, retry_of=0),  # trial 1: its values run again
        finished(0.5),
        finished(0.4),
    ]
    hyperband = "early_terminate: {type: hyperband, min_iter: 1, max_iter: 1, eta: 2}\n"
    folder, url = new_trial(tmp_path, hyperband, done)
    trainer = fit(folder, Constant(0.7), max_epochs=3)
    assert trainer.current_epoch == 3  # not pruned: every epoch ran
    trial = optuna.load_study(study_name="s", storage=url).get_trials()[-1]
    assert trial.system_attrs["completed_rung_0"] == pytest.approx(0.7)  # the pruner did decide
    assert json.loads((folder / RESULT_FILE).read_text())["pruned"] is False


class ByEpoch(Counted):
    """Logs ``val/iou`` = ``values[epoch]``: the same values in a run continued from a checkpoint."""

    values = (0.3, 0.7, 0.8, 0.9)

    def validation_step(self, batch, batch_idx):
        self.log("val/iou", self.values[self.current_epoch])


def _trial_fit(folder: Path, trial: optuna.Trial, url: str, sweep: Path, **kw) -> Trainer:
    """``ByEpoch`` trained with the ``TrialReport`` of ``trial`` (its trial.json in ``folder``)."""
    folder.mkdir(exist_ok=True)
    info = {"sweep": str(sweep), "storage": url, "study": "s", "trial_id": trial._trial_id}
    (folder / TRIAL_FILE).write_text(json.dumps({**info, "number": trial.number, "metric": "val/iou"}))
    return fit(folder, ByEpoch(), **kw)


@pytest.mark.parametrize("competitors", [(0.5, 0.4), (0.9, 0.95, 0.5)], ids=["promoted", "pruned"])
def test_a_continued_run_reports_its_earlier_values_to_its_new_trial_as_the_old_trial_did(
    tmp_path, competitors
):
    """Hyperband, one bracket, rung 0 at the second validation (value 0.7). A trial interrupted after
    two validations (past the rung) goes on from its checkpoint as a new trial: that trial is given the
    values 0.3 and 0.7 first, the pruner asked after each, so its rung holds 0.7 as an uninterrupted
    trial's does (asked first at the third validation, it would record 0.8 there), and against better
    competitors it is pruned at that rung, at once, with the values up to it, as the uninterrupted trial."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "method: grid\nmetric: {name: val/iou, goal: maximize}\nprogram: quickstart\n"
        "early_terminate: {type: hyperband, min_iter: 1, max_iter: 1, eta: 2}\nparameters:\n"
        "  x: {values: [1, 2]}\n"
    )

    def study_in(name: str) -> tuple[optuna.Study, str]:
        url = f"sqlite:///{tmp_path / name}.db"
        study = optuna.create_study(
            storage=url, study_name="s", direction="maximize", pruner=load_sweep(str(sweep)).pruner()
        )
        for value in competitors:
            study.add_trial(
                optuna.trial.create_trial(
                    state=optuna.trial.TrialState.COMPLETE,
                    value=value,
                    intermediate_values={0: value, 1: value},
                    system_attrs={"completed_rung_0": value},
                )
            )
        return study, url

    study, url = study_in("whole")
    whole = _trial_fit(tmp_path / "whole", study.ask(), url, sweep, max_epochs=4)
    (*_, uninterrupted) = study.get_trials()

    study, url = study_in("continued")
    interrupted = study.ask()  # interrupted after two validations (its rung done), its checkpoint kept
    first = _trial_fit(tmp_path / "run", interrupted, url, sweep, max_epochs=2)
    checkpoint = tmp_path / "run" / "last.ckpt"
    first.save_checkpoint(checkpoint)
    study.tell(interrupted, state=optuna.trial.TrialState.FAIL)
    run.run_again(study, study.get_trials()[-1], resume=tmp_path / "run")
    continued = _trial_fit(tmp_path / "run", study.ask(), url, sweep, max_epochs=4, ckpt_path=checkpoint)
    (*_, again) = study.get_trials()

    assert again.system_attrs["retry_of"] == interrupted.number
    assert again.intermediate_values == uninterrupted.intermediate_values
    rung = again.system_attrs["completed_rung_0"]
    assert rung == uninterrupted.system_attrs["completed_rung_0"] == pytest.approx(0.7)
    result = json.loads((tmp_path / "run" / RESULT_FILE).read_text())
    pruned = competitors == (0.9, 0.95, 0.5)
    assert result["pruned"] is pruned and whole.should_stop is pruned
    assert {int(k): v for k, v in result["values"].items()} == uninterrupted.intermediate_values
    # pruned: it stopped at the rung as the uninterrupted trial did, without training on
    assert continued.current_epoch == whole.current_epoch == (2 if pruned else 4)
    assert continued.global_step == whole.global_step


def test_a_run_continued_from_its_end_reports_its_values_to_its_new_trial(tmp_path):
    """The interruption came after the trial's training (its last.ckpt is that of its last epoch): the
    continued fit trains nothing (Lightning skips its training loop, so no on_train_start), and its new
    trial still gets the run's values and completes with its last value, instead of failing with "no
    validation epoch reported"."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "method: grid\nmetric: {name: val/iou, goal: maximize}\nprogram: quickstart\n"
        "parameters:\n  x: {values: [1, 2]}\n"
    )
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    interrupted = study.ask()
    first = _trial_fit(tmp_path / "run", interrupted, url, sweep, max_epochs=2)
    checkpoint = tmp_path / "run" / "last.ckpt"
    first.save_checkpoint(checkpoint)  # trained to its end, then ended before its process did
    study.tell(interrupted, state=optuna.trial.TrialState.FAIL)
    run.run_again(study, study.get_trials()[-1], resume=tmp_path / "run")
    (tmp_path / "run" / RESULT_FILE).unlink()  # as the sweep does before it continues the run
    continued = _trial_fit(tmp_path / "run", study.ask(), url, sweep, max_epochs=2, ckpt_path=checkpoint)

    assert continued.global_step == first.global_step  # nothing trained
    (*_, again) = study.get_trials()
    assert again.intermediate_values == pytest.approx({0: 0.3, 1: 0.7})
    assert run.outcome(0, tmp_path / "run", "val/iou") == run.Outcome("complete", pytest.approx(0.7), "", 2)


class InProcessTrial:
    """A stand-in for a trial's ``samflow fit`` process, run in a thread of the test (no start-up cost):
    ``TrialReport`` reports 4 validations whose values depend on x, and stops when pruned; the trial
    ``interrupt`` names blocks after its second validation, until the sweep ends it."""

    interrupt = ""
    pid = 2**22 + 1  # above any pid_max: nothing to signal

    def __init__(self, command, **kwargs) -> None:
        self.folder, self.x = Path(command[0]), float(command[1])
        self.ended = threading.Event()
        self.returncode: int | None = None
        self.thread = threading.Thread(target=self.fit, daemon=True)
        self.thread.start()

    def fit(self) -> None:
        report = TrialReport(str(self.folder / TRIAL_FILE))
        for step in range(4):
            value = self.x if step % 2 else 1 - self.x
            trainer = SimpleNamespace(callback_metrics={"val/iou": value}, current_epoch=step)
            prune, _ = report._report(trainer)
            if self.folder.name == self.interrupt and step == 1:
                (self.folder / "asleep").touch()
                self.ended.wait()
                self.returncode = -signal.SIGTERM
                return
            if prune:
                break
        self.returncode = 0

    def wait(self, timeout: float | None = None) -> int | None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise subprocess.TimeoutExpired("fit", timeout or 0)
        return self.returncode

    def end(self) -> None:
        self.ended.set()
        self.thread.join()


def test_a_resumed_sweep_runs_the_grid_in_order_and_prunes_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """Grid + Hyperband, trial 2 interrupted after two validations: started again, its values run
    again right away, the points after it run in the uninterrupted sweep's order, each in the same
    Hyperband bracket, so every trial gets the same values and the same pruning decision."""
    xs = ", ".join(str(round(0.1 * i, 1)) for i in range(1, 9))
    path = tmp_path / "s.yaml"
    path.write_text(
        "method: grid\nmetric: {name: val/iou, goal: maximize}\nprogram: quickstart\n"
        "early_terminate: {type: hyperband, min_iter: 1, max_iter: 4, eta: 2}\n"
        f"parameters:\n  x: {{values: [{xs}]}}\n"
    )
    monkeypatch.setattr(run, "trial_command", lambda s, overrides, folder: [str(folder), str(overrides["x"])])
    monkeypatch.setattr(run.subprocess, "Popen", InProcessTrial)
    monkeypatch.setattr(run, "_end_group", InProcessTrial.end)

    def trials_of(where: str, interrupt: str = "") -> list:
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        sweep = run.Sweep.open(load_sweep(str(path)), None, None)  # the same study name: same brackets
        if interrupt:
            monkeypatch.setattr(InProcessTrial, "interrupt", interrupt)
            asleep = sweep.folder / interrupt / "asleep"

            run_interrupted(sweep, asleep.is_file, poll=0.01)
            monkeypatch.setattr(InProcessTrial, "interrupt", "")
        return run.run_optuna(sweep, None).get_trials()

    whole = trials_of("whole")
    resumed = trials_of("resumed", interrupt="trial-2")
    assert [t.number for t in resumed if t.state.name == "FAIL"] == [2]
    assert resumed[3].system_attrs["retry_of"] == 2 and resumed[3].params == resumed[2].params

    def seen(trials: list) -> list:
        return [(t.params, t.state.name, t.intermediate_values) for t in trials if t.state.name != "FAIL"]

    assert seen(resumed) == seen(whole)
    assert {t.state.name for t in whole} == {"COMPLETE", "PRUNED"}  # the pruner did decide
