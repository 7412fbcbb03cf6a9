"""CocoMaskAP with COCO's crowd regions and images without ground truth equals pycocotools' COCOeval run
on the annotation and results files."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from samflow.instance import CocoMaskAP

H, W = 60, 80
KEYS = ["ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l"]


def _box(y0, x0, y1, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _rle(m):
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def cocoeval_on_files(tmp_path, images):
    """COCOeval (segm) stats[:6] of the files written from ``images``: per image (gts, dets), gts as
    (mask, category, iscrowd), dets as (mask, score, category)."""
    gt = {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 2}]}
    res = []
    for i, (gts, dets) in enumerate(images, start=1):
        gt["images"].append({"id": i, "height": H, "width": W, "file_name": f"{i}.png"})
        for m, c, crowd in gts:
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": c,
                    "iscrowd": crowd,
                    "segmentation": _rle(m),
                    "area": float(m.sum()),
                    "bbox": [0, 0, 1, 1],
                }
            )
        res += [{"image_id": i, "category_id": c, "score": s, "segmentation": _rle(m)} for m, s, c in dets]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "res.json")), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:6]]


def samflow_ap(images):
    metric = CocoMaskAP()
    for gts, dets in images:
        metric.update(
            [
                (
                    torch.as_tensor(np.stack([d[0] for d in dets])),
                    torch.tensor([d[1] for d in dets]),
                    torch.tensor([d[2] for d in dets]) - 1,  # contiguous classes: category - 1
                )
            ],
            [
                {
                    "masks": torch.as_tensor(
                        np.stack([g[0] for g in gts]) if gts else np.zeros((0, H, W), bool)
                    ),
                    "labels": torch.tensor([g[1] for g in gts], dtype=torch.long) - 1,
                    "iscrowd": torch.tensor([g[2] for g in gts], dtype=torch.long),
                }
            ],
        )
    out = metric.compute()
    return [out[k].item() for k in KEYS]


def test_a_detection_on_a_crowd_region_is_ignored(tmp_path):
    person, crowd = _box(5, 5, 25, 25), _box(30, 40, 58, 78)
    images = [
        (
            [(person, 1, 0), (crowd, 1, 1)],
            # the second detection is inside the crowd: its IoU is 1 (over the detection's area)
            [(person, 0.9, 1), (_box(32, 42, 50, 60), 0.95, 1)],
        )
    ]
    want = cocoeval_on_files(tmp_path, images)
    assert want[0] == pytest.approx(1.0)  # the crowd detection is no false positive
    assert samflow_ap(images) == pytest.approx(want, abs=1e-6)  # float32 results


def crowd_images():
    """Five images: crowds matched, unmatched and of the other class, images without ground truth."""
    a, b, c = _box(2, 2, 20, 30), _box(10, 40, 40, 70), _box(42, 4, 58, 36)
    crowd1, crowd2 = _box(30, 0, 60, 40), _box(0, 50, 30, 80)
    return [
        # a crowd of category 1 matched by a category-1 detection; a category-2 detection on it is wrong
        ([(a, 1, 0), (b, 2, 0), (crowd1, 1, 1)], [(a, 0.9, 1), (b, 0.5, 2), (c, 0.8, 1), (c, 0.85, 2)]),
        # two crowds, of both categories, neither matched; a near miss of a
        ([(a, 1, 0), (crowd1, 1, 1), (crowd2, 2, 1)], [(_box(2, 2, 20, 24), 0.7, 1), (b, 0.6, 1)]),
        # no ground truth: both detections are false positives
        ([], [(a, 0.99, 1), (b, 0.4, 2)]),
        # a crowd only: the detection on it is ignored, the other is wrong
        ([(crowd2, 2, 1)], [(_box(5, 55, 25, 75), 0.97, 2), (a, 0.3, 2)]),
        # a near miss of c, and a detection inside the crowd (of its class): ignored
        ([(c, 1, 0), (crowd2, 1, 1)], [(_box(42, 4, 58, 30), 0.65, 1), (_box(0, 52, 10, 78), 0.2, 1)]),
    ]


def test_several_images_crowds_unmatched_and_images_without_ground_truth(tmp_path):
    images = crowd_images()
    want = cocoeval_on_files(tmp_path, images)
    got = samflow_ap(images)
    assert got == pytest.approx(want, abs=1e-6)
    assert 0.1 < want[0] < 0.9  # a non-trivial case
    without_crowds = [([g for g in gts if not g[2]], dets) for gts, dets in images]
    assert samflow_ap(without_crowds) != pytest.approx(want[0])  # the crowds mattered


def test_no_detections_score_zero_and_no_ground_truth_minus_one():
    """A model that detects nothing scores AP 0 where there is ground truth (COCOeval's answer; pycocotools'
    loadRes cannot read an empty results file, so no file comparison), and -1, COCO's "no ground
    truth", only where there is none (here: no medium or large objects)."""
    none = (torch.zeros(0, H, W, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    metric = CocoMaskAP()
    gt = torch.as_tensor(_box(2, 2, 12, 12))[None]  # 100 px: a small object
    metric.update([none], [{"masks": gt, "labels": torch.tensor([0])}])
    values = {k: float(v) for k, v in metric.compute().items()}
    assert values == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "ap_s": 0.0, "ap_m": -1.0, "ap_l": -1.0}
    empty = CocoMaskAP()
    empty.update([none], [{"masks": torch.zeros(0, H, W, dtype=torch.bool), "labels": torch.zeros(0).long()}])
    assert {float(v) for v in empty.compute().values()} == {-1.0}
