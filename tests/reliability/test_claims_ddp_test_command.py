"""README, "Several GPUs or nodes" and "What a run writes", checked on 2 CPU ranks against one process:

- ``samflow test`` on 2 processes reports the test numbers of one process on the whole set (5 images, an
  odd count: 2 batches on rank 0, 1 on rank 1), in ``metrics.csv`` and ``test_metrics.json``;
- ``limit_test_batches`` counts batches per process: 2 batches of 1 image on each of 2 processes are 4
  images, each process taking the first of its own contiguous part of the set;
- under DDP the sample pictures (``val_epoch000.png``, ``val_best.png``, ``val_worst.png``) show the images
  of the first process's part of the set: pixel for pixel those of one process validating that part.

All five commands run in one Python process (``helpers.run_samflow_commands``: Lightning's ``ddp``
launcher starts rank 1 by running its script again with the command's arguments), so the imports are paid
once for rank 0; a callback records the ids of each batch each process evaluates.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_samflow_commands
from PIL import Image
from test_claims_ddp_counts import RECORDER  # the id-recording callback (validate, test, predict)

from samflow.callbacks.sample_drawing import STRIP

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
ONE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
N_VAL = 5  # the quickstart's test set is its validation set: 3 images on rank 0, 2 on rank 1
SIDE = 128  # the quickstart's img_size: the side of a sample picture's panels


def command(work: Path, name: str, stage: str, *args: str) -> list[str]:
    data = [
        "--data.init_args.quickstart.root", str(work / "data"),
        "--data.init_args.quickstart.n_train", "2",
        "--data.init_args.quickstart.n_val", str(N_VAL),
    ]  # fmt: skip
    callback = f"[{{class_path: recorder.RecordIds, init_args: {{folder: {work / name / 'ids'}}}}}]"
    quiet = ["--trainer.enable_progress_bar", "false", "--run_report.enabled", "false"]
    return [stage, "--experiment", "quickstart", *data, *quiet, "--trainer.callbacks", callback, *args]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The five commands, run once for the module; ``work/<name>`` holds each one's run folder and ids."""
    work = tmp_path_factory.mktemp("ddp_test_command")
    (work / "recorder.py").write_text(RECORDER)
    plan = {
        # claim 1: the whole set, batches of 2, on 2 processes and on one
        "test_two": command(work, "test_two", "test", *DDP, "--data.init_args.eval_batch_size", "2"),
        "test_one": command(work, "test_one", "test", *ONE, "--data.init_args.eval_batch_size", "2"),
        # claim 2: 2 batches of 1 image per process
        "test_limit": command(
            work, "test_limit", "test", *DDP, "--data.init_args.eval_batch_size", "1",
            "--trainer.limit_test_batches", "2",
        ),
        # claim 3: the pictures of 2 processes, and of one process validating rank 0's part (3 images)
        "val_two": command(work, "val_two", "validate", *DDP, "--data.init_args.eval_batch_size", "1"),
        "val_part": command(
            work, "val_part", "validate", *ONE, "--data.init_args.eval_batch_size", "1",
            "--trainer.limit_val_batches", "3",
        ),
    }  # fmt: skip
    run_samflow_commands(work, plan, timeout=500)
    return work


def run_folder(work: Path, name: str) -> Path:
    return work / name / "runs" / "quickstart" / "version_0"


def batches(work: Path, name: str, stage: str, rank: int) -> list[list[str]]:
    path = work / name / "ids" / f"{stage}-{rank}.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def last_metrics(folder: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    for row in csv.DictReader((folder / "metrics.csv").open()):
        values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def test_samflow_test_on_two_processes_equals_one_process(work):
    # each image tested once, by one process: rank 0 its 3 (2 batches), rank 1 its 2 (1 batch)
    assert batches(work, "test_two", "test", 0) == [["val_0000", "val_0001"], ["val_0002"]]
    assert batches(work, "test_two", "test", 1) == [["val_0003", "val_0004"]]
    one_process = [["val_0000", "val_0001"], ["val_0002", "val_0003"], ["val_0004"]]
    assert batches(work, "test_one", "test", 0) == one_process
    two, one = last_metrics(run_folder(work, "test_two")), last_metrics(run_folder(work, "test_one"))
    for key in ("test/iou", "test/dice", "test/mae", "test/loss"):
        assert key in two and key in one, (key, sorted(two), sorted(one))
        assert two[key] == pytest.approx(one[key], abs=1e-6), (key, two[key], one[key])
    # the test table the run folder keeps (test_metrics.json)
    table_two, table_one = (
        json.loads((run_folder(work, name) / "test_metrics.json").read_text())
        for name in ("test_two", "test_one")
    )
    assert set(table_two) == set(table_one) >= {"test/iou", "test/dice", "test/mae"}
    for key, value in table_one.items():
        assert table_two[key] == pytest.approx(value, abs=1e-6), (key, table_two[key], value)


def test_limit_test_batches_counts_batches_per_process(work):
    # 5 images on 2 processes: [0, 1, 2] and [3, 4]; 2 batches each
    assert batches(work, "test_limit", "test", 0) == [["val_0000"], ["val_0001"]]
    assert batches(work, "test_limit", "test", 1) == [["val_0003"], ["val_0004"]]


def picture(work: Path, name: str, file: str) -> np.ndarray:
    return np.asarray(Image.open(run_folder(work, name) / "samples" / file).convert("RGB"))


def test_ddp_sample_pictures_show_the_first_process_part(work):
    # the reference: one process validating exactly rank 0's part of the set
    assert batches(work, "val_part", "validate", 0) == [["val_0000"], ["val_0001"], ["val_0002"]]
    # rank 1 evaluated the rest
    assert batches(work, "val_two", "validate", 1) == [["val_0003"], ["val_0004"]]
    for file in ("val_epoch000.png", "val_best.png", "val_worst.png"):
        two, part = picture(work, "val_two", file), picture(work, "val_part", file)
        # 3 rows: rank 0's 3 images (8 samples and 4 extremes asked)
        assert (part.shape[0] - STRIP) // (STRIP + SIDE) == 3, (file, part.shape)
        assert two.shape == part.shape, (file, two.shape, part.shape)
        # equal (0 pixels differ here); a pixel at the threshold may flip with float rounding (rank 0 runs one
        # torch thread), another image differs almost everywhere
        differing = (two != part).any(-1).mean()
        assert differing < 1e-3, (file, differing)
    pictures = sorted(str(p.relative_to(work / "val_two")) for p in (work / "val_two").rglob("*.png"))
    samples = "runs/quickstart/version_0/samples"
    assert pictures == [f"{samples}/val_best.png", f"{samples}/val_epoch000.png", f"{samples}/val_worst.png"]
