"""The prompt files of ``samflow predict --prompts``: JSON, CSV, COCO annotations or a folder of masks.

``read_prompts`` reads any of them (the formats are described in ``samflow.prompted_predict``) into
``ImagePrompts`` per image, each a list of ``Prompt`` in the original image's pixels; a file that
cannot be used raises ``PromptFileError``, naming it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samflow.data.listing import IMAGE_SUFFIXES


class PromptFileError(ValueError):
    """A prompt file or prediction output that cannot be used; the message names it."""


@dataclass
class Prompt:
    """One instance's prompt on one image, in the original image's pixels."""

    box: np.ndarray | None = None  # (4,) xyxy
    points: np.ndarray | None = None  # (K, 2) xy
    labels: np.ndarray | None = None  # (K,)
    name: str = ""
    category_id: int = 1


@dataclass
class ImagePrompts:
    image: Path
    image_id: int
    prompts: list[Prompt] = field(default_factory=list)


# ---- reading prompts ----
def _find_images(folder: Path) -> dict[str, Path]:
    """File name and stem -> path of every image in ``folder``."""
    if not folder.is_dir():
        raise PromptFileError(f"--images {str(folder)!r} is not a folder.")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found[path.name] = path
            found.setdefault(path.stem, path)
    return found


def _image(images: dict[str, Path], name: str, source: Path) -> Path:
    if name in images or Path(name).name in images:
        return images.get(name) or images[Path(name).name]
    raise PromptFileError(f"{source}: image {name!r} is not in the --images folder.")


def _prompt(entry: dict[str, Any], where: str) -> Prompt:
    box = entry.get("box")
    points = entry.get("points")
    if box is None and points is None:
        raise PromptFileError(f"{where}: a prompt needs 'box' or 'points'.")
    prompt = Prompt(name=str(entry.get("id", "")), category_id=int(entry.get("category_id", 1)))
    if box is not None:
        prompt.box = np.asarray(box, dtype=np.float64)
        if prompt.box.shape != (4,):
            raise PromptFileError(f"{where}: 'box' must be [x0, y0, x1, y1].")
    if points is not None:
        prompt.points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labels = entry.get("labels", [1] * len(prompt.points))
        prompt.labels = np.asarray(labels, dtype=np.int64)
        if prompt.labels.shape != (len(prompt.points),):
            raise PromptFileError(f"{where}: 'labels' must have one value per point.")
    return prompt


def read_json_prompts(path: Path, images: dict[str, Path]) -> list[ImagePrompts]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise PromptFileError(f"{path}: expected an object of image name -> list of prompts.")
    out = []
    for i, (name, entries) in enumerate(data.items()):
        prompts = [_prompt(e, f"{path} [{name!r}][{k}]") for k, e in enumerate(entries)]
        out.append(ImagePrompts(_image(images, name, path), i + 1, prompts))
    return out


CSV_HEADER = ("image", "instance", "kind", "x", "y", "x1", "y1")


def read_csv_prompts(path: Path, images: dict[str, Path]) -> list[ImagePrompts]:
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in CSV_HEADER[:5] if c not in (reader.fieldnames or [])]
        if missing:
            raise PromptFileError(f"{path}: the header lacks {missing}; expected {','.join(CSV_HEADER)}.")
        for line, row in enumerate(reader, start=2):
            entry = groups.setdefault(row["image"], {}).setdefault(row["instance"], {"id": row["instance"]})
            kind = row["kind"].strip()
            try:
                if kind == "box":
                    entry["box"] = [float(row[k]) for k in ("x", "y", "x1", "y1")]
                elif kind in ("point", "neg"):
                    entry.setdefault("points", []).append([float(row["x"]), float(row["y"])])
                    entry.setdefault("labels", []).append(1 if kind == "point" else 0)
                else:
                    raise PromptFileError(f"{path} line {line}: kind {kind!r} is not box, point or neg.")
            except (TypeError, ValueError) as err:
                if isinstance(err, PromptFileError):
                    raise
                raise PromptFileError(f"{path} line {line}: a coordinate is not a number ({err}).") from None
    data = {name: list(entries.values()) for name, entries in groups.items()}
    out = []
    for i, (name, entries) in enumerate(data.items()):
        prompts = [_prompt(e, f"{path} image {name!r}") for e in entries]
        out.append(ImagePrompts(_image(images, name, path), i + 1, prompts))
    return out


def _points_inside(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct foreground pixels of ``mask`` (fewer if it has fewer), as xy pixel centres."""
    ys, xs = np.nonzero(mask)
    pick = rng.choice(len(xs), size=min(count, len(xs)), replace=False)
    return np.stack([xs[pick], ys[pick]], axis=1).astype(np.float64)


