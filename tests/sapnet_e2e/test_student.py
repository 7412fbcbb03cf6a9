"""StudentModule: MPS term worked by hand; prediction without prompts at the original size."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overlap_coco import make_overlap_coco

from samflow.data.coco import CocoDataModule
from samflow.module import SamSpec
from samflow.student import StudentModule

HEAD = {"feat_channels": 16, "mask_channels": 8, "num_convs": 1, "num_grids": [8, 6, 4]}


@pytest.fixture
def batch(tmp_path):
    path = make_overlap_coco(tmp_path / "coco", n_images=2)
    data = json.loads(path.read_text())
    for ann in data["annotations"]:
        ann["mps"] = [ann["segmentation"], ann["segmentation"]]  # two MPS masks equal to the pseudo mask
    extra = tmp_path / "coco" / "mps.json"
    extra.write_text(json.dumps(data))
    dm = CocoDataModule(train={"annotations": str(extra)}, img_size=128, batch_size=2, aux_masks="mps")
    return next(iter(dm.train_dataloader()))


def test_mps_term_by_hand(batch):
    torch.manual_seed(0)
    student = StudentModule(2, SamSpec(variant="tiny"), head=HEAD, mps_weight=0.5)
    base = student.head.loss(student.head(student.embed(batch)), student.targets(batch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        total = student.training_step(batch, 0)
        student.mps_weight = 0.0
        plain = student.training_step(batch, 0)
    # both MPS targets equal the pseudo masks: loss_mps = 0.5 * (2 * loss_mask) / 6
    assert total.item() == pytest.approx((base["loss"] + 0.5 * 2 * base["loss_mask"] / 6).item(), rel=1e-6)
    assert plain.item() == pytest.approx(base["loss"].item(), rel=1e-6)


def test_predictions_are_at_the_original_size_and_read_no_prompt(batch):
    torch.manual_seed(0)
    student = StudentModule(
        2, SamSpec(variant="tiny"), head={**HEAD, "score_thr": 0.0, "mask_thr": 0.0, "filter_thr": 0.0}
    ).eval()
    preds = student.predict_instances(batch)
    again = student.predict_instances(batch.replace(points=None, point_labels=None, box=None, has_box=None))
    for b, (masks, scores, labels) in enumerate(preds):
        assert masks.shape[1:] == tuple(batch.original_size[b].tolist())
        assert masks.shape[0] == scores.shape[0] == labels.shape[0] > 0
        assert torch.equal(masks, again[b][0]) and torch.equal(scores, again[b][1])
    assert len(student.category_ids) == 2


def _student_experiment(tmp_path: Path) -> tuple[Path, Path]:
    annotations = make_overlap_coco(tmp_path / "coco", n_images=4)
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "model:\n  sam: {variant: tiny}\n  plugins:\n    sap: {class_path: SAPNet, init_args: {num_classes: 2}}\n"
        "  losses: {}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n  init_args:\n    img_size: 128\n"
        f"    train: {{annotations: {annotations}}}\n    batch_size: 2\n"
        "trainer: {accelerator: cpu, devices: 1, max_epochs: 2}\n"
    )
    return exp, annotations


def test_student_honours_every_trainer_key_and_refuses_what_it_cannot(tmp_path, capsys, monkeypatch):
    from samflow.cli import main

    monkeypatch.setattr(sys, "argv", ["samflow"])
    monkeypatch.chdir(tmp_path)
    exp, pseudo = _student_experiment(tmp_path)
    head = json.dumps(HEAD)
    base = ["student", "--experiment", str(exp), "--pseudo", str(pseudo), "--head", head]
    # two batches an epoch, two epochs; overfit_batches 1 trains on one batch an epoch
    assert main([*base, "--out", "s", "--trainer.overfit_batches", "1"]) == 0
    ckpt = torch.load(tmp_path / "s" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    capsys.readouterr()
    assert main([*base, "--out", "t", "--trainer.enable_checkpointing", "false"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "trainer.enable_checkpointing False is not supported (the student always writes" in err
    assert "honours every other trainer.* key" in err
    # an experiment written for samflow fit: its run folder is said to be unused, checkpointing on is fine
    assert (
        main(
            [
                *base,
                "--out",
                "u",
                "--trainer.overfit_batches",
                "1",
                "--trainer.max_epochs",
                "1",
                "--trainer.default_root_dir",
                "elsewhere",
                "--trainer.enable_checkpointing",
                "true",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert (
        "samflow: warning: trainer.default_root_dir elsewhere is not used (the student writes to --out)."
        in err
    )
    assert (tmp_path / "u" / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "elsewhere").exists()
    assert main([*base, "--out", "t", "--model.sam.embedding_store", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "model.sam.embedding_store is not read by the student" in err
    assert "--model.sam.embedding_store null" in err
    assert not (tmp_path / "t").exists()
