"""SAPNet end to end on a tiny generated COCO set of overlapping objects, through the four commands:

samflow proposals -> samflow fit (SAPNet on the stored bags) -> samflow pseudo-masks -> samflow student.

The tiny test SAM has random weights, so after the real `samflow proposals` run (which fixes the store's
key) the bags are replaced by what a trained SAM gives (`overlap_coco.sam_like_bags`: nested parts, the
object, a leak into a neighbour, the whole image). Measured on this set (2 CPU cores, about a minute):
pseudo masks' mean IoU with the annotations 0.686 after 10 epochs (a uniform choice among the bag:
0.56); student mask AP untrained -1 (no detections), trained 0.173 (AP50 0.420) with the MPS masks
(0.155 / 0.416 without); 12 s on an idle 2-core machine (3 min when 5 agents share it).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overlap_coco import make_overlap_coco, sam_like_bags

from samflow.cli import main
from samflow.data.coco import CocoDataModule
from samflow.module import SamSpec
from samflow.student import StudentModule

HEAD = {
    "feat_channels": 32,
    "mask_channels": 16,
    "num_convs": 1,
    "num_grids": [12, 8, 6],
    "scale_ranges": [[0.0, 0.25], [0.2, 0.5], [0.4, 2.0]],
}
KEYS = ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")


def _experiment(tmp_path: Path, annotations: Path) -> Path:
    exp = tmp_path / "sapnet_tiny.yaml"
    exp.write_text(
        f"""seed_everything: 0
model:
  sam: {{variant: tiny}}
  plugins:
    sap: {{class_path: SAPNet, init_args: {{num_classes: 2, hidden: 64, num_negatives: 32}}}}
  losses: {{}}
  metrics: [iou]
  optimizer: {{class_path: torch.optim.Adam, init_args: {{lr: 0.003}}}}
data:
  class_path: samflow.data.coco.CocoDataModule
  init_args:
    img_size: 128
    train: {{annotations: {annotations}}}
    test: {{annotations: {annotations}}}
    proposals: {tmp_path / "store"}
    batch_size: 4
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 10
  enable_progress_bar: false
  callbacks:
    - {{class_path: samflow.callbacks.warmup.LinearWarmup, init_args: {{steps: 4, ratio: 0.1}}}}
"""
    )
    return exp


def _cocoeval(annotations: Path, results: list[dict]) -> list[float]:
    gt = COCO(str(annotations))
    ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(v) for v in ev.stats[:6]]


def _untrained_ap(annotations: Path) -> float:
    """The student before training (scores at the 0.01 prior: all cells let through), same SAM as the run."""
    torch.manual_seed(0)
    data = CocoDataModule(test={"annotations": str(annotations)}, img_size=128, batch_size=4)
    student = StudentModule(2, SamSpec(variant="tiny"), head={**HEAD, "score_thr": 0.0}).eval()
    for batch in data.test_dataloader():
        student._evaluate("test", batch)
    student._finish("test")
    return student.metrics["test"]["ap"]


def test_points_to_pseudo_masks_to_a_student_with_mask_ap(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    annotations = make_overlap_coco(tmp_path / "coco", n_images=8)
    exp = _experiment(tmp_path, annotations)
    store = tmp_path / "store"

    # 1. proposals (the real command: it writes the keyed store), then SAM-like bags under the same key
    assert main(["proposals", "--experiment", str(exp), "--out", str(store)]) == 0
    sam_like_bags(store, annotations)

    # 2. SAPNet trains on the stored bags in a normal fit
    assert main(["fit", "--experiment", str(exp)]) == 0
    ckpt = tmp_path / "runs" / "sapnet_tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    # 3. pseudo masks: the chosen proposal of every point, as COCO instances with the original ids
    pseudo = tmp_path / "pseudo.json"
    capsys.readouterr()
    assert main(["pseudo-masks", "--experiment", str(exp), "--ckpt", str(ckpt), "--out", str(pseudo)]) == 0
    printed = capsys.readouterr().out
    written = json.loads(pseudo.read_text())
    bags = {a["ann_id"]: a for a in json.loads((store / "proposals.json").read_text())["annotations"]}
    truth = json.loads(annotations.read_text())["annotations"]
    assert len(written["annotations"]) == len(truth) == len(bags)
    for ann in written["annotations"]:
        assert ann["segmentation"] == bags[ann["id"]]["segmentation"][ann["proposal_index"]]
        assert len(ann["mps_proposal_index"]) == 3  # MPS: the proposals ranked 2, 4, 6
        assert ann["mps_segmentation"] == [
            bags[ann["id"]]["segmentation"][k] for k in ann["mps_proposal_index"]
        ]
        assert ann["category_id"] == next(t["category_id"] for t in truth if t["id"] == ann["id"])
    assert {a["category_id"] for a in written["annotations"]} == {3, 7}
    COCO(str(pseudo))  # pycocotools reads it as an instances file
    mean_iou = written["info"]["samflow_pseudo_masks"]["mean_iou_with_annotations"]
    assert f"mean IoU with the annotation masks {mean_iou:.4f}" in printed
    print(f"pseudo masks: mean IoU {mean_iou:.4f}")
    assert mean_iou > 0.45

    # 4. the student trains on the pseudo masks and is evaluated without points
    out = tmp_path / "student"
    args = ["student", "--experiment", str(exp), "--pseudo", str(pseudo), "--out", str(out)]
    assert main([*args, "--head", json.dumps(HEAD), "--trainer.max_epochs", "25"]) == 0
    metrics = json.loads((out / "student_metrics.json").read_text())["test"]
    results = json.loads((out / "results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {3, 7}
    stats = _cocoeval(annotations, results)
    for key, value in zip(KEYS, stats, strict=True):  # samflow's AP is pycocotools' on the same results
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    before = _untrained_ap(annotations)
    print(
        f"student mask AP: untrained {before:.4f}, trained {metrics['ap']:.4f} (AP50 {metrics['ap50']:.4f})"
    )
    # untrained: mask probabilities ~0.5 everywhere, none above mask_thr: no detections, which COCOeval
    # reports as AP -1 (undefined); trained on the pseudo masks (+ MPS): measured 0.173 (AP50 0.420)
    assert before <= 0.0
    assert metrics["ap"] > 0.1
    assert (out / "checkpoints" / "last.ckpt").is_file()
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    assert saved and all(k.startswith("head.") for k in saved)  # the head only, not the frozen SAM
