"""The prompt files of ``samflow predict --prompts``: JSON, CSV, COCO annotations or a folder of masks.

``read_prompts`` reads any of them (the formats are described in ``samflow.prompted_predict``) into
``ImagePrompts`` per image, each a list of ``Prompt`` in the original image's pixels; a file that
cannot be used raises ``PromptFileError``, naming it and the entry (JSON key, CSV line, COCO
annotation, mask value). Coordinates that are not finite, a box whose corners are reversed, a prompt
more than ``EDGE`` pixels outside its image, and a COCO size or a mask that is not the image's size
are refused too, before any image is predicted: a prompt in another frame would be segmented
somewhere else without a word.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from samflow.data.errors import DataError
from samflow.data.listing import IMAGE_SUFFIXES
from samflow.data.reading import header_size, orientation, upright


class PromptFileError(ValueError):
    """A prompt file or prediction output that cannot be used; the message names it."""


#: how far (pixels) a prompt may reach past the image's edges (0..W, 0..H): rounding in a file's numbers
EDGE = 1.0


@dataclass
class Prompt:
    """One instance's prompt on one image, in the original image's pixels."""

    box: np.ndarray | None = None  # (4,) xyxy
    points: np.ndarray | None = None  # (K, 2) xy
    labels: np.ndarray | None = None  # (K,)
    name: str = ""
    category_id: int = 1
    where: str = ""  # the file and the entry it came from, for errors


@dataclass
class ImagePrompts:
    image: Path
    image_id: int
    prompts: list[Prompt] = field(default_factory=list)
    frame: tuple[int, int] | None = None  # (H, W) the file gives the image (COCO's size, the mask's)


# ---- reading prompts ----
def _find_images(folder: Path) -> dict[str, Path]:
    """File name and stem -> path of every image in ``folder``; a stem two images share (``x.png``,
    ``x.jpg``) names neither (``_image`` says so when a prompt file uses it)."""
    if not folder.is_dir():
        raise PromptFileError(f"--images {str(folder)!r} is not a folder.")
    found: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found[path.name] = path
            by_stem.setdefault(path.stem, []).append(path)
    for stem, paths in by_stem.items():
        if len(paths) == 1:
            found.setdefault(stem, paths[0])
    return found


def _image(images: dict[str, Path], name: str, source: Path) -> Path:
    if name in images or Path(name).name in images:
        return images.get(name) or images[Path(name).name]
    shared = sorted({p.name for p in images.values() if p.stem == Path(name).name})
    if len(shared) > 1:
        raise PromptFileError(
            f"{source}: image {name!r} is ambiguous: {' and '.join(shared)} in --images share that stem; "
            "name the file."
        )
    raise PromptFileError(f"{source}: image {name!r} is not in the --images folder.")


def _numbers(value: Any, where: str, what: str, dtype: type = np.float64) -> np.ndarray:
    try:
        numbers: np.ndarray = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise PromptFileError(f"{where}: {what} must hold numbers, got {value!r}.") from None
    if not np.isfinite(numbers).all():
        raise PromptFileError(f"{where}: {what} must hold finite numbers, got {value!r}.")
    return numbers


def _prompt(entry: Any, where: str) -> Prompt:
    if not isinstance(entry, dict):
        raise PromptFileError(f"{where}: a prompt is an object with 'box' and / or 'points', got {entry!r}.")
    box = entry.get("box")
    points = entry.get("points")
    if box is None and points is None:
        raise PromptFileError(f"{where}: a prompt needs 'box' or 'points'.")
    category = _numbers(entry.get("category_id", 1), where, "'category_id'", np.int64)
    prompt = Prompt(name=str(entry.get("id", "")), category_id=int(category), where=where)
    if box is not None:
        prompt.box = _numbers(box, where, "'box'")
        if prompt.box.shape != (4,):
            raise PromptFileError(f"{where}: 'box' must be [x0, y0, x1, y1].")
        if prompt.box[2] < prompt.box[0] or prompt.box[3] < prompt.box[1]:
            raise PromptFileError(
                f"{where}: 'box' {box!r} has x1 < x0 or y1 < y0; a box is [x0, y0, x1, y1] (corners, "
                "not a width and height)."
            )
    if points is not None:
        coords = _numbers(points, where, "'points'")
        if coords.shape != (2,) and (coords.ndim != 2 or coords.shape[1:] != (2,) or not len(coords)):
            raise PromptFileError(f"{where}: 'points' must be [[x, y], ...], at least one point.")
        prompt.points = coords.reshape(-1, 2)
        labels = entry.get("labels", [1] * len(prompt.points))
        prompt.labels = _numbers(labels, where, "'labels'", np.int64)
        if prompt.labels.shape != (len(prompt.points),) or not np.isin(prompt.labels, (0, 1)).all():
            raise PromptFileError(
                f"{where}: 'labels' must hold one 1 (foreground) or 0 (background) per point."
            )
    return prompt


def read_json_prompts(path: Path, images: dict[str, Path]) -> list[ImagePrompts]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise PromptFileError(f"{path}: expected an object of image name -> list of prompts.")
    out = []
    for i, (name, entries) in enumerate(data.items()):
        if not isinstance(entries, list):
            raise PromptFileError(f"{path} [{name!r}]: expected a list of prompts, got {entries!r}.")
        prompts = [_prompt(e, f"{path} [{name!r}][{k}]") for k, e in enumerate(entries)]
        out.append(ImagePrompts(_image(images, name, path), i + 1, prompts))
    return out


CSV_HEADER = ("image", "instance", "kind", "x", "y", "x1", "y1")


def read_csv_prompts(path: Path, images: dict[str, Path]) -> list[ImagePrompts]:
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    lines: dict[tuple[str, str], list[int]] = {}  # (image, instance) -> its rows' line numbers
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in CSV_HEADER[:5] if c not in (reader.fieldnames or [])]
        if missing:
            raise PromptFileError(f"{path}: the header lacks {missing}; expected {','.join(CSV_HEADER)}.")
        for line, row in enumerate(reader, start=2):
            entry = groups.setdefault(row["image"], {}).setdefault(row["instance"], {"id": row["instance"]})
            lines.setdefault((row["image"], row["instance"]), []).append(line)
            kind = (row["kind"] or "").strip()  # None: a row shorter than the header
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
        prompts = [_prompt(e, _csv_where(path, lines[name, e["id"]], name, e["id"])) for e in entries]
        out.append(ImagePrompts(_image(images, name, path), i + 1, prompts))
    return out


def _csv_where(path: Path, lines: list[int], image: str, instance: str) -> str:
    numbers = ", ".join(str(n) for n in lines)
    return f"{path} line{'s' if len(lines) > 1 else ''} {numbers} (image {image!r}, instance {instance!r})"


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
        if "file_name" not in info:
            raise PromptFileError(f"{path}: image {image_id} has no 'file_name'.")
        entry = ImagePrompts(_image(images, info["file_name"], path), int(image_id))
        if "height" in info and "width" in info:
            entry.frame = (int(info["height"]), int(info["width"]))
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)):
            where = f"{path}: annotation {ann.get('id')!r} of image {image_id}"
            try:
                prompt = Prompt(name=str(ann["id"]), category_id=int(ann.get("category_id", 1)), where=where)
                if derive == "box":
                    x, y, w, h = _numbers(ann["bbox"], where, "'bbox'").reshape(4)
                    if w < 0 or h < 0:
                        raise ValueError(f"'bbox' {ann['bbox']!r} has a negative width or height")
                    prompt.box = np.array([x, y, x + w, y + h], dtype=np.float64)
                else:
                    mask = coco.annToMask(ann)  # needs the image's height and width and a segmentation
                    if not mask.any():
                        continue
                    prompt.points = _points_inside(mask, points, rng)
                    prompt.labels = np.ones(len(prompt.points), dtype=np.int64)
            except PromptFileError:
                raise
            except (KeyError, TypeError, ValueError, IndexError) as err:
                what = f"lacks {err}" if isinstance(err, KeyError) else f"cannot be used ({err})"
                raise PromptFileError(
                    f"{path}: annotation {ann.get('id')!r} of image {image_id} {what}; --derive {derive} "
                    "needs 'bbox' [x, y, w, h] (box) or 'segmentation' and the image's size (points)."
                ) from None
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
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(set(images.values())):
        by_stem.setdefault(path.stem, []).append(path)
    for i, (stem, paths) in enumerate(sorted(by_stem.items())):
        mask_file = next(
            (m for m in sorted(folder.glob(f"{stem}.*")) if m.suffix.lower() in IMAGE_SUFFIXES), None
        )
        if mask_file is None:
            continue
        if len(paths) > 1:
            raise PromptFileError(
                f"{mask_file}: the images {' and '.join(p.name for p in paths)} share its stem, so which one "
                "it prompts is ambiguous; rename one."
            )
        try:
            with Image.open(mask_file) as opened:
                labels = np.array(opened)  # a writable copy (torch.from_numpy warns on a read-only one)
                turn = orientation(opened)
        except (OSError, ValueError) as err:
            raise PromptFileError(f"{mask_file}: cannot read the mask ({err}).") from None
        labels = labels if labels.ndim == 2 else labels[..., 0]
        labels = upright(torch.from_numpy(np.ascontiguousarray(labels)), turn).numpy()  # as images are read
        entry = ImagePrompts(paths[0], i + 1, frame=(int(labels.shape[0]), int(labels.shape[1])))
        for value in np.unique(labels[labels != 0]):
            instance = labels == value
            prompt = Prompt(name=str(int(value)), where=f"{mask_file} value {int(value)}")
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
    for a JSON or CSV file, which holds its own boxes and points, they are refused, and so is
    ``points`` without ``derive="points"`` (boxes have no points to count). Every prompt is checked
    against its image's size (``check_inside``).
    """
    return check_inside(_read_any(source, images_dir, derive, points, seed))


