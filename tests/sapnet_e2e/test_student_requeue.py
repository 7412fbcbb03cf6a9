"""`samflow student` in a SLURM job with ``#SBATCH --signal=SIGUSR1@90``: requeued as `samflow fit` is.

Before, the student's Trainer had Lightning's own auto-requeue: the signal made Lightning write
``hpc_ckpt_1.ckpt`` into ``--out`` from inside its handler (part way through a step), run ``scontrol
requeue`` and train on to the end, exit 0; the restarted job's same command was refused (``--out`` holds
an earlier run) or, with ``--overwrite``, trained from Lightning's mid-step file. Now ``SlurmRequeue``
stops the student after the signal's batch with ``last.ckpt`` holding it, exit 1, the job requeued, and
the restarted job's same command continues the run (``--out``'s ``run.json`` names the job and command)
to the uninterrupted run's files and weights; a signal before the first step starts it again. SLURM is
faked as in ``tests/reliability/test_signals.py``; the signal is sent in this process.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from test_student_resume import _same_run, _signal_at, _student_state, setup  # noqa: F401  (a fixture)

from samflow.cli import main
from samflow.student import StudentModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from test_signals import _slurm_job  # noqa: E402


def test_the_requeue_signal_stops_the_student_requeues_the_job_and_its_restart_ends_as_uninterrupted(
    setup, tmp_path, monkeypatch, capsys
):
    root, base, whole, _ = setup
    calls = _slurm_job(tmp_path, monkeypatch)
    out = tmp_path / "student"
    args = [*base, "--out", str(out), "--last.every_n_train_steps", "2"]  # the job script's command
    with monkeypatch.context() as patch:
        patch.setattr(StudentModule, "on_train_batch_end", None, raising=False)
        _signal_at(4, signal.SIGUSR1)
        assert main(args) == 1  # was 0: Lightning's handler saved hpc_ckpt_1.ckpt and trained on
    err = capsys.readouterr().err
    assert (
        f"samflow: error: student stopped by SLURM's requeue signal at step 4; {out}/checkpoints/last.ckpt "
        "(step 4) holds it. SLURM job 4242 requeued: it continues this run when it starts again.\n"
    ) in err, err
    assert calls.read_text() == "requeue 4242\n"
    assert _student_state(out)[0]["global_step"] == 4
    assert not list(tmp_path.rglob("hpc_ckpt_*"))

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert main(args) == 0  # the same command, no --resume: was refused (an earlier run in --out)
    assert f"samflow student: SLURM job 4242 started again: it continues the run in {out}.\n" in (
        capsys.readouterr().out
    )
    _same_run(out, whole)
    assert calls.read_text() == "requeue 4242\n"


def test_the_requeue_signal_before_the_first_step_requeues_and_the_restart_starts_the_student_again(
    setup, tmp_path, monkeypatch, capsys
):
    """The signal while the student starts (its data set up, before the fit's handlers): held from the
    command's start, the run stops before its first step with nothing saved, the job requeued; the
    restarted job's same command (even with ``--overwrite``) starts the run again, to the uninterrupted
    run's files. Before, the signal's default action ended the process."""
    root, base, whole, _ = setup
    calls = _slurm_job(tmp_path, monkeypatch)
    out = tmp_path / "early"
    args = [*base, "--out", str(out), "--overwrite"]

    def setup_signalled(self, stage):
        signal.raise_signal(signal.SIGUSR1)

    with monkeypatch.context() as patch:
        patch.setattr(StudentModule, "setup", setup_signalled, raising=False)
        assert main(args) == 1
    err = capsys.readouterr().err
    assert (
        "samflow: error: student stopped by SLURM's requeue signal at step 0; no checkpoint was written yet. "
        "SLURM job 4242 requeued: it starts this student run again when it starts again.\n"
    ) in err, err
    assert calls.read_text() == "requeue 4242\n"
    assert not (out / "checkpoints" / "last.ckpt").exists()

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert main(args) == 0
    assert "it starts again the run it had not trained in" in capsys.readouterr().out
    _same_run(out, whole)


@pytest.mark.parametrize(
    ("job", "other"),
    [("5555", []), ("4242", ["--mps-weight", "0.5"])],
    ids=["another job", "another command"],
)
def test_a_restarted_job_takes_over_no_run_it_did_not_start_with_its_command(
    setup, tmp_path, monkeypatch, capsys, job, other
):
    """``--out`` holding a run of another job, or of this job's other command line, is refused in a
    restarted job as outside SLURM: only the job's own run is continued."""
    root, base, whole, _ = setup
    _slurm_job(tmp_path, monkeypatch)
    out = tmp_path / "other"
    assert main([*base, "--out", str(out)]) == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_JOB_ID", job)
    capsys.readouterr()
    assert main([*base, "--out", str(out), *other]) == 1
    assert "holds an earlier student run" in capsys.readouterr().err


def test_the_requeue_signal_in_the_students_test_is_noted_and_the_run_ends_as_without_it(
    setup, tmp_path, monkeypatch, capsys
):
    """Training done, the signal in the test's first batch: nothing to requeue; one line, the test goes
    on, exit 0 with the uninterrupted run's files, ``scontrol`` never run. (Held from the command's start,
    it was delivered when the command ended: the process died of it after writing its files.)"""
    root, base, whole, _ = setup
    calls = _slurm_job(tmp_path, monkeypatch)
    out = tmp_path / "in_test"

    def on_test_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            signal.raise_signal(signal.SIGUSR1)

    with monkeypatch.context() as patch:
        patch.setattr(StudentModule, "on_test_batch_end", on_test_batch_end, raising=False)
        assert main([*base, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (
        "samflow: SLURM's requeue signal: `samflow student` is not requeued (its training is done); it goes on "
        "until it ends or the job's time limit.\n"
    ) in err, err
    assert not calls.exists()
    _same_run(out, whole)
