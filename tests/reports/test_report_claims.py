"""README claims on the run report not covered elsewhere: the before column is the validation of the
whole set before training (``num_sanity_val_steps -1``), and the report is written without matplotlib."""

from __future__ import annotations

import json
import re
import sys

import pytest
from helpers import samflow_here
from test_run_report_sections import make_run, section

from samflow.callbacks.run_report import SECTIONS, RunReport


def test_before_is_the_whole_validation_set_before_training(tmp_path):
    """With a learning rate of 0 nothing changes in training, so the before numbers (the sanity check,
    -1: every batch) equal the after numbers (the validation of the whole set, 3 batches of 2 images)."""
    args = [
        "fit", "--experiment", "quickstart", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
        "--trainer.num_sanity_val_steps", "-1", "--data.init_args.batch_size", "2",
        "--data.init_args.quickstart.root", str(tmp_path / "data"), "--data.init_args.quickstart.n_train", "2",
        "--data.init_args.quickstart.n_val", "6", "--model.optimizer.init_args.lr", "0",
        "--model.plugins.tokens.init_args.lr", "0", "--quiet",
    ]  # fmt: skip
    proc = samflow_here(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart" / "version_0"
    numbers = json.loads((run / "val_before_after.json").read_text())
    assert set(numbers["before"]) == {"val/iou", "val/dice", "val/mae"}
    assert numbers["before"] == pytest.approx(numbers["after"], rel=1e-6, abs=1e-7)
    table = section((run / "report.md").read_text(), "Validation before and after training")
    iou = re.search(r"^\| val/iou \| ([0-9.]+) \| ([0-9.]+) \| (-?[0-9.]+) \|$", table, flags=re.MULTILINE)
    assert iou is not None and iou.group(1) == iou.group(2) == f"{numbers['after']['val/iou']:.4f}"


def test_the_report_is_written_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without samflow[report]
    folder = tmp_path / "version_0"
    paths = RunReport("quickstart").write(folder, make_run(folder))
    markdown = paths["md"].read_text()
    assert re.findall(r"^## (.+)$", markdown, flags=re.MULTILINE) == list(SECTIONS)
    curves = section(markdown, "Curves")
    assert "Curves need matplotlib: `pip install 'samflow[report]'`" in curves
    assert not list((folder / "report").glob("*.png"))
    assert "| val/iou | 0.1000 | 0.6000 | 0.5000 |" in section(
        markdown, "Validation before and after training"
    )
    assert "(samples/val_best.png)" in section(markdown, "Validation images")
    assert paths["html"].is_file()
