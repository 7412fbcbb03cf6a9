"""A fit stopped by a signal: a scheduler's SIGTERM (``scancel``, a time limit) and a user's Ctrl-C.

The run sends itself the signal at the end of a known training step (``signal_at.SignalAt``), in this
process through ``samflow.cli.main`` as the command runs it. A SIGTERM stops the fit after that batch
with ``last.ckpt`` holding it, one ``samflow: error:`` line naming the checkpoint and how to continue,
and exit status 1 (Lightning's ``SIGTERMException`` made it 0); resumed, the fit ends with the
uninterrupted run's weights and metrics. A Ctrl-C stops it where it lands, exit status 1, with a line
naming the last complete checkpoint, and the process's SIGINT handler is given back. SLURM's requeue
signal stops the fit as a SIGTERM does and requeues the job, whose restart continues the run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TORCHRUN, TORCHRUN_ENV, run_reaped
from quickstart_tiny import TINY, samflow
from signal_at import signal_args

STEPS = [  # 3 steps an epoch (batch 1), 2 epochs, last.ckpt only at epoch ends, 3 validation batches
    "--trainer.max_epochs",
    "2",
    "--trainer.limit_val_batches",
    "3",
    "--trainer.limit_train_batches",
    "3",
    "--data.init_args.batch_size",
    "1",
    "--last.every_n_train_steps",
    "0",
]


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


def _last_val_row(run: Path) -> dict[str, str]:
    with open(run / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("val/iou")][-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quickstart") / "data"


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data) -> Path:
    """The uninterrupted run's folder."""
    cwd = tmp_path_factory.mktemp("whole")
    mp = pytest.MonkeyPatch()
    mp.chdir(cwd)
    try:
        assert samflow("fit", *STEPS, data=data) == 0
    finally:
        mp.undo()
    return cwd / "runs" / "quickstart" / "version_0"


@pytest.fixture
def sigint_restored():
    """Python's Ctrl-C handler for the test (a shell starting pytest in the background ignores SIGINT),
    the one found put back after it."""
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield signal.default_int_handler
    signal.signal(signal.SIGINT, found)


def _ends_as(run: Path, whole: Path) -> None:
    """``run`` ended with the uninterrupted run's last validation numbers and weights, bit for bit."""
    expected, got = _last_val_row(whole), _last_val_row(run)
    assert got["epoch"] == expected["epoch"] == "1"
    assert all(got[k] == expected[k] for k in ("val/iou", "val/dice", "val/loss")), (got, expected)
    _same_last_checkpoint(run, whole, step=6)


def _same_last_checkpoint(run: Path, whole: Path, step: int) -> None:
    """``run``'s ``last.ckpt`` is at ``step`` and holds the weights of ``whole``'s (the uninterrupted
    run's), bit for bit."""
    reference = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert got["global_step"] == reference["global_step"] == step
    changed = [k for k, v in reference["state_dict"].items() if not torch.equal(v, got["state_dict"][k])]
    assert not changed, changed