def _read_any(
    source: Path, images_dir: Path, derive: str | None, points: int | None, seed: int
) -> list[ImagePrompts]:
    images = _find_images(images_dir)
    if source.is_dir():
        _refuse_points_of_boxes(derive, points)
        return read_mask_prompts(source, images, derive or "box", points or 1, seed)
    if not source.is_file():
        raise PromptFileError(f"--prompts {str(source)!r} does not exist.")
    try:
        text = source.read_text()
    except UnicodeDecodeError as err:
        raise PromptFileError(
            f"{source}: not a text file ({err}); prompts are JSON, CSV, COCO or a mask folder."
        ) from None
    if source.suffix.lower() == ".csv":
        _refuse_derive(source, "CSV", derive, points)
        return read_csv_prompts(source, images)
    try:
        head = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptFileError(
            f"{source}: not JSON ({err}); prompts are JSON, CSV, COCO or a mask folder."
        ) from None
    if isinstance(head, dict) and "annotations" in head and "images" in head:
        _refuse_points_of_boxes(derive, points)
        return read_coco_prompts(source, images, derive or "box", points or 1, seed)
    _refuse_derive(source, "JSON", derive, points)
    return read_json_prompts(source, images)


def _refuse_points_of_boxes(derive: str | None, points: int | None) -> None:
    """``--points N`` counts the points ``--derive points`` draws; with boxes (the default) it would do
    nothing, so it is refused rather than ignored."""
    if points is not None and derive != "points":
        raise PromptFileError(
            f"--points {points} counts the points drawn with --derive points, but the prompts are "
            f"{derive or 'box'}es (--derive {derive or 'box'}{'' if derive else ', the default'}): add "
            "--derive points, or drop --points."
        )


