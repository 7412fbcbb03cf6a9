"""README claims about COCO instances ("COCO instances and SAM proposals (SAPNet)") not proven elsewhere:
the quasi-centre ellipse is capped at 96 px, its jitter stays below half a pixel, and an annotation
whose mask is empty is no prompt row."""

from __future__ import annotations

import json

import torch
from tiny_coco import make_tiny_coco

from samflow.data.coco import CocoInstances
from samflow.data.coco_points import qc_point, qc_weights


def test_the_central_ellipse_is_capped_at_96_px_on_a_large_instance():
    """A 1000 x 300 px box: w/8 = 125 px is capped to 96, h/8 = 37.5 is not (README: min(96, w/8))."""
    mask = torch.zeros(320, 1040, dtype=torch.bool)
    mask[10:310, 20:1020] = True  # x 20..1019, y 10..309: centre (519.5, 159.5)
    xs, ys, _ = qc_weights(mask)
    dx, dy = (xs.double() - 519.5).abs(), (ys.double() - 159.5).abs()
    assert 95 < dx.max() <= 96  # the cap binds: not 125
    assert 36 < dy.max() <= 37.5
    assert ((dx / 96) ** 2 + (dy / 37.5) ** 2 <= 1).all()


def test_the_jitter_is_below_half_a_pixel():
    """Every drawn point is within half a pixel of a candidate pixel of the mask."""
    mask = torch.zeros(40, 50, dtype=torch.bool)
    mask[5:35, 8:44] = True
    xs, ys, _ = qc_weights(mask)
    candidates = torch.stack([xs, ys], 1).double()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        p = qc_point(mask, gen)
        nearest = (candidates - p).abs().max(1).values.min()
        assert nearest < 0.5


def test_an_annotation_with_an_empty_mask_is_no_prompt_row(tmp_path):
    path, truth = make_tiny_coco(tmp_path)
    data = json.loads(path.read_text())
    h, w = data["images"][0]["height"], data["images"][0]["width"]
    empty = {"size": [h, w], "counts": [h * w]}  # uncompressed RLE without a foreground pixel
    data["annotations"].append(
        {"id": 77, "image_id": 1, "category_id": 1, "segmentation": empty, "iscrowd": 0}
    )
    path.write_text(json.dumps(data))
    inst = CocoInstances(path, img_size=64).instances(0)
    assert inst["ann_ids"].tolist() == sorted(truth[1])  # 77 dropped, the others kept
    assert inst["instance_masks"].flatten(1).any(1).all()
