"""A fit killed with SIGKILL mid-epoch and resumed ends exactly as the uninterrupted fit.

The kill is real: ``python -m samflow fit`` runs in a subprocess, ``last.ckpt`` is written after every
step (``--last.every_n_train_steps 1``), and the process is killed once the checkpoint is in the
second epoch. The resumed run continues the same run folder and W&B id; its final validation metrics
and trained weights equal the uninterrupted run's bit for bit (CPU, deterministic), its ``metrics.csv``
holds every row of the uninterrupted run's (those the killed run logged after its last checkpoint
twice), and it keeps the same checkpoint files and prints the same best checkpoint, also when resumed
from another working directory, by a relative path, or as ``--resume last`` of a copied run folder.
The pieces (the loader's resumed order and per-sample draws, the generators' states, the appending CSV
logger, the best checkpoints' state in a moved folder) are checked alone below, each with the
counterfactual that shows the check bites.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import kill_tree, samflow_here
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from samflow.callbacks.resume import BestCheckpoint, LastCheckpoint, capture_rng, restore_rng
from samflow.callbacks.run_folder import RunCSVLogger
from samflow.data.resumable import ResumableLoader

BATCHES = 4  # per epoch: 16 training images, batch 4
ARGS = [
    "--experiment",
    "quickstart",
    "--trainer.max_epochs",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.quickstart.n_train",
    "16",
    "--data.init_args.quickstart.n_val",
    "4",
    "--last.every_n_train_steps",
    "1",
]


def _fit(
    cwd: Path, data: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    proc = samflow_here(
        ["fit", *ARGS, "--data.init_args.quickstart.root", str(data), *extra], cwd, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _step(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 - not written yet
        return -1


def _val_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("val/iou")]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def _rows(run: Path) -> list[dict[str, str]]:
    """The rows of ``metrics.csv``, each with its filled cells only (a row's keys, whatever the header)."""
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _best_line(proc: subprocess.CompletedProcess) -> str:
    return next(line for line in proc.stdout.splitlines() if line.startswith("  best checkpoint "))


def _same_files_and_rows(run: Path, uninterrupted: Path) -> None:
    """The same checkpoint files, and every row of the uninterrupted run's ``metrics.csv`` with the
    same values; rows logged twice (after the killed run's last checkpoint and again on resume) are
    equal, so the distinct rows are the uninterrupted run's."""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (uninterrupted / "checkpoints").iterdir()
    )
    expected, got = _rows(uninterrupted), _rows(run)
    assert len(got) >= len(expected)
    distinct = {tuple(sorted(row.items())) for row in got}
    assert distinct == {tuple(sorted(row.items())) for row in expected}
    assert len(distinct) == len(expected)  # the uninterrupted run logged each row once


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quickstart") / "data"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    proc = _fit(cwd, data)
    return cwd / "runs" / "quickstart" / "version_0", proc


@pytest.fixture(scope="module")
def killed(tmp_path_factory, data) -> Path:
    """``runs/`` of a fit killed mid-second epoch (started in its parent, by relative paths); each test
    resumes a copy of it."""
    cwd = tmp_path_factory.mktemp("killed")
    kill_mid_second_epoch(cwd, data, BATCHES)
    rows = _rows(cwd / "runs" / "quickstart" / "version_0")
    assert any(
        row.get("val/iou") and row["epoch"] == "0" for row in rows
    )  # the first epoch's rows are on disk
    return cwd / "runs"


