"""`samflow sweep` in a SLURM job (`#SBATCH --signal=USR1@90`): the requeue signal is passed on to the
running trial, which stops at its last.ckpt; the sweep marks the trial to continue from there, requeues
the job and exits 1; the restarted job's same command continues that trial's run in its folder. Stand-in
trials here (tests/sweep/test_sweep_resume_invariance.py runs real ones)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from samflow.requeue_hold import requeue_signal_held
from samflow.sweep import run
from samflow.sweep.load import load_sweep
from samflow.sweep.spec import SweepError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from test_signals import _slurm_job  # noqa: E402

# A stand-in for a trial's `samflow fit`: it records its environment and flags; x = "long" trains until
# SIGUSR1, then writes checkpoints/last.ckpt and exits 1, as a fit stopped by the requeue signal does;
# continued (--resume=FOLDER), it finishes from there; "longer" is stopped so twice; "crash" is killed
# (SIGKILL) when continued. x = "last" finishes with status 0 at the signal (a trial in its last batch),
# "last-nan" too, its value NaN; "early" stops at the signal before its first step (no last.ckpt). None
# waits with TRIAL_DOES_NOT_WAIT set, or longer than 2 minutes (then exit 3). Values: epoch 0 = 0.1,
# epoch 1 = 0.2.
TRIAL = """
import json, os, signal, sys, time
from pathlib import Path
folder, x, flags = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
with open(folder / "calls.jsonl", "a") as calls:
    calls.write(json.dumps({"requeues": os.environ.get("SAMFLOW_SWEEP_REQUEUES"), "flags": flags}) + "\\n")
runs = len((folder / "calls.jsonl").read_text().splitlines())
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
(folder / "pid").write_text(str(os.getpid()))
waits = {"long": 1, "longer": 2, "crash": 1, "last": 1, "last-nan": 1, "early": 1}
if runs <= waits.get(x, 0) and not os.environ.get("TRIAL_DOES_NOT_WAIT"):
    deadline = time.monotonic() + 120
    while not stop:
        time.sleep(0.02)
        if time.monotonic() > deadline:
            sys.exit(3)
    if x == "last-nan":
        (folder / "result.json").write_text(json.dumps({"values": {0: float("nan")}, "pruned": False}))
        sys.exit(0)
    if x != "last":
        if x != "early":
            (folder / "checkpoints").mkdir(exist_ok=True)
            (folder / "checkpoints" / "last.ckpt").write_text(f"run {runs}")
            (folder / "result.json").write_text(json.dumps({"values": {0: 0.1}, "pruned": False}))
        print("samflow: error: fit stopped by SLURM's requeue signal at step 3", flush=True)
        sys.exit(1)
