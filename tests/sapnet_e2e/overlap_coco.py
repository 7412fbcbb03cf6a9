"""A tiny generated COCO set of overlapping objects with class-specific looks (for the SAPNet pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_api

#: class look: category id -> RGB
COLOURS = {3: (220, 40, 40), 7: (40, 60, 220)}


def make_overlap_coco(
    root: Path, n_images: int = 8, size: tuple[int, int] = (96, 128), seed: int = 0
) -> Path:
    """Images with 2-3 overlapping objects each: red rectangles (category 3) and blue discs (category 7).

    Category ids have a gap (3, 7) so the contiguous mapping is exercised. Later objects are drawn on
    top and each annotation is the visible part (as COCO's), polygons for rectangles, RLE for discs.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    images, anns = [], []
    ann_id = 1
    for img_id in range(1, n_images + 1):
        canvas = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
        owner = np.zeros((h, w), int)  # 0 background, k the k-th object (on top wins)
        objects = []
        k = int(rng.integers(2, 4))
        cx, cy = int(rng.integers(40, w - 40)), int(rng.integers(35, h - 35))
        for i in range(k):
            cat = 3 if (i + img_id) % 2 else 7
            ox, oy = cx + int(rng.integers(-22, 23)), cy + int(rng.integers(-18, 19))  # overlapping
            yy, xx = np.mgrid[:h, :w]
            if cat == 3:
                hw, hh = int(rng.integers(12, 22)), int(rng.integers(10, 18))
                m = (abs(xx - ox) <= hw) & (abs(yy - oy) <= hh)
            else:
                r = int(rng.integers(10, 18))
                m = (xx - ox) ** 2 + (yy - oy) ** 2 <= r * r
            owner[m] = i + 1
            objects.append(cat)
        for i, cat in enumerate(objects):
            canvas[owner == i + 1] = COLOURS[cat]
        for i, cat in enumerate(objects):
            m = owner == i + 1
            if not m.any():
                continue
            rle = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
            ys, xs = np.nonzero(m)
            anns.append(
                {
                    "id": ann_id,
                    "image_id": img_id,
                    "category_id": cat,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                    "area": int(m.sum()),
                    "bbox": [
                        int(xs.min()),
                        int(ys.min()),
                        int(xs.max() - xs.min() + 1),
                        int(ys.max() - ys.min() + 1),
                    ],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        name = f"images/{img_id:03d}.png"
        Image.fromarray(canvas).save(root / name)
        images.append({"id": img_id, "file_name": name, "height": h, "width": w})
    cats = [{"id": 3, "name": "box"}, {"id": 7, "name": "disc"}]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def sapnet_experiment(tmp_path: Path, *, test: bool = False, epochs: int | None = None) -> Path:
    """``exp.yaml`` in ``tmp_path``: SAPNet (2 classes, no losses) on the tiny SAM, trained (and tested when
    ``test``) on two images of ``make_overlap_coco`` at 128 px."""
    annotations = make_overlap_coco(tmp_path / "coco", n_images=2)
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "model:\n  sam: {variant: tiny}\n  plugins:\n    sap: {class_path: SAPNet, init_args: {num_classes: 2}}\n"
        "  losses: {}\n"
        f"data:\n  class_path: samflow.data.coco.CocoDataModule\n  init_args:\n    img_size: 128\n"
        f"    train: {{annotations: {annotations}}}\n"
        + (f"    test: {{annotations: {annotations}}}\n" if test else "")
        + "trainer: {accelerator: cpu, devices: 1"
        + (f", max_epochs: {epochs}" if epochs is not None else "")
        + "}\n"
    )
    return exp


def _rle(m: np.ndarray) -> dict:
    r = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}


def _xywh(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _half(m: np.ndarray, point: list[float]) -> np.ndarray:
    """The half of ``m`` (cut across its longer side) that holds ``point``."""
    ys, xs = np.nonzero(m)
    part = m.copy()
    if xs.max() - xs.min() >= ys.max() - ys.min():
        mid = int((xs.min() + xs.max() + 1) / 2)
        if point[0] >= mid:
            part[:, :mid] = False
        else:
            part[:, mid:] = False
    else:
        mid = int((ys.min() + ys.max() + 1) / 2)
        if point[1] >= mid:
            part[:mid] = False
        else:
            part[mid:] = False
    return part if part.any() else m


def sam_like_bags(store: Path, annotations: Path) -> None:
    """Replace the bags of a ``samflow proposals`` store (key kept) by what a trained SAM typically gives.

    The tiny test SAM has random weights, so its proposals are noise. Per point, in the store's order
    (``samflow.proposals``): 0-2 SAM's nested multimask hypotheses: a quarter of the object, its half
    (both holding the point), the object; 3 single-mask: the object; 4 a leak into an overlapping
    neighbour (object | neighbour); 5 the whole image.
    """
    final = store / "proposals.json"
    data = json.loads(final.read_text())
    coco = json.loads(annotations.read_text())
    masks = {
        a["id"]: mask_api.decode(
            {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        ).astype(bool)
        for a in coco["annotations"]
    }
    by_image: dict[int, list[int]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["id"])
    for ann in data["annotations"]:
        m = masks[ann["ann_id"]]
        half = _half(m, ann["point"])
        quarter = _half(half, ann["point"])
        grown = np.zeros_like(m)
        grown[1:] |= m[:-1]
        grown[:-1] |= m[1:]
        grown[:, 1:] |= m[:, :-1]
        grown[:, :-1] |= m[:, 1:]
        others = [masks[o] for o in by_image[ann["image_id"]] if o != ann["ann_id"]]
        touching = [o for o in others if (o & grown).any()]
        leak = m | touching[0] if touching else m
        bag = [quarter, half, m, m, leak, np.ones_like(m)]
        ann["segmentation"] = [_rle(b) for b in bag]
        ann["bbox"] = [_xywh(b) for b in bag]
        ann["scores"] = [0.8, 0.85, 0.9, 0.88, 0.7, 0.5]
    final.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")))
