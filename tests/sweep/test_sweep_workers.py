"""Workers that die: a sweep worker killed with SIGKILL takes its trial's process with it, the trial is
marked failed once its heartbeats stop, and the next run runs its grid point again. A study reopened
with an edited sweep file is refused; a trial Optuna cannot give values is failed, not left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from test_sweep_loop import write_sweep

from samflow.sweep import run, storage
from samflow.sweep.load import load_sweep
from samflow.sweep.summary import summarize

# A worker whose trial writes its pid and sleeps, as a long `samflow fit` would.
WORKER = """
import sys
from samflow.sweep import run
from samflow.sweep.load import load_sweep
SLEEP = "import os, pathlib, sys, time; pathlib.Path(sys.argv[1], 'pid').write_text(str(os.getpid())); time.sleep(60)"
run.trial_command = lambda sweep, overrides, folder: [sys.executable, "-c", SLEEP, str(folder)]
run.run_optuna(run.Sweep.open(load_sweep(sys.argv[1]), None, None), None)
"""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for(check, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_killed_with_sigkill_takes_its_trial_along_and_the_point_runs_again(
    stub, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SAMFLOW_SWEEP_GRACE_S", "2")
    path = write_sweep(tmp_path, "  x: {values: [0.5]}\n")
    env = {**os.environ, "SAMFLOW_SWEEP_GRACE_S": "2", "WANDB_MODE": "disabled"}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(path)], cwd=tmp_path, env=env)
    pid_file = tmp_path / "runs/quickstart/sweeps/s/trial-0/pid"
    try:
        assert wait_for(pid_file.is_file, 60), "the worker never started its trial"
        trial_pid = int(pid_file.read_text())
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        assert wait_for(lambda: not alive(trial_pid), 10), "the trial's process outlived its worker"
    finally:
        worker.kill()
        worker.wait()
    time.sleep(3.5)  # past the grace period: the trial's heartbeats have stopped

    sweep = run.Sweep.open(load_sweep(str(path)), None, None)
    study = run.run_optuna(sweep, None)
    dead, again = study.get_trials()
    assert dead.state == optuna.trial.TrialState.FAIL and dead.params == {"x": 0.5}
    assert again.state == optuna.trial.TrialState.COMPLETE and again.params == {"x": 0.5}
    assert again.value == 0.5 and again.system_attrs["retry_of"] == dead.number
    capsys.readouterr()
    summarize(sweep, study)
    assert "its worker died (no heartbeat); run again as trial 1" in capsys.readouterr().out
    assert len(run.run_optuna(sweep, None).get_trials()) == 2  # the grid is covered: nothing more runs


def test_the_grace_period_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("SAMFLOW_SWEEP_GRACE_S", raising=False)
    assert (storage.grace_period(), storage.heartbeat_interval()) == (120, 30)
    monkeypatch.setenv("SAMFLOW_SWEEP_GRACE_S", "8")
    assert (storage.grace_period(), storage.heartbeat_interval()) == (8, 2)
    monkeypatch.setenv("SAMFLOW_SWEEP_GRACE_S", "soon")
    with pytest.raises(storage.SweepError, match="SAMFLOW_SWEEP_GRACE_S must be a whole number"):
        storage.grace_period()


def test_a_trial_has_a_heartbeat_before_its_process_starts(stub, tmp_path, monkeypatch):
    import sqlalchemy

    beats: list[int] = []

    def command(sweep, overrides, folder):  # runs between the trial's creation and its process
        with sqlalchemy.create_engine(sweep.storage_url).connect() as db:
            beats.append(db.execute(sqlalchemy.text("select count(*) from trial_heartbeats")).scalar())
        return [sys.executable, "-c", "print(1)", json.dumps(overrides)]

    monkeypatch.setattr(run, "trial_command", command)
    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [0.5]}\n")))
    run.run_optuna(run.Sweep.open(spec, None, None), None)
    assert beats == [1]


@pytest.mark.parametrize(
    ("edited", "why"),
    [
        ("  y: {values: [0.1, 0.2]}\n", (r"x: values \[0.1, 0.2\] in the study, absent in the file; "
         r"y: absent in the study, values \[0.1, 0.2\] in the file")),
        ("  x: {values: [0.1, 0.2, 0.3]}\n", r"x: values \[0.1, 0.2\] in the study, values \[0.1, 0.2, 0.3\] in the file"),
    ],
)  # fmt: skip
def test_a_study_refuses_a_sweep_file_with_other_parameters(stub, tmp_path, edited, why):
    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [0.1, 0.2]}\n")))
    study = run.run_optuna(run.Sweep.open(spec, None, None), None)
    assert study.user_attrs["search_space"] == {"x": "values [0.1, 0.2]"}
    edited_spec = load_sweep(str(write_sweep(tmp_path, edited)))
    with pytest.raises(
        run.SweepError,
        match=rf"study 's' in .* was made from other parameters: {why}; use another --study or the original file",
    ):
        run.run_optuna(run.Sweep.open(edited_spec, None, None), None)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]  # nothing was added


def test_values_a_study_cannot_sample_fail_the_trial_and_the_sweep_in_one_line(stub, tmp_path):
    from optuna.distributions import CategoricalDistribution

    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [0.1, 0.2]}\n")))
    study = run.run_optuna(run.Sweep.open(spec, None, None), None)
    with pytest.raises(run.SweepError, match=r"study 's': trial 2 got no values: .*dynamic value space"):
        run._ask(study, {"x": CategoricalDistribution([0.1, 0.2, 0.3])})
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]  # no trial left RUNNING