if x == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
(folder / "result.json").write_text(json.dumps({"values": {0: 0.1, 1: 0.2}, "pruned": False}))
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """Stand-in trials (``TRIAL``), W&B off."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(
        run,
        "trial_command",
        lambda sweep, overrides, folder: [
            sys.executable,
            "-c",
            TRIAL,
            str(folder),
            json.dumps(overrides["x"]),
        ],
    )


@pytest.fixture
def job(stand_in, tmp_path, monkeypatch):
    """This process as SLURM job 4242 (a stand-in scontrol writing to the returned file)."""
    return _slurm_job(tmp_path, monkeypatch)


def sweep_of(tmp_path: Path, values: str) -> run.Sweep:
    path = tmp_path / "s.yaml"
    path.write_text(
        f"method: grid\nmetric: {{name: val/iou, goal: maximize}}\nprogram: quickstart\n"
        f"parameters:\n  x: {{values: [{values}]}}\n"
    )
    return run.Sweep.open(load_sweep(str(path)), None, None)


def signal_when(ready) -> None:
    """SIGUSR1 to this process (the sweep's worker) once ``ready()``, as SLURM's ``--signal`` sends it."""

    def send() -> None:
        deadline = time.monotonic() + 60
        while not ready():
            time.sleep(0.02)
            if time.monotonic() > deadline:
                return  # not sent: the test fails on what it finds
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=send, daemon=True).start()


def sweep_command(sweep: run.Sweep) -> optuna.Study:
    """``samflow sweep``'s hold and trial loop (``samflow.cli`` holds the signal from the command's start)."""
    with requeue_signal_held("sweep"):
        return run.run_optuna(sweep, None)


def calls_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]


def test_the_signal_stops_the_running_trial_at_its_checkpoint_requeues_the_job_and_the_trial_goes_on(
    job, tmp_path, monkeypatch, capsys
):
    sweep = sweep_of(tmp_path, "long")
    folder = sweep.folder / "trial-0"
    signal_when((folder / "pid").is_file)

    with pytest.raises(SweepError) as stopped:
        sweep_command(sweep)
    assert str(stopped.value) == (
        f"samflow sweep: SLURM's requeue signal: trial 0 stopped at {folder}/checkpoints/last.ckpt, and runs "
        "on as a new trial; SLURM job 4242 requeued: the same command goes on with study 's' when the job "
        "starts again."
    )
    assert job.read_text() == "requeue 4242\n"  # once, by the sweep
    # The trial got the signal from its worker and was told that the sweep requeues the job.
    assert calls_of(folder) == [{"requeues": "1", "flags": []}]
    (trial, queued) = optuna.load_study(study_name="s", storage=sweep.storage_url).get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["error"] == run.REQUEUED
    assert queued.state == optuna.trial.TrialState.WAITING
    assert queued.system_attrs["retry_of"] == 0 and queued.system_attrs["resume_from"] == str(folder)
    assert "not requeued" not in capsys.readouterr().err  # the error line says it all

    # The restarted job: the same command continues trial 0's run, in its folder, as trial 1.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    trials = sweep_command(sweep).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    again = trials[1]
    assert again.value == 0.2 and again.user_attrs["folder"] == str(folder)
    assert calls_of(folder)[1] == {"requeues": "1", "flags": [f"--resume={folder}"]}
    assert not (sweep.folder / "trial-1").exists()
    assert f"trial 1: x=long (continues {folder}/checkpoints/last.ckpt)" in capsys.readouterr().out
    assert job.read_text() == "requeue 4242\n"  # nothing requeued the second time


def test_the_signal_between_trials_requeues_before_the_next_trial_starts(job, tmp_path):
    sweep = sweep_of(tmp_path, "0.5")
    with requeue_signal_held("sweep"):
        signal.raise_signal(signal.SIGUSR1)  # held: the command has started, no trial yet
        with pytest.raises(
            SweepError, match="SLURM's requeue signal: stopped between trials; SLURM job 4242"
        ):
            run.run_optuna(sweep, None)
    assert job.read_text() == "requeue 4242\n"
    assert optuna.load_study(study_name="s", storage=sweep.storage_url).get_trials() == []


def test_a_signal_in_the_last_trial_that_then_completes_is_only_noted(job, tmp_path, capsys):
    """The trial finished (status 0) though the signal reached it: nothing is left to requeue."""
    sweep = sweep_of(tmp_path, "last")
    signal_when((sweep.folder / "trial-0" / "pid").is_file)
    (trial,) = sweep_command(sweep).get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.2
    assert not job.exists()  # no scontrol requeue
    assert capsys.readouterr().err == (
        "samflow: SLURM's requeue signal: `samflow sweep` is not requeued (its study is done); it goes on "
        "until it ends or the job's time limit.\n"
    )


def test_a_trial_ended_by_the_sweeps_interruption_continues_from_its_checkpoint(
    stand_in, tmp_path, monkeypatch
):
    """Ctrl-C / SIGTERM (no SLURM needed): the ended trial's last.ckpt is where its rerun starts."""
    from conftest import run_interrupted

    monkeypatch.chdir(tmp_path)
    end_group = run._end_group
    monkeypatch.setattr(  # the stand-in trial stops at SIGTERM as a fit does: last.ckpt, status 1
        run, "_end_group", lambda proc: (os.killpg(proc.pid, signal.SIGUSR1), proc.wait(timeout=30))
    )
    sweep = sweep_of(tmp_path, "long")
    folder = sweep.folder / "trial-0"
    run_interrupted(sweep, (folder / "pid").is_file)
    monkeypatch.setattr(run, "_end_group", end_group)

    trials = run.run_optuna(sweep, None).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].user_attrs["error"] == "the sweep was interrupted"
    assert trials[1].system_attrs["resume_from"] == str(folder)
    assert trials[1].user_attrs["folder"] == str(folder) and trials[1].value == 0.2
    assert calls_of(folder)[1]["flags"] == [f"--resume={folder}"]