def test_sigterm_mid_epoch_saves_the_batch_exits_1_and_resumes_to_the_uninterrupted_result(
    tmp_path, data, whole, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert samflow("fit", *STEPS, *signal_args(step=4, signum="SIGTERM"), data=data) == 1  # was 0
    err = capsys.readouterr().err
    run = Path("runs/quickstart/version_0")
    assert (
        "samflow: error: fit stopped by SIGTERM at step 4; runs/quickstart/version_0/checkpoints/last.ckpt "
        "(step 4) is its last checkpoint; continue with the same command and --resume runs/quickstart/version_0.\n"
    ) in err, err
    assert (
        _step(run / "checkpoints" / "last.ckpt") == 4
    )  # the batch the signal came in (was 3: the epoch end)

    assert samflow("fit", *STEPS, "--resume", str(run), data=data) == 0
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    _ends_as(run, whole)


SLURM = {  # one sbatch task as SLURM starts it (Lightning's SLURMEnvironment detects it)
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_NODELIST": "localhost",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def _slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process as a task of SLURM job 4242 in ``tmp_path/job`` (not yet restarted), with a stand-in
    ``scontrol`` on PATH that appends its arguments to the file returned."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    (tmp_path / "job").mkdir()
    monkeypatch.chdir(tmp_path / "job")
    return calls


def test_slurm_requeue_signal_saves_requeues_and_the_restarted_job_continues_the_run(
    tmp_path, data, whole, monkeypatch, capsys
):
    """``#SBATCH --signal=SIGUSR1@90``: the fit stops after the batch with last.ckpt, runs ``scontrol
    requeue <job>`` and exits 1; the job started again (same command, ``SLURM_RESTART_COUNT`` 1) continues
    the same run folder and W&B run and ends as the uninterrupted run. Lightning's own auto-requeue wrote
    ``runs/quickstart/hpc_ckpt_1.ckpt`` from inside the handler, trained on (exit 0), and its restart
    loaded that file into a new ``version_1``."""
    calls = _slurm_job(tmp_path, monkeypatch)
    command = ["fit", *STEPS, *signal_args(step=4, signum="SIGUSR1")]  # the job script's command, run twice
    capsys.readouterr()

    assert samflow(*command, data=data) == 1
    err = capsys.readouterr().err
    run = tmp_path / "job" / "runs" / "quickstart" / "version_0"
    assert (
        "samflow: error: fit stopped by SLURM's requeue signal at step 4; "
        "runs/quickstart/version_0/checkpoints/last.ckpt (step 4) holds it. "
        "SLURM job 4242 requeued: it continues this run when it starts again.\n"
    ) in err, err
    assert calls.read_text() == "requeue 4242\n"
    assert _step(run / "checkpoints" / "last.ckpt") == 4
    assert not list((tmp_path / "job").rglob("hpc_ckpt*"))
    info = json.loads((run / "run.json").read_text())
    assert info["slurm_job"] == "4242"

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert samflow(*command, data=data) == 0
    assert "checkpoint  runs/quickstart/version_0/checkpoints/last.ckpt" in capsys.readouterr().out
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert json.loads((run / "run.json").read_text())["wandb_id"] == info["wandb_id"]
    assert calls.read_text() == "requeue 4242\n"  # not requeued again
    _ends_as(run, whole)


TORCHRUN_TASK = {  # what torchrun sets in the process it starts (one of one)
    "TORCHELASTIC_RUN_ID": "none",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "GROUP_RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def test_under_torchrun_in_a_slurm_job_the_requeue_signal_stops_saves_and_requeues(tmp_path, monkeypatch):
    """``srun torchrun --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m samflow fit ...``:
    Lightning takes torchrun's environment (not ``SLURMEnvironment``), and SIGUSR1, which torchrun passes
    on to every process, stops the fit after the batch with ``last.ckpt`` and requeues the job. Before,
    ``SlurmRequeue`` acted only in ``SLURMEnvironment``: nothing handled the signal, and the process died
    of it (here the test's own handler takes it, and the fit trained on)."""
    import lightning as L
    from helpers import tiny_linear_module
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from signal_at import SignalAt

    from samflow.callbacks.resume import LastCheckpoint, SlurmRequeue

    calls = _slurm_job(tmp_path, monkeypatch)
    for key, value in TORCHRUN_TASK.items():
        monkeypatch.setenv(key, value)
    got: list[int] = []
    found = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))  # not SIG_DFL's death
    try:
        trainer = L.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            callbacks=[SignalAt(2, "SIGUSR1"), SlurmRequeue(), LastCheckpoint(0, dirpath=str(tmp_path))],
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        assert isinstance(trainer._accelerator_connector.cluster_environment, TorchElasticEnvironment)
        with pytest.raises(SIGTERMException):  # was: the fit trained on to its end
            trainer.fit(tiny_linear_module())
    finally:
        signal.signal(signal.SIGUSR1, found)
    assert calls.read_text() == "requeue 4242\n"
    assert _step(tmp_path / "last.ckpt") == 2
    assert got == []


def test_sigterm_during_validation_saves_the_training_before_it_and_the_resumed_fit_validates_again(
    tmp_path, data, whole, monkeypatch, capsys
):
    """SIGTERM in the first of the 3 batches of the validation after step 3 (the first epoch's end):
    Lightning stops after that batch, and last.ckpt holds the 3 steps, marked so that the resumed fit
    runs that validation again from its start (the uninterrupted run's rows of both validations), then
    trains on to the uninterrupted result. Before, the fit stopped with no checkpoint at all ("start
    the run again"): the steps since the last one were lost, and a checkpoint saved at the end of a
    validation batch would have resumed without the validation."""
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    in_validation = signal_args(step=3, validation_batch=0, in_fit=True)
    assert samflow("fit", *STEPS, *in_validation, data=data) == 1
    err = capsys.readouterr().err
    run = Path("runs/quickstart/version_0")
    assert (
        "samflow: error: fit stopped by SIGTERM at step 3; runs/quickstart/version_0/checkpoints/last.ckpt "
        "(step 3) is its last checkpoint; continue with the same command and --resume runs/quickstart/version_0.\n"
    ) in err, err  # was "no checkpoint was written yet; start the run again"
    assert _step(run / "checkpoints" / "last.ckpt") == 3

    assert samflow("fit", *STEPS, "--resume", str(run), data=data) == 0
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    _ends_as(run, whole)
    with open(whole / "metrics.csv") as f, open(run / "metrics.csv") as g:
        keys = ("epoch", "step", "val/iou", "val/dice", "val/loss")
        expected = [[r[k] for k in keys] for r in csv.DictReader(f) if r.get("val/iou")]
        assert [[r[k] for k in keys] for r in csv.DictReader(g) if r.get("val/iou")] == expected


def test_ctrl_c_exits_1_names_the_last_checkpoint_and_gives_the_sigint_handler_back(
    tmp_path, data, monkeypatch, capsys, sigint_restored
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:  # Lightning's sys.exit(1) after a KeyboardInterrupt
        samflow("fit", *STEPS, *signal_args(step=4, signum="SIGINT"), data=data)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert (
        "samflow: fit interrupted (Ctrl-C) at step 4; runs/quickstart/version_0/checkpoints/last.ckpt (step 3) "
        "is its last checkpoint; continue with the same command and --resume runs/quickstart/version_0.\n"
    ) in err, err
    assert _step(tmp_path / "runs/quickstart/version_0/checkpoints/last.ckpt") == 3  # whole, the epoch end's
    assert signal.getsignal(signal.SIGINT) is sigint_restored  # Lightning left SIG_IGN


def _torchrun_fit(cwd: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    """The tiny fit under ``torchrun --nproc_per_node 2`` (CPU, gloo) in ``cwd``, its output captured;
    torchrun and its workers (in sessions of their own) are killed after 240 s (``run_reaped``), so a rank
    left waiting for the other ends the test."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **TORCHRUN_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    args = [*TINY, "--data.init_args.quickstart.root", str(data), *STEPS, *DDP, *extra]
    command = [*TORCHRUN, "-m", "samflow", "fit", *args]
    try:
        return run_reaped(command, cwd, env, 240, stderr=subprocess.STDOUT, start_new_session=True)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the 2-rank fit hung:\n{(hung.stdout or '')[-4000:]}")


DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def test_sigterm_to_one_ddp_rank_stops_every_rank_after_the_batch_and_resumes_to_the_uninterrupted_result(
    tmp_path, data
):
    """2 ranks, 2 of the 4 images each: 2 steps an epoch; SIGTERM reaches rank 1 alone, after step 3 (a
    signal reaches the ranks at different moments also when ``torchrun`` passes one on to every worker).
    Every rank saves that batch and stops, exit 1, and the resumed run ends with the weights of the
    uninterrupted one. Before, the ranks waited for each other for good: Lightning 2.6's handler ran a
    ``dist.broadcast`` on rank 1 alone, inside the handler (``note_sigterm_only``), and without
    ``stopping``'s reduction rank 1 saves alone while rank 0 goes on."""
    whole = _torchrun_fit(tmp_path / "whole", data)
    assert whole.returncode == 0, whole.stdout[-4000:]

    stopped = _torchrun_fit(tmp_path / "run", data, *signal_args(step=3, rank=1))
    assert stopped.returncode != 0, stopped.stdout[-4000:]  # was 0
    out = stopped.stdout
    assert (
        "samflow: error: fit stopped by SIGTERM at step 3; runs/quickstart/version_0/checkpoints/last.ckpt "
        "(step 3) is its last checkpoint; continue with the same command and --resume runs/quickstart/version_0.\n"
    ) in out, out[-4000:]
    assert out.count("samflow: error: fit stopped by SIGTERM") == 2, out[-4000:]  # both ranks stopped
    run = tmp_path / "run" / "runs" / "quickstart" / "version_0"
    assert _step(run / "checkpoints" / "last.ckpt") == 3  # was 2: the epoch end

    resumed = _torchrun_fit(tmp_path / "run", data, "--resume", str(run))
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    _same_last_checkpoint(run, tmp_path / "whole/runs/quickstart/version_0", step=4)


def test_a_validate_stopped_by_sigterm_exits_1_in_one_line(tmp_path, data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--data.init_args.batch_size", "1", "--trainer.limit_val_batches", "3"]
    assert samflow("validate", *args, *signal_args(validation_batch=0), data=data) == 1  # was 0
    assert "samflow: error: validate stopped by SIGTERM.\n" in capsys.readouterr().err


def test_two_fits_of_one_experiment_in_a_requeued_job_each_continue_their_own_run(
    tmp_path, data, whole, monkeypatch, capsys
):
    """A job script of two fits of the quickstart (the second with 3 epochs), the second stopped by the
    requeue signal: started again, each command continues its own run (the first, ended, ends at once;
    the second goes on). Before, both took the newest run of the job: the first fit trained the
    second's run under its own command."""
    calls = _slurm_job(tmp_path, monkeypatch)
    first = ["fit", *STEPS]
    second = ["fit", *STEPS, "--trainer.max_epochs", "3", *signal_args(step=4, signum="SIGUSR1")]
    assert samflow(*first, data=data) == 0
    assert samflow(*second, data=data) == 1
    assert calls.read_text() == "requeue 4242\n"
    runs = tmp_path / "job" / "runs" / "quickstart"
    ended = (runs / "version_0" / "checkpoints" / "last.ckpt").read_bytes()
    capsys.readouterr()

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    status = samflow(*first, data=data)
    out = capsys.readouterr()
    print(out.out[-3000:], out.err[-3000:])
    assert status == 0, out.err[-3000:]
    assert "checkpoint  runs/quickstart/version_0/checkpoints/last.ckpt" in out.out, out.out[-3000:]
    assert (runs / "version_0" / "checkpoints" / "last.ckpt").read_bytes() == ended  # nothing left to train
    assert _step(runs / "version_1" / "checkpoints" / "last.ckpt") == 4  # the second's run untouched
    assert samflow(*second, data=data) == 0
    assert "checkpoint  runs/quickstart/version_1/checkpoints/last.ckpt" in capsys.readouterr().out
    assert _step(runs / "version_1" / "checkpoints" / "last.ckpt") == 9
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
