"""SLURM's requeue signal (``#SBATCH --signal=SIGUSR1@90``) reaching a command other than ``fit``, and the
``hpc_ckpt_N.ckpt`` that Lightning's own auto-requeue left behind.

``SlurmRequeue`` turned Lightning's auto-requeue off for ``fit`` only: a ``samflow validate`` (``test``,
``predict``) that got the signal wrote ``runs/<experiment>/hpc_ckpt_1.ckpt`` from inside Lightning's
handler, ran ``scontrol requeue <job>`` and finished with status 0; afterwards every new ``samflow fit``
of the experiment in a SLURM job loaded that file by Lightning's automatic HPC resume, and was refused as
"trained with other settings". Now these commands hold the signal and go on as without it (one line on
process 0, no checkpoint, no requeue), and no samflow command loads an ``hpc_ckpt`` file: a new fit
starts a new run and says the file is ignored. The signal is sent in this process (``signal_at.SignalAt``;
in a SLURM job samflow holds it, the old code's Lightning handler took it), SLURM faked as in
``test_signals.py``.
"""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
import torch
from quickstart_tiny import samflow
from signal_at import signal_args
from test_signals import _slurm_job

NOT_REQUEUED = (
    "samflow: SLURM's requeue signal: `samflow {command}` is not requeued (only fit, student, embed, "
    "proposals and sweep are); it goes on until it ends or the job's time limit.\n"
)
VALIDATE = ["--trainer.limit_val_batches", "3", "--data.init_args.eval_batch_size", "1"]  # 3 batches


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quickstart") / "data"  # written by the first command


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_validate_getting_the_requeue_signal_goes_on_to_its_result_without_hpc_ckpt_or_requeue(
    tmp_path, data, monkeypatch, capsys
):
    """USR1 in the first of 3 validation batches of ``samflow validate`` (no checkpoint) in a SLURM job:
    exit 0 with the metrics of the same validate without the signal, one line saying it is not requeued,
    no ``hpc_ckpt_*`` anywhere, ``scontrol`` never run. Before, Lightning wrote
    ``runs/quickstart/hpc_ckpt_1.ckpt`` from its handler and requeued the job."""
    calls = _slurm_job(tmp_path, monkeypatch)
    before = signal.getsignal(signal.SIGUSR1)
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    assert samflow("validate", *VALIDATE, data=data) == 0  # the same command without the signal
    expected = _metrics(plain / "runs" / "quickstart" / "version_0")
    monkeypatch.chdir(tmp_path / "job")
    capsys.readouterr()

    assert samflow("validate", *VALIDATE, *signal_args(signum="SIGUSR1", validation_batch=0), data=data) == 0
    err = capsys.readouterr().err
    assert not list(tmp_path.rglob("hpc_ckpt*"))  # was runs/quickstart/hpc_ckpt_1.ckpt
    assert not calls.exists()  # was "requeue 4242"
    got = _metrics(tmp_path / "job" / "runs" / "quickstart" / "version_0")
    assert got == expected
    assert {"val/iou", "val/dice", "val/loss"} <= {k for row in got for k, v in row.items() if v}
    assert err.count("SLURM's requeue signal") == 1, err
    assert NOT_REQUEUED.format(command="validate") in err, err
    assert signal.getsignal(signal.SIGUSR1) == before  # the process's handler put back


def test_the_requeue_signal_while_a_test_starts_is_held_and_the_test_goes_on(
    tmp_path, data, monkeypatch, capsys
):
    """USR1 in the trainer's setup of ``samflow test`` (before any handler of the trainer's): held by the
    command (``requeue_signal_held``), one line, exit 0 with the test's metrics, not delivered at the end.
    Before, nothing held it for a command other than ``fit``: its default action killed the process (here
    a stand-in handler, which must never be called, keeps this test's process alive)."""
    calls = _slurm_job(tmp_path, monkeypatch)
    delivered: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: delivered.append(signum))
    try:
        capsys.readouterr()
        assert samflow("test", *signal_args(signum="SIGUSR1", at_setup=True), data=data) == 0
        err = capsys.readouterr().err
        assert delivered == []  # was [SIGUSR1]: the process's own handler (the default action: killed)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert err.count("SLURM's requeue signal") == 1, err
    assert NOT_REQUEUED.format(command="test") in err, err
    rows = _metrics(tmp_path / "job" / "runs" / "quickstart" / "version_0")
    assert {"test/iou", "test/dice"} <= {k for row in rows for k, v in row.items() if v}
    assert not list(tmp_path.rglob("hpc_ckpt*"))
    assert not calls.exists()


