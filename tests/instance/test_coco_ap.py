import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from samflow.instance import CocoMaskAP


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    h, w = 120, 160
    images = []
    for _ in range(4):
        gts, preds = [], []
        for _ in range(int(rng.integers(2, 5))):  # overlapping discs of sizes small/medium/large
            cy, cx = rng.integers(20, 100), rng.integers(20, 140)
            r = int(rng.choice([2, 4, 8, 30, 60]))
            gts.append((_disc(h, w, cy, cx, r), int(rng.integers(1, 3))))
            for _ in range(2):  # a near-miss and a shifted prediction per object, some wrong class
                dy, dx = rng.integers(-4, 5, size=2)
                rr = max(1, r + int(rng.integers(-3, 4)))
                lab = gts[-1][1] if rng.random() < 0.8 else 3 - gts[-1][1]
                preds.append((_disc(h, w, cy + dy, cx + dx, rr), float(rng.random()), lab))
        preds.append((_disc(h, w, 60, 80, 10), 0.33, 1))  # a false positive
        images.append((gts, preds))
    return h, w, images


def _pycocotools_stats(h, w, images):
    gt = {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 2}]}
    res = []
    for i, (gts, preds) in enumerate(images):
        gt["images"].append({"id": i, "height": h, "width": w})
        for m, c in gts:
            rle = mask_utils.encode(np.asfortranarray(m))
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": c,
                    "iscrowd": 0,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                }
            )
        for m, s, c in preds:
            res.append(
                {
                    "image_id": i,
                    "category_id": c,
                    "score": s,
                    "segmentation": mask_utils.encode(np.asfortranarray(m)),
                }
            )
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(res), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


def test_equals_cocoeval():
    h, w, images = _data()
    metric = CocoMaskAP()
    for gts, preds in images:
        pm = torch.as_tensor(np.stack([p[0] for p in preds])).bool()
        metric.update(
            [(pm, torch.tensor([p[1] for p in preds]), torch.tensor([p[2] for p in preds]))],
            [
                {
                    "masks": torch.as_tensor(np.stack([g[0] for g in gts])),
                    "labels": torch.tensor([g[1] for g in gts]),
                }
            ],
        )
    got = metric.compute()
    stats = _pycocotools_stats(h, w, images)
    assert set(got) == {"ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l"}
    for key, i in zip(["ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l"], range(6), strict=True):
        assert got[key].item() == pytest.approx(float(stats[i]), abs=1e-6), key
    assert 0.05 < got["ap"].item() < 0.95  # a non-trivial case


def test_dict_preds_and_perfect():
    m = torch.zeros(2, 20, 20, dtype=torch.bool)
    m[0, 2:8, 2:8] = True
    m[1, 5:15, 5:15] = True
    metric = CocoMaskAP()
    metric.update(
        [{"masks": m, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}],
        [{"masks": m, "labels": torch.tensor([0, 1])}],
    )
    out = metric.compute()
    assert out["ap"].item() == pytest.approx(1.0)
    assert out["ap_m"].item() == -1.0  # no medium objects: COCO's -1


def test_iou_on_a_threshold_counts_as_cocoeval_does():
    """IoU exactly 0.55 (11 of 20 pixels) matches at 0.5 and 0.55 in COCOeval: AP = 2/10; torchmetrics'
    float32 default thresholds (0.55 -> 0.550000011920929) would give 1/10."""
    gt = np.zeros((10, 20), np.uint8)
    gt[0, :] = 1  # 20 pixels
    pred = np.zeros_like(gt)
    pred[0, :11] = 1  # inside the truth: IoU 11 / 20
    images = [([(gt, 1)], [(pred, 0.9, 1)])]
    stats = _pycocotools_stats(10, 20, images)
    assert stats[0] == pytest.approx(0.2)
    metric = CocoMaskAP()
    metric.update(
        [(torch.as_tensor(pred[None]).bool(), torch.tensor([0.9]), torch.tensor([1]))],
        [{"masks": torch.as_tensor(gt[None]), "labels": torch.tensor([1])}],
    )
    assert metric.compute()["ap"].item() == pytest.approx(0.2, abs=1e-6)