def kill_mid_second_epoch(cwd: Path, data: Path, batches: int, *extra: str) -> int:
    """Start the fit in ``cwd`` (a session of its own) and SIGKILL its whole process group, every DDP
    rank included, once ``last.ckpt`` is past step ``batches`` (the first epoch), before the second
    epoch ends; the step it was killed at."""
    last = cwd / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    slow = json.dumps({"class_path": "resume_slow_steps.SlowSteps", "init_args": {"after": batches}})
    args = ["fit", *ARGS, *extra, "--data.init_args.quickstart.root", str(data), "--trainer.callbacks+", slow]
    proc = subprocess.Popen(
        [sys.executable, "-m", "samflow", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    killed_at = -1
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            # in the second epoch, not at its end (steps after `batches` take a second: SlowSteps)
            if last.is_file() and (step := _step(last)) > batches:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = step
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at < 0:
            kill_tree(proc.pid)  # every process under it, whatever its session
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
    assert batches < killed_at < 2 * batches
    return killed_at


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, data, uninterrupted, killed):
    expected_run, expected_proc = uninterrupted
    shutil.copytree(killed, tmp_path / "runs")
    run = tmp_path / "runs" / "quickstart" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]

    resumed = _fit(tmp_path, data, "--resume", str(run), env={"PYTHONWARNINGS": "default"})  # warnings shown

    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # the same folder, no version_1
    assert json.loads((run / "run.json").read_text())["wandb_id"] == wandb_id
    assert "run folder runs/quickstart/version_0\n" in resumed.stdout
    # its own checkpoints are expected in its folder: Lightning's "exists and is not empty" is not shown
    assert "exists and is not empty" not in resumed.stderr, resumed.stderr
    # the header names the checkpoint; Lightning's own restoring lines are not repeated
    assert "checkpoint  runs/quickstart/version_0/checkpoints/last.ckpt" in resumed.stdout
    assert "Restor" not in resumed.stdout + resumed.stderr
    expected, got = _val_rows(expected_run)[-1], _val_rows(run)[-1]
    assert got["epoch"] == expected["epoch"] == "1"
    for key in ("val/iou", "val/dice", "val/mae", "val/loss"):
        assert got[key] == expected[key], key  # the logged strings: bit-identical values
    reference, weights = _weights(expected_run / "checkpoints" / "last.ckpt"), _weights(last)
    assert reference.keys() == weights.keys()
    changed = [k for k in reference if not torch.equal(reference[k], weights[k])]
    assert not changed, changed
    _same_files_and_rows(run, expected_run)
    assert _best_line(resumed) == _best_line(expected_proc)


def test_a_resume_from_another_working_directory_by_a_relative_path(tmp_path, data, uninterrupted, killed):
    """The killed run saved its checkpoint folder as ``runs/quickstart/version_0/checkpoints`` (relative to
    where it ran); resumed from a subfolder as ``../runs/...``, its best checkpoint is still known."""
    expected_run, expected_proc = uninterrupted
    shutil.copytree(killed, tmp_path / "runs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    resumed = _fit(elsewhere, data, "--resume", "../runs/quickstart/version_0")

    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    _same_files_and_rows(run, expected_run)
    best = _best_line(expected_proc).replace(
        " runs/", f" {tmp_path}/runs/"
    )  # shown absolute: outside the cwd
    assert _best_line(resumed) == best
    assert (
        _weights(run / "checkpoints" / "last.ckpt").keys()
        == _weights(expected_run / "checkpoints" / "last.ckpt").keys()
    )


def test_resume_last_continues_the_newest_run_also_in_a_copied_folder(tmp_path, data, uninterrupted, killed):
    """``--resume last`` takes the newest ``version_N``: here ``version_1``, a copy of the killed run, whose
    checkpoints still name ``version_0``'s folder; ``version_0`` (the same run) stays as it was."""
    expected_run, expected_proc = uninterrupted
    shutil.copytree(killed, tmp_path / "runs")
    old = tmp_path / "runs" / "quickstart" / "version_0"
    run = old.with_name("version_1")
    shutil.copytree(old, run)
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}

    resumed = _fit(tmp_path, data, "--resume", "last")

    assert "run folder runs/quickstart/version_1\n" in resumed.stdout
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    _same_files_and_rows(run, expected_run)
    assert _best_line(resumed) == _best_line(expected_proc).replace("version_0", "version_1")
    reference, weights = (
        _weights(expected_run / "checkpoints" / "last.ckpt"),
        _weights(run / "checkpoints" / "last.ckpt"),
    )
    assert all(torch.equal(reference[k], weights[k]) for k in reference)


# ---- the pieces, each with its counterfactual ----