def test_a_trial_requeued_twice_goes_on_in_its_first_folder(job, tmp_path, monkeypatch):
    sweep = sweep_of(tmp_path, "longer")
    folder = sweep.folder / "trial-0"
    for restart in range(2):
        (folder / "pid").unlink(missing_ok=True)
        signal_when((folder / "pid").is_file)
        with pytest.raises(SweepError, match=f"trial {restart} stopped at {folder}/checkpoints/last.ckpt"):
            sweep_command(sweep)
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart + 1))
    trials = sweep_command(sweep).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE"]
    assert [t.system_attrs.get("retry_of") for t in trials] == [None, 0, 1]
    assert {t.user_attrs["folder"] for t in trials} == {str(folder)}
    assert [c["flags"] for c in calls_of(folder)] == [[], [f"--resume={folder}"], [f"--resume={folder}"]]
    assert job.read_text() == "requeue 4242\n" * 2


def test_a_trial_whose_checkpoint_is_gone_starts_over_in_a_folder_of_its_own(
    job, tmp_path, monkeypatch, capsys
):
    sweep = sweep_of(tmp_path, "long")
    folder = sweep.folder / "trial-0"
    signal_when((folder / "pid").is_file)
    with pytest.raises(SweepError):
        sweep_command(sweep)
    (folder / "checkpoints" / "last.ckpt").unlink()  # removed by hand before the job started again
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("TRIAL_DOES_NOT_WAIT", "1")
    trials = sweep_command(sweep).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].user_attrs["folder"] == str(sweep.folder / "trial-1")
    assert calls_of(sweep.folder / "trial-1") == [{"requeues": "1", "flags": []}]
    assert (
        f"trial 1: x=long (trial 0's {folder}/checkpoints/last.ckpt is gone: it starts over)"
        in capsys.readouterr().out
    )


def test_a_continued_trial_that_fails_is_given_its_own_error_not_the_interrupted_runs(
    job, tmp_path, monkeypatch
):
    """Its fit.log is appended to the interrupted run's, whose last line was the requeue's error."""
    sweep = sweep_of(tmp_path, "crash")
    folder = sweep.folder / "trial-0"
    signal_when((folder / "pid").is_file)
    with pytest.raises(SweepError):
        sweep_command(sweep)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    interrupted, again = sweep_command(sweep).get_trials()
    assert interrupted.user_attrs["error"] == run.REQUEUED
    assert again.state == optuna.trial.TrialState.FAIL and again.user_attrs["folder"] == str(folder)
    assert again.user_attrs["error"] == "killed by SIGKILL (out of memory?)"
    assert "fit stopped by SLURM's requeue signal" in (folder / "fit.log").read_text()  # kept, appended to


def test_a_trial_that_ends_with_status_0_after_the_signal_is_not_requeued_even_when_it_failed(
    job, tmp_path, capsys
):
    """Its NaN value is its result: nothing is left to continue, and the job is not requeued for it."""
    sweep = sweep_of(tmp_path, "last-nan")
    signal_when((sweep.folder / "trial-0" / "pid").is_file)
    (trial,) = sweep_command(sweep).get_trials()  # the study's one trial: done, the signal only noted
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["error"] == "val/iou is nan after epoch 0"
    assert not job.exists()  # no scontrol requeue
    assert "is not requeued (its study is done)" in capsys.readouterr().err


