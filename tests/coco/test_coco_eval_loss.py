"""The evaluation loss with several prompt rows per image (COCO instances) is the mean over rows, so it
does not depend on which images share a batch (nor, by the same sums, on the split over DDP ranks)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import wandb

pytest.importorskip("pycocotools")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sapnet_e2e"))

from overlap_coco import make_overlap_coco

from samflow.cli import main


def validate(tmp_path: Path, annotations: Path, batch_size: int) -> dict[str, float]:
    experiment = tmp_path / "coco.yaml"
    experiment.write_text(
        "seed_everything: 0\n"
        "model: {sam: {variant: tiny}, plugins: {decoder: {class_path: DecoderTuning}},"
        " losses: {dice: 1.0, bce: 1.0}, metrics: [iou, dice]}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n"
        f"  init_args: {{img_size: 128, val: {{annotations: {annotations}}}, batch_size: {batch_size}}}\n"
        "trainer: {accelerator: cpu, enable_progress_bar: false}\n"
    )
    argv = sys.argv
    try:
        assert main(["validate", "--experiment", str(experiment), "--quiet"]) == 0
    finally:
        sys.argv = argv
        wandb.finish()
    run = max((tmp_path / "runs" / "coco").glob("version_*"))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return {key: float(value) for key, value in rows[-1].items() if key.startswith("val/") and value}


def test_val_loss_is_the_mean_over_rows_whatever_the_batches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    annotations = make_overlap_coco(tmp_path / "coco", n_images=5)  # 2-3 instances (rows) per image
    one = validate(tmp_path, annotations, batch_size=1)
    four = validate(tmp_path, annotations, batch_size=4)  # batches of 4 and 1 images
    assert one.keys() == four.keys() and "val/loss" in one
    for key in one:
        assert four[key] == pytest.approx(one[key], rel=1e-6), key
