"""Reading a COCO instances file (``CocoInstances``): its ``images`` and ``annotations`` lists and
their keys checked, category ids listed, annotations grouped by image; and its digest, part of the
data's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from samflow.data.errors import DataError
from samflow.paths import where_looked


def read_coco_file(
    file: Path, crowd: Literal["skip", "keep"], empty: Literal["skip", "keep"]
) -> tuple[dict[int, str], list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """The categories (id -> name), the images kept and each one's annotations, of a COCO instances file.

    A ``DataError`` names the file (and the entry) when it is not one. An image without a usable
    annotation (``iscrowd`` ones count only with ``crowd="keep"``) is left out with ``empty="skip"``.
    """
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(
            f"COCO annotations {file} not found{where_looked(file)}; check the data's annotations path."
        ) from None
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: not valid JSON ({err}).") from None
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{file}: no '{key}' list; is this a COCO instances file?")
    categories = {int(c["id"]): c.get("name", str(c["id"])) for c in data.get("categories", [])}
    listed = bool(categories)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for i, ann in enumerate(data["annotations"]):
        for key in ("id", "image_id", "segmentation", "category_id"):  # ids name rows, proposals, results
            if key not in ann:
                raise DataError(f"{file}: annotations[{i}] (id {ann.get('id')}) has no '{key}'.")
        cat = int(ann["category_id"])
        if cat not in categories:
            if listed:
                raise DataError(
                    f"{file}: annotations[{i}] (id {ann.get('id')}) has category_id {cat}, which is "
                    "not in the file's 'categories'; add it there or fix the annotation."
                )
            categories[cat] = str(cat)
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    images: list[dict[str, Any]] = []
    image_anns: list[list[dict[str, Any]]] = []
    for i, img in enumerate(data["images"]):
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise DataError(f"{file}: images[{i}] has no '{key}'.")
        anns = by_image.get(int(img["id"]), [])
        usable = [a for a in anns if makes_row(a, crowd)]
        if not usable and empty == "skip":
            continue
        images.append(img)
        image_anns.append(anns)
    return categories, images, image_anns


def makes_row(ann: dict[str, Any], crowd: Literal["skip", "keep"]) -> bool:
    """Whether annotation ``ann`` is an instance (a prompt row) under ``crowd``: an ``iscrowd`` region is
    one only with ``"keep"`` (one whose mask is empty is dropped later, when it is decoded)."""
    return crowd == "keep" or not ann.get("iscrowd", 0)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