def read_coco_prompts(
    path: Path, images: dict[str, Path], derive: str, points: int, seed: int
) -> list[ImagePrompts]:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = json.loads(path.read_text())
    coco.createIndex()
    rng = np.random.default_rng(seed)
    out = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        entry = ImagePrompts(_image(images, info["file_name"], path), int(image_id))
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)):
            prompt = Prompt(name=str(ann["id"]), category_id=int(ann.get("category_id", 1)))
            if derive == "box":
                x, y, w, h = ann["bbox"]
                prompt.box = np.array([x, y, x + w, y + h], dtype=np.float64)
            else:
                mask = coco.annToMask(ann)
                if not mask.any():
                    continue
                prompt.points = _points_inside(mask, points, rng)
                prompt.labels = np.ones(len(prompt.points), dtype=np.int64)
            entry.prompts.append(prompt)
        out.append(entry)
    return out


def read_mask_prompts(
    folder: Path, images: dict[str, Path], derive: str, points: int, seed: int
) -> list[ImagePrompts]:
    """Each non-zero value of ``<stem>.png`` one instance: its tight box (as training's box prompt,
    corners inclusive), or ``points`` pixels drawn inside it."""
    rng = np.random.default_rng(seed)
    out = []
    stems = sorted({p.stem: p for p in images.values()}.items())
    for i, (stem, image) in enumerate(stems):
        mask_file = next(
            (m for m in sorted(folder.glob(f"{stem}.*")) if m.suffix.lower() in IMAGE_SUFFIXES), None
        )
        if mask_file is None:
            continue
        labels = np.asarray(Image.open(mask_file))
        labels = labels if labels.ndim == 2 else labels[..., 0]
        entry = ImagePrompts(image, i + 1)
        for value in np.unique(labels[labels != 0]):
            instance = labels == value
            prompt = Prompt(name=str(int(value)))
            if derive == "box":
                ys, xs = np.nonzero(instance)
                prompt.box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
            else:
                prompt.points = _points_inside(instance, points, rng)
                prompt.labels = np.ones(len(prompt.points), dtype=np.int64)
            entry.prompts.append(prompt)
        out.append(entry)
    return out


def read_prompts(
    source: Path,
    images_dir: Path,
    *,
    derive: str | None = None,
    points: int | None = None,
    seed: int = 0,
) -> list[ImagePrompts]:
    """The prompts of ``source`` (JSON, CSV, COCO annotations or a mask folder) per image of ``images_dir``.

    ``derive`` (default ``"box"``) and ``points`` (default 1) apply to COCO and mask prompts; given
    for a JSON or CSV file, which holds its own boxes and points, they are refused.
    """
    images = _find_images(images_dir)
    if source.is_dir():
        return read_mask_prompts(source, images, derive or "box", points or 1, seed)
    if not source.is_file():
        raise PromptFileError(f"--prompts {str(source)!r} does not exist.")
    if source.suffix.lower() == ".csv":
        _refuse_derive(source, "CSV", derive, points)
        return read_csv_prompts(source, images)
    try:
        head = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise PromptFileError(
            f"{source}: not JSON ({err}); prompts are JSON, CSV, COCO or a mask folder."
        ) from None
    if isinstance(head, dict) and "annotations" in head and "images" in head:
        return read_coco_prompts(source, images, derive or "box", points or 1, seed)
    _refuse_derive(source, "JSON", derive, points)
    return read_json_prompts(source, images)


def _refuse_derive(source: Path, kind: str, derive: str | None, points: int | None) -> None:
    given = [flag for flag, value in (("--derive", derive), ("--points", points)) if value is not None]
    if given:
        raise PromptFileError(
            f"{' and '.join(given)} apply to COCO and mask prompts only; {source} is a {kind} prompt file "
            f"whose boxes and points are used as written: drop {' and '.join(given)}."
        )