def test_a_new_fit_ignores_a_stray_hpc_ckpt_and_trains_a_new_run_as_without_it(
    tmp_path, data, monkeypatch, capsys
):
    """``runs/quickstart/hpc_ckpt_1.ckpt`` as a validate of the old code left it (a checkpoint without the
    fit's settings): a new fit in a SLURM job trains ``version_0`` from the start to the weights and
    metrics of the same fit without the file, with one warning naming it. Before, Lightning's automatic
    HPC resume loaded it and the fit was refused ("trained with other settings", exit 1)."""
    whole = tmp_path / "whole"
    whole.mkdir()
    monkeypatch.chdir(whole)
    assert samflow("fit", data=data) == 0  # the reference, outside SLURM
    reference = whole / "runs" / "quickstart" / "version_0"

    _slurm_job(tmp_path, monkeypatch)
    runs = tmp_path / "job" / "runs" / "quickstart"
    runs.mkdir(parents=True)
    stray = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    stray["callbacks"]["SameExperiment"] = {"settings": {}}  # what a validate's checkpoint holds
    torch.save(stray, runs / "hpc_ckpt_1.ckpt")
    capsys.readouterr()

    code, err = samflow("fit", data=data), capsys.readouterr().err
    assert code == 0, err  # was 1: "the resumed run was trained with other settings"
    assert err.count("hpc_ckpt") == 1, err
    assert (
        "samflow: warning: runs/quickstart/hpc_ckpt_1.ckpt is ignored: Lightning's auto-requeue checkpoint"
    ) in err
    assert "It can be deleted." in err
    assert sorted(p.name for p in runs.iterdir()) == ["hpc_ckpt_1.ckpt", "version_0"]
    assert _metrics(runs / "version_0") == _metrics(reference)
    want = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert got["global_step"] == want["global_step"] == 1
    assert not [k for k, v in want["state_dict"].items() if not torch.equal(v, got["state_dict"][k])]


def test_a_held_requeue_signal_of_a_command_without_a_trainer_is_reported_not_delivered(
    tmp_path, monkeypatch, capsys
):
    """``samflow predict --prompts`` and ``predict-slide`` run no trainer: the command's hold is all that
    keeps SLURM's requeue signal from killing them. It is noted, one line at the end, and not delivered
    when the hold ends (a fit's hold delivers one no fit took: the process ends as without the hold)."""
    from samflow.requeue_hold import requeue_signal_held

    _slurm_job(tmp_path, monkeypatch)
    delivered: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: delivered.append(signum))  # not killed
    try:
        for command in ("predict", "predict-slide"):
            capsys.readouterr()
            with requeue_signal_held(command):
                os.kill(os.getpid(), signal.SIGUSR1)
                os.kill(os.getpid(), signal.SIGUSR1)
            assert delivered == []  # the handler of before never got it
            assert capsys.readouterr().err == NOT_REQUEUED.format(command=command)
        with requeue_signal_held("fit"):
            os.kill(os.getpid(), signal.SIGUSR1)
        assert delivered == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_validate_outside_the_main_thread_gives_the_trainer_its_auto_requeue_back(monkeypatch):
    """``SlurmRequeue`` turns Lightning's auto-requeue off for a validate in a SLURM job and puts it back
    at the stage's end, so that the same ``Trainer`` fits afterwards with its environment as it was. Run
    outside the main thread (a notebook's worker, a server), the callback holds no signal (handlers belong
    to the main thread), and it left the environment with auto-requeue off."""
    import threading

    from lightning import LightningModule, Trainer
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from samflow.callbacks.resume import SlurmRequeue

    class Validated(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.layer(batch[0]).mean())

        def val_dataloader(self):
            return torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2
            )

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    environment = SLURMEnvironment(auto_requeue=True)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        plugins=[environment],
        callbacks=[SlurmRequeue()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    seen: dict[str, object] = {}

    def validate() -> None:
        try:
            trainer.validate(Validated(), verbose=False)
        except BaseException as err:  # seen by the assertion below
            seen["error"] = err

    worker = threading.Thread(target=validate)
    worker.start()
    worker.join(120)
    assert not worker.is_alive() and "error" not in seen, seen
    assert trainer._accelerator_connector.cluster_environment is environment
    assert environment.auto_requeue  # was left False
