"""A tiny COCO set written by the tests: overlapping objects as polygons, uncompressed and compressed RLE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_api


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with zeros (COCO's uncompressed RLE), written out by hand."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def make_tiny_coco(root: Path) -> tuple[Path, dict[int, dict[int, np.ndarray]]]:
    """Write images and instances.json; return the file and the true masks {image id: {ann id: mask}}."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    truth: dict[int, dict[int, np.ndarray]] = {}
    images, anns = [], []
    shapes = [(40, 56), (48, 32), (36, 36), (30, 40)]
    ann_id = 1
    for img_id, (h, w) in enumerate(shapes, start=1):
        name = f"im{img_id}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": img_id, "file_name": f"images/{name}", "height": h, "width": w})
        truth[img_id] = {}
        if img_id == 4:  # an empty image
            continue
        # polygon: a rectangle with corners on pixel borders covers exactly [x0, x1) x [y0, y1)
        x0, y0, x1, y1 = 4, 5, 4 + w // 2, 5 + h // 2
        poly = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
        anns.append({"id": ann_id, "image_id": img_id, "category_id": 1, "segmentation": poly, "iscrowd": 0})
        truth[img_id][ann_id] = m
        ann_id += 1
        # uncompressed RLE: a disc overlapping the rectangle
        yy, xx = np.mgrid[:h, :w]
        disc = (yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= (min(h, w) // 3) ** 2
        anns.append(
            {
                "id": ann_id,
                "image_id": img_id,
                "category_id": 2,
                "segmentation": _rle_uncompressed(disc),
                "iscrowd": 0,
            }
        )
        truth[img_id][ann_id] = disc
        ann_id += 1
        # compressed RLE: an L shape overlapping both
        ell = np.zeros((h, w), bool)
        ell[h // 3 : h - 2, w - 10 : w - 2] = True
        ell[h - 8 : h - 2, w // 3 : w - 2] = True
        rle = mask_api.encode(np.asfortranarray(ell.astype(np.uint8)))
        anns.append(
            {
                "id": ann_id,
                "image_id": img_id,
                "category_id": 1,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "iscrowd": 0,
                "point": [float(w - 6), float(h - 5)],
            }
        )
        truth[img_id][ann_id] = ell
        ann_id += 1
    # a crowd region on image 1
    crowd = np.zeros((40, 56), bool)
    crowd[30:38, 0:10] = True
    anns.append(
        {"id": 99, "image_id": 1, "category_id": 1, "segmentation": _rle_uncompressed(crowd), "iscrowd": 1}
    )
    cats = [{"id": 1, "name": "thing"}, {"id": 2, "name": "disc"}]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, truth
