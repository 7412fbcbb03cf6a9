"""A signal reaching one process of a 2-process fit (CPU, gloo) where the single-process tests of
``test_signals.py`` cannot tell: a SIGTERM in the middle of a validation, and SLURM's requeue signal
on a process other than the first. Every process stops after the same batch (``stopping`` shares the
signal at the end of each training batch and each batch of a fit's validation); the resumed run ends
as the uninterrupted one, and the job is requeued once, by the first process, whichever got the signal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import LAUNCHED, run_at_once
from quickstart_tiny import TINY
from signal_at import signal_args
from test_signals import DDP, STEPS, _same_last_checkpoint, _step, _torchrun_fit
from test_srun_commands import SLURM, job_id_of_a_free_port


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quickstart") / "data"  # written by the first fit


def test_sigterm_to_one_rank_during_validation_stops_both_and_resumes_to_the_uninterrupted_result(
    tmp_path, data
):
    """2 steps an epoch, 2 validation batches a rank; SIGTERM reaches rank 1 alone in the first batch of
    the validation after step 2. Both ranks stop after that batch (exit 1), last.ckpt holds step 2 and
    the resumed run validates again and ends with the uninterrupted weights. Before, rank 1 left the
    validation alone (Lightning's check after each batch), and rank 0 waited in the validation's
    gather for a rank that had gone: the job failed with no line naming a checkpoint."""
    whole = _torchrun_fit(tmp_path / "whole", data)
    assert whole.returncode == 0, whole.stdout[-4000:]

    stopped = _torchrun_fit(
        tmp_path / "run", data, *signal_args(step=2, validation_batch=0, in_fit=True, rank=1)
    )
    assert stopped.returncode != 0, stopped.stdout[-4000:]
    out = stopped.stdout
    assert (
        "samflow: error: fit stopped by SIGTERM at step 2; runs/quickstart/version_0/checkpoints/last.ckpt "
        "(step 2) is its last checkpoint; continue with the same command and --resume runs/quickstart/version_0.\n"
    ) in out, out[-4000:]
    assert out.count("samflow: error: fit stopped by SIGTERM") == 2, out[-4000:]  # both ranks stopped
    run = tmp_path / "run" / "runs" / "quickstart" / "version_0"
    assert _step(run / "checkpoints" / "last.ckpt") == 2

    resumed = _torchrun_fit(tmp_path / "run", data, "--resume", str(run))
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    _same_last_checkpoint(run, tmp_path / "whole/runs/quickstart/version_0", step=4)


def test_sigterm_to_one_rank_in_the_sanity_check_stops_both_with_nothing_to_resume(tmp_path, data):
    """SIGTERM reaches rank 1 alone in the first batch of the sanity check (2 batches): both ranks stop
    after that batch, exit 1, rank 0 with the line saying that nothing can be resumed, and no run folder
    is left. Before, Lightning's handler (samflow's took its place only at ``on_train_start``) ran a
    ``dist.broadcast`` on rank 1 alone, and both ranks waited for each other for good (killed here after
    240 s; the workers outlived torchrun)."""
    stopped = _torchrun_fit(
        tmp_path,
        data,
        "--trainer.num_sanity_val_steps",
        "2",
        *signal_args(validation_batch=0, rank=1),
    )
    out = stopped.stdout
    assert stopped.returncode != 0, out[-4000:]
    assert (
        "samflow: error: fit stopped by SIGTERM at step 0; no checkpoint was written yet; start the run again.\n"
    ) in out, out[-4000:]
    assert out.count("samflow: error: fit stopped by SIGTERM") == 2, out[-4000:]  # both ranks stopped
    assert list((tmp_path / "runs" / "quickstart").iterdir()) == []


def test_the_requeue_signal_on_task_1_alone_requeues_the_job_once(tmp_path, data):
    """``srun --ntasks-per-node 2`` (Lightning's ``SLURMEnvironment``, which ``SlurmRequeue`` acts in;
    under torchrun Lightning takes torchrun's environment): SIGUSR1 reaches task 1 alone after step 3.
    Both tasks stop after that batch, and task 0 runs ``scontrol requeue <job>`` once. Before, task 0
    stopped for task 1's signal as for a SIGTERM and did not requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in (*LAUNCHED, *SLURM, "SAMFLOW_DEBUG")}
    base.update(WANDB_MODE="disabled", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    base["PATH"] = f"{bin_dir}{os.pathsep}{base['PATH']}"
    base["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), base.get("PYTHONPATH", "")])
    job = job_id_of_a_free_port()
    base.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_NODEID="0")
    base.update(SLURM_NODELIST="127.0.0.1", SLURM_JOB_ID=job, SLURM_JOB_NAME="samflow")
    envs = [{**base, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)} for task in range(2)]
    args = [*TINY, "--data.init_args.quickstart.root", str(data), *STEPS, *DDP]
    command = [sys.executable, "-m", "samflow", "fit", *args, *signal_args(step=3, signum="SIGUSR1", rank=1)]
    results = run_at_once([command] * 2, tmp_path, envs, timeout=300)

    out = "".join(r.stdout for r in results)
    assert [r.returncode for r in results] == [1, 1], out[-4000:]
    assert calls.read_text() == f"requeue {job}\n", out[-4000:]  # was: not called
    assert (
        "samflow: error: fit stopped by SLURM's requeue signal at step 3; "
        "runs/quickstart/version_0/checkpoints/last.ckpt (step 3) holds it. "
        f"SLURM job {job} requeued: it continues this run when it starts again.\n"
    ) in results[0].stdout, results[0].stdout[-4000:]
    assert _step(tmp_path / "runs/quickstart/version_0/checkpoints/last.ckpt") == 3