class _Draws(torch.utils.data.Dataset):
    """Each item draws from the global torch, numpy and random generators, as a prompt sampler may."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[int, float, float, float]:
        return index, torch.rand(()).item(), float(np.random.rand()), random.random()


def _epoch(loader: ResumableLoader, epoch: int, stop: int | None = None) -> list:
    loader.sampler.set_epoch(epoch)
    batches = []
    for batch in loader:
        batches.append([tuple(float(v) for v in row) for row in zip(*batch)])
        if stop is not None and len(batches) == stop:
            break
    return batches


def test_the_loader_resumes_mid_epoch_with_the_same_batches_and_draws():
    full = _epoch(ResumableLoader(_Draws(), batch_size=3, seed=7), epoch=1)
    first = ResumableLoader(_Draws(), batch_size=3, seed=7)
    head = _epoch(first, epoch=1, stop=2)
    state = first.state_dict()
    assert state == {"seed": 7, "epoch": 1, "batches": 2}
    torch.manual_seed(123)  # another process: other global states must not matter
    np.random.seed(5)
    resumed = ResumableLoader(_Draws(), batch_size=3, seed=0)
    resumed.load_state_dict(state)
    tail = _epoch(resumed, epoch=1)
    assert head + tail == full
    assert resumed.state_dict()["batches"] == 4
    # counterfactual: without the loader state the resumed epoch starts over with other batches
    fresh = _epoch(ResumableLoader(_Draws(), batch_size=3, seed=7), epoch=1)
    assert fresh[: len(tail)] != tail
    # another epoch, another order and other draws; loading reads no global generator
    assert _epoch(ResumableLoader(_Draws(), batch_size=3, seed=7), epoch=2) != full
    before = torch.get_rng_state()
    _epoch(ResumableLoader(_Draws(), batch_size=3, seed=7), epoch=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_restored_generators_draw_the_same_numbers():
    torch.manual_seed(1)
    state = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    second = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert not torch.equal(first[0], second[0])  # counterfactual: without the restore they differ


def test_the_csv_logger_appends_to_the_run_folders_metrics_under_a_header_of_all_keys(tmp_path):
    first = RunCSVLogger(tmp_path, name="", version="run")
    first.log_metrics({"epoch": 0, "train/loss": 0.5}, step=0)
    first.save()
    with open(tmp_path / "run" / "metrics.csv", "a") as f:
        f.write("0,1,0.2")  # a row cut short by a kill
    resumed = RunCSVLogger(tmp_path, name="", version="run")
    resumed.log_metrics({"epoch": 1, "train/loss": 0.125}, step=2)
    resumed.save()
    resumed.log_metrics({"epoch": 1, "val/iou": 0.75}, step=2)  # a new key: the header grows
    resumed.finalize("success")
    assert _rows(tmp_path / "run") == [
        {"epoch": "0", "step": "0", "train/loss": "0.5"},
        {"epoch": "1", "step": "2", "train/loss": "0.125"},
        {"epoch": "1", "step": "2", "val/iou": "0.75"},
    ]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,step,train/loss,val/iou"
    # counterfactual: Lightning's CSVLogger deletes the earlier rows
    plain = CSVLogger(tmp_path, name="", version="run")
    with pytest.warns(UserWarning, match="will be deleted"):
        plain.log_metrics({"epoch": 2, "train/loss": 1.0}, step=3)
    plain.save()
    assert _rows(tmp_path / "run") == [{"epoch": "2", "step": "3", "train/loss": "1.0"}]


def _best_state(saved: str, scores: dict[str, float]) -> dict:
    state = ModelCheckpoint(monitor="val/iou", mode="max", save_top_k=2).state_dict()
    paths = {f"{saved}/{name}": torch.tensor(score) for name, score in scores.items()}
    best, kth = max(paths, key=paths.__getitem__), min(paths, key=paths.__getitem__)
    state.update(dirpath=saved, best_k_models=paths, best_model_path=best, kth_best_model_path=kth)
    state.update(best_model_score=paths[best], kth_value=paths[kth])
    return state


def test_best_checkpoints_carry_over_into_a_moved_run_folder_where_their_files_are(tmp_path):
    saved = "/elsewhere/runs/quickstart/version_0/checkpoints"  # where the run was when it saved
    state = _best_state(saved, {"a.ckpt": 0.5, "b.ckpt": 0.75})
    here = tmp_path / "checkpoints"
    here.mkdir()
    (here / "a.ckpt").touch()
    (here / "b.ckpt").touch()
    moved = BestCheckpoint(monitor="val/iou", mode="max", save_top_k=2)
    moved.dirpath = str(here)
    moved.load_state_dict(state)
    a, b = str(here / "a.ckpt"), str(here / "b.ckpt")
    assert moved.best_k_models == {a: 0.5, b: 0.75}
    assert (moved.best_model_path, moved.best_model_score) == (b, 0.75)
    assert (moved.kth_best_model_path, moved.kth_value) == (a, 0.5)
    # a best checkpoint whose file is not in the folder is dropped, the best taken from the rest
    (here / "b.ckpt").unlink()
    moved = BestCheckpoint(monitor="val/iou", mode="max", save_top_k=2)
    moved.dirpath = str(here)
    moved.load_state_dict(state)
    assert moved.best_k_models == {a: 0.5}
    assert (moved.best_model_path, moved.best_model_score, moved.kth_best_model_path) == (a, 0.5, a)
    # ModelCheckpoint's own key: checkpoints of either class load into the other
    plain = ModelCheckpoint(monitor="val/iou", mode="max", save_top_k=2)
    assert moved.state_key == plain.state_key
    # counterfactual: Lightning's ModelCheckpoint forgets the scores and keeps the old folder's path
    plain.dirpath = str(here)
    with pytest.warns(UserWarning, match="dirpath has changed"):
        plain.load_state_dict(state)
    assert plain.best_model_score is None and plain.best_k_models == {}
    assert plain.best_model_path == f"{saved}/b.ckpt"


@pytest.mark.parametrize("resuming", [False, True])
def test_only_a_new_run_is_warned_that_its_checkpoint_folder_is_not_empty(tmp_path, resuming):
    """Lightning warns that a checkpoint folder "exists and is not empty"; a resumed run's folder holds
    its own checkpoints, so ``BestCheckpoint`` says nothing then, and still warns a new run."""
    from lightning.pytorch import LightningModule, Trainer

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    callback = BestCheckpoint(dirpath=folder, monitor="val/iou", mode="max")
    # samflow's CLI says so: Lightning sets trainer.ckpt_path only after setup (the resumed fit of
    # test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result shows no warning end to end)
    callback.resuming = resuming
    trainer.ckpt_path = str(folder / "last.ckpt")  # a reused trainer keeps an earlier call's: no resume
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.setup(trainer, LightningModule(), "fit")
    warned = [w for w in caught if "exists and is not empty" in str(w.message)]
    assert len(warned) == (0 if resuming else 1)


def test_a_best_checkpoint_saved_after_the_last_one_is_saved_again_not_beside_it(
    tmp_path, data, uninterrupted, killed
):
    """A run (keeping every epoch's checkpoint, ``--checkpoint.save_top_k -1``) killed after saving epoch
    1's checkpoint but before writing ``last.ckpt`` again: its folder holds the epoch-1 file, which the
    mid-epoch ``last.ckpt`` it resumes from does not know. The resumed run saves that checkpoint again
    under its own name, with the uninterrupted run's weights, and no ``-v1`` copy beside it."""
    expected_run, _ = uninterrupted
    shutil.copytree(killed, tmp_path / "runs")
    run = tmp_path / "runs" / "quickstart" / "version_0"
    iou = float(_val_rows(expected_run)[-1]["val/iou"])
    name = f"epoch=1-step={2 * BATCHES}-val_iou={iou:.4f}.ckpt"
    shutil.copy(expected_run / "checkpoints" / "last.ckpt", run / "checkpoints" / name)  # the left-over file
    before = sorted(p.name for p in (run / "checkpoints").iterdir())

    _fit(tmp_path, data, "--resume", str(run), "--checkpoint.save_top_k", "-1")

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # epoch 0's, epoch 1's, last
    assert len(before) == 3
    reference, weights = (
        _weights(expected_run / "checkpoints" / "last.ckpt"),
        _weights(run / "checkpoints" / name),
    )
    assert all(torch.equal(reference[k], weights[k]) for k in reference)


class _Rows(L.LightningModule):
    """Trains nothing; records each epoch's batches (the sample indices) as a run sees them."""

    def __init__(self, workers: int) -> None:
        super().__init__()
        self.layer, self.workers, self.seen = torch.nn.Linear(1, 1), workers, []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch.flatten().tolist()))
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        data = [torch.tensor([float(i)]) for i in range(8)]
        return ResumableLoader(
            data, batch_size=4, num_workers=self.workers, persistent_workers=self.workers > 0
        )


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_resumed_at_an_epochs_end_trains_the_next_epoch_in_its_own_order(tmp_path, workers):
    """Lightning makes the first epoch's loader iterator before it sets the sampler's epoch; worker
    processes read the sampler when they start, so a run resumed from an epoch's end ``last.ckpt``
    trained that epoch in epoch 0's order with ``num_workers > 0``. The batches equal the
    uninterrupted run's."""

    def fit(epochs: int, folder: str, ckpt: str | None = None) -> list:
        module = _Rows(workers)
        trainer = L.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[LastCheckpoint(0, dirpath=str(tmp_path / folder))],
            default_root_dir=tmp_path,
        )
        trainer.fit(module, ckpt_path=ckpt)
        return module.seen

    uninterrupted = fit(3, "whole")
    resumed = fit(1, "parts") + fit(3, "parts", str(tmp_path / "parts" / "last.ckpt"))
    assert [epoch for epoch, _ in resumed] == [0, 0, 1, 1, 2, 2]
    assert resumed == uninterrupted
    assert uninterrupted[0] != uninterrupted[2]  # each epoch in its own order