def _refuse_derive(source: Path, kind: str, derive: str | None, points: int | None) -> None:
    given = [flag for flag, value in (("--derive", derive), ("--points", points)) if value is not None]
    if given:
        raise PromptFileError(
            f"{' and '.join(given)} apply to COCO and mask prompts only; {source} is a {kind} prompt file "
            f"whose boxes and points are used as written: drop {' and '.join(given)}."
        )


def _image_size(path: Path) -> tuple[int, int] | None:
    """(H, W) of an image from its header, upright (its EXIF orientation applied, as the image is read);
    None when it cannot be read (predicting it stops the run naming it, or ``--skip-bad`` skips it)."""
    try:
        return header_size(path)
    except (DataError, SyntaxError):
        return None


def check_inside(entries: list[ImagePrompts]) -> list[ImagePrompts]:
    """``entries``, once every prompt lies on its image (at most ``EDGE`` px past its edges) and the
    size a file gives an image (COCO's ``height`` / ``width``, a mask's) is the image's; otherwise a
    ``PromptFileError`` naming the file, the entry, the image and its size."""
    for entry in entries:
        size = _image_size(entry.image)
        if size is None:
            continue
        height, width = size
        if entry.frame is not None and entry.frame != size:
            raise PromptFileError(
                f"{entry.image}: the prompt file gives it {entry.frame[1]} x {entry.frame[0]} pixels "
                f"(width x height), the image is {width} x {height}; its prompts would land elsewhere. "
                "Give the prompts of this image, at its size."
            )
        for prompt in entry.prompts:
            xy = [a.reshape(-1, 2) for a in (prompt.box, prompt.points) if a is not None]
            coords = np.concatenate(xy)
            outside = (
                (coords[:, 0] < -EDGE)
                | (coords[:, 0] > width + EDGE)
                | (coords[:, 1] < -EDGE)
                | (coords[:, 1] > height + EDGE)
            )
            if outside.any():
                x, y = coords[np.argmax(outside)]
                raise PromptFileError(
                    f"{prompt.where}: the point ({x:g}, {y:g}) lies outside the image {entry.image.name} "
                    f"({width} x {height} pixels); coordinates are the image's pixels (x from 0 to "
                    f"{width}, y from 0 to {height}): fix or clip the prompt, or check the image it names."
                )
    return entries
