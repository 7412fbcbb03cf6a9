"""A fit killed with SIGKILL mid-epoch and resumed ends exactly as the uninterrupted fit.

The kill is real: ``python -m samflow fit`` runs in a subprocess, ``last.ckpt`` is written after every
step (``--last.every_n_train_steps 1``), and the process is killed once the checkpoint is in the
second epoch. The resumed run continues the same run folder and W&B id; its final validation metrics
and trained weights equal the uninterrupted run's bit for bit (CPU, deterministic). The pieces (the
loader's resumed order and per-sample draws, the generators' states) are checked alone below, each with
the counterfactual that shows the check bites.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_samflow

from samflow.callbacks.resume import capture_rng, restore_rng
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


def _fit(cwd: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = run_samflow(
        ["fit", *ARGS, "--data.init_args.quickstart.root", str(data), *extra], cwd, timeout=900
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


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quickstart") / "data"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> Path:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    _fit(cwd, data)
    return cwd / "runs" / "quickstart" / "version_0"


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
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
    assert batches < killed_at < 2 * batches
    return killed_at


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, data, uninterrupted):
    run = tmp_path / "runs" / "quickstart" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    kill_mid_second_epoch(tmp_path, data, BATCHES)
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]

    resumed = _fit(tmp_path, data, "--resume", str(run))

    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # the same folder, no version_1
    assert json.loads((run / "run.json").read_text())["wandb_id"] == wandb_id
    assert "run folder runs/quickstart/version_0\n" in resumed.stdout
    expected, got = _val_rows(uninterrupted)[-1], _val_rows(run)[-1]
    assert got["epoch"] == expected["epoch"] == "1"
    for key in ("val/iou", "val/dice", "val/mae", "val/loss"):
        assert got[key] == expected[key], key  # the logged strings: bit-identical values
    reference, weights = _weights(uninterrupted / "checkpoints" / "last.ckpt"), _weights(last)
    assert reference.keys() == weights.keys()
    changed = [k for k in reference if not torch.equal(reference[k], weights[k])]
    assert not changed, changed


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