def test_a_trial_stopped_before_its_first_step_starts_over_in_a_folder_of_its_own(
    job, tmp_path, monkeypatch, capsys
):
    """It saved no last.ckpt: its values run again as a new trial, without a run to continue."""
    sweep = sweep_of(tmp_path, "early")
    signal_when((sweep.folder / "trial-0" / "pid").is_file)
    with pytest.raises(SweepError, match="trial 0 stopped before training, and runs on as a new trial"):
        sweep_command(sweep)
    (_, queued) = optuna.load_study(study_name="s", storage=sweep.storage_url).get_trials()
    assert queued.system_attrs["retry_of"] == 0 and "resume_from" not in queued.system_attrs
    capsys.readouterr()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("TRIAL_DOES_NOT_WAIT", "1")
    trials = sweep_command(sweep).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].user_attrs["folder"] == str(sweep.folder / "trial-1")
    assert "trial 1: x=early\n" in capsys.readouterr().out  # not "its last.ckpt is gone"


def test_a_trial_that_slurm_signals_itself_and_that_stops_before_its_worker_looks_goes_on(
    job, tmp_path, monkeypatch
):
    """``srun samflow sweep`` under ``--signal=USR1@90``: SLURM signals every process of the step, the
    trial's too, which may stop and end before its worker next looks for the signal (``POLL_S``)."""
    monkeypatch.setattr(run, "POLL_S", 30.0)  # the worker looks only once the trial has ended
    sweep = sweep_of(tmp_path, "long")
    folder = sweep.folder / "trial-0"

    def send() -> None:
        deadline = time.monotonic() + 60
        while not (folder / "pid").is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(int((folder / "pid").read_text()), signal.SIGUSR1)  # its handler is in place by then
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=send, daemon=True).start()
    with pytest.raises(SweepError, match=f"trial 0 stopped at {folder}/checkpoints/last.ckpt, and runs on"):
        sweep_command(sweep)
    (trial, queued) = optuna.load_study(study_name="s", storage=sweep.storage_url).get_trials()
    assert trial.user_attrs["error"] == run.REQUEUED
    assert queued.state == optuna.trial.TrialState.WAITING and queued.system_attrs["resume_from"] == str(
        folder
    )


def test_the_wandb_backend_notes_the_signal_and_goes_on(job, monkeypatch, capsys):
    """``--backend wandb``: W&B's agent runs the trials; the signal is held and noted in one line, and the
    job is not requeued."""
    from samflow.cli import main
    from samflow.sweep import agent

    def agent_runs(spec, trials) -> int:  # W&B's agent, its trials running when the signal comes
        signal.raise_signal(signal.SIGUSR1)
        return 0

    monkeypatch.setattr(agent, "run_wandb", agent_runs)
    assert main(["sweep", "quickstart_lr", "--backend", "wandb"]) == 0
    assert capsys.readouterr().err == (
        "samflow: SLURM's requeue signal: `samflow sweep --backend wandb` is not requeued (only fit, "
        "student, embed, proposals and sweep are); it goes on until it ends or the job's time limit.\n"
    )
    assert not job.exists()


def test_a_sweep_that_ends_before_its_trial_loop_says_it_did_not_requeue_the_job(job, monkeypatch, capsys):
    """The signal, then an error before any trial (here the sweep file's): one line that the job was not
    requeued (a sweep requeues from its trial loop, which never ran), and the error line."""
    from samflow.cli import main
    from samflow.sweep import load
    from samflow.sweep.spec import SweepError

    def unreadable(name):
        signal.raise_signal(signal.SIGUSR1)
        raise SweepError(f"{name}: cannot read it (stand-in)")

    monkeypatch.setattr(load, "load_sweep", unreadable)
    assert main(["sweep", "s.yaml"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "samflow: SLURM's requeue signal: `samflow sweep` ended before it could stop a trial and requeue the "
        "job.\nsamflow: error: s.yaml: cannot read it (stand-in)\n"
    ), err
    assert not job.exists()
