"""COCO images without instances (``empty: keep``) give batches without prompt rows: training skips
them, evaluation counts their images and scores nothing, prediction returns nothing, and the sample
pictures show each row against its own instance."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb

pytest.importorskip("pycocotools")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_coco import make_tiny_coco

from samflow.callbacks.samples import batch_rows, row_ious
from samflow.cli import main
from samflow.data.coco import CocoDataModule
from samflow.data.coco_batch import collate_coco
from samflow.module import SamflowModule, SamSpec
from samflow_plugins.decoder_tuning import DecoderTuning


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The tiny COCO set: 4 images, the 4th without instances."""
    return make_tiny_coco(tmp_path_factory.mktemp("coco"))[0]


def run(
    tmp_path: Path, command: str, annotations: Path, empty: str, monkeypatch, train: Path | None = None
) -> tuple[dict[str, float], Path]:
    """``samflow <command>`` of a tiny decoder-tuning experiment at batch 1 (validation on
    ``annotations``, training on ``train``, default the same); its last validation numbers and run folder."""
    folder = tmp_path / f"{command}_{empty}"
    folder.mkdir()
    val = f"{{annotations: {annotations}}}"
    fit = f"{{annotations: {train or annotations}}}"
    experiment = folder / "coco.yaml"
    experiment.write_text(
        "seed_everything: 0\n"
        "model: {sam: {variant: tiny}, plugins: {decoder: {class_path: DecoderTuning}},"
        " losses: {dice: 1.0, bce: 1.0}, metrics: [iou, dice]}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n"
        f"  init_args: {{img_size: 128, train: {fit}, val: {val}, batch_size: 1, empty: {empty}}}\n"
        "trainer: {accelerator: cpu, enable_progress_bar: false, max_epochs: 1, num_sanity_val_steps: -1}\n"
    )
    monkeypatch.chdir(folder)  # the run folder is ./runs/coco/version_0
    argv = sys.argv
    try:
        assert main([command, "--experiment", str(experiment), "--quiet"]) == 0
    finally:
        sys.argv = argv
        wandb.finish()
    version = max((folder / "runs").glob("*/version_*"))
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    values = {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}
    return values, version


def test_validation_with_an_image_without_instances_equals_one_without_it(tmp_path, monkeypatch, coco):
    keep, _ = run(tmp_path, "validate", coco, "keep", monkeypatch)  # the empty image: a batch of no rows
    skip, _ = run(tmp_path, "validate", coco, "skip", monkeypatch)
    assert keep.keys() == skip.keys() >= {"val/iou", "val/dice", "val/loss"}
    for key in skip:
        assert keep[key] == pytest.approx(skip[key], abs=1e-7), key


def test_training_batches_without_rows_teach_nothing(tmp_path, monkeypatch, coco):
    """A fit whose only training image has no instances runs its epoch and leaves the weights as they
    were: the validation after it equals the one before (both on the whole set)."""
    data = json.loads(coco.read_text())
    empty = [
        image
        for image in data["images"]
        if not any(a["image_id"] == image["id"] for a in data["annotations"])
    ]
    assert len(empty) == 1
    train = coco.with_name("empty_only.json")
    train.write_text(json.dumps({**data, "images": empty, "annotations": []}))
    _, version = run(tmp_path, "fit", coco, "keep", monkeypatch, train=train)
    numbers = json.loads((version / "val_before_after.json").read_text())
    assert numbers["before"].keys() >= {"val/iou", "val/dice"}
    assert numbers["after"] == numbers["before"]
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"decoder": DecoderTuning()})
    dm = CocoDataModule(train={"annotations": str(coco)}, img_size=128, batch_size=1, empty="keep")
    dm.setup("fit")
    batch = collate_coco([dm.datasets["train"][3]])
    assert batch.num_images == 1 and batch.num_rows == 0
    assert module.training_step(batch, 0) is None  # one process: Lightning skips the step
    # under DDP the process takes part in the gradient reduction with zero gradients
    module._trainer = SimpleNamespace(world_size=2)  # type: ignore[assignment]
    loss = module.training_step(batch, 0)
    assert loss is not None and loss.item() == 0.0
    loss.backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and not p.grad.any() for p in trainable)
    assert module.predict_step(batch, 0) == {"id": [], "masks": [], "probs": []}


def test_sample_rows_show_each_row_against_its_own_instance(coco):
    dm = CocoDataModule(val={"annotations": str(coco)}, img_size=128, batch_size=1)
    dm.setup("validate")
    batch = collate_coco([dm.datasets["val"][0]])  # one image, several instances
    assert batch.num_rows >= 2
    module = SamflowModule(sam=SamSpec(variant="tiny")).eval()
    with torch.no_grad():
        out, ctx = module(batch)
    # a prediction that is each row's own instance exactly
    outputs = {"out": out, "ctx": ctx, "probs": batch.instance_mask.clone(), "model": module.model}
    rows = batch_rows(batch, outputs, 0.5)
    assert [r.iou for r in rows] == [1.0] * batch.num_rows == row_ious(batch, outputs, 0.5)
    for n, row in enumerate(rows):
        assert torch.equal(row.target, batch.instance_mask[n])
