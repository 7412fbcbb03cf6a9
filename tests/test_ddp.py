"""Two CPU processes through Lightning's DDP: both ranks run and metrics are reduced exactly."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import run_samflow_commands
from test_cli import run

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def last_metrics(version: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    for row in csv.DictReader((version / "metrics.csv").open()):
        values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp")


def test_fit_runs_on_two_ranks(ddp_dir):
    data = str(ddp_dir / "data")
    proc = run(
        [
            "fit", "--experiment", "quickstart", *DDP, "--data.init_args.quickstart.root", data,
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", "--data.init_args.batch_size", "4",
        ],
        ddp_dir,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert list((ddp_dir / "runs" / "quickstart" / "version_0" / "checkpoints").glob("*.ckpt"))


def test_validation_metrics_are_synchronised_across_ranks(ddp_dir):
    """Each rank sees half of the 40 validation images; the reduced metrics and loss equal one process on
    all (odd set sizes: tests/reliability/test_ddp_exact_metrics.py)."""
    data = str(ddp_dir / "data")
    common = ["validate", "--experiment", "quickstart", "--data.init_args.quickstart.root", data]
    # both in one Python process (the imports paid once)
    run_samflow_commands(ddp_dir, {"two": [*common, *DDP], "one": [*common, "--trainer.devices", "1"]})
    two = last_metrics(ddp_dir / "two" / "runs" / "quickstart" / "version_0")
    one = last_metrics(ddp_dir / "one" / "runs" / "quickstart" / "version_0")
    for key in ("val/iou", "val/dice", "val/mae", "val/loss"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
