"""``samflow predict --prompts FILE``: a trained model on a folder of images, one mask per prompt.

    samflow predict --model RUN_OR_CKPT_OR_EXPORT --images DIR --prompts FILE --out DIR
                    [--format instances|labels] [--derive box|points] [--points N] [--seed N]
                    [--sam-checkpoint PATH] [--tile N] [--overwrite] [--skip-bad] [--device DEV]

Prompt files (the image is named by its file name, or its stem, inside ``--images``):

- JSON: ``{"a.png": [{"box": [x0, y0, x1, y1]}, {"points": [[x, y], ...], "labels": [1, 0, ...]},
  {"box": [...], "points": [...], "labels": [...]}], ...}``; pixel coordinates of the original image,
  ``labels`` 1 foreground / 0 background (default: all 1). An optional ``"id"`` names the instance.
- CSV with the header ``image,instance,kind,x,y,x1,y1``: one row per box (``kind`` ``box``: corners
  ``x,y`` and ``x1,y1``) or point (``kind`` ``point`` foreground, ``neg`` background: ``x,y``); rows of one
  ``(image, instance)`` form one prompt.
- COCO annotations (a JSON with ``images`` and ``annotations``): each annotation one prompt, its
  ``bbox`` (``--derive box``) or ``--points`` pixels drawn inside its segmentation (``--derive points``,
  seeded by ``--seed``); results keep COCO's image ids and category ids.
- A folder of masks (``<stem>.png`` per image): each non-zero value one instance, its prompt derived
  as in training (the tight box, or ``--points`` pixels drawn inside it).

Outputs in ``--out``: ``masks/<stem>_<k>.png`` per prompt (``--format instances``, 255 inside) or
``labels/<stem>.png`` per image (``--format labels``, 16-bit, prompt k's pixels hold k + 1; where
prompts overlap the higher score wins), ``results.json``: COCO results (``image_id``,
``category_id``, ``segmentation`` as RLE, ``score``: the model's IoU prediction), and ``skipped.json``:
the images skipped as unreadable (``file_name``, ``path``, ``image_id``, ``prompts``, ``error``; an
empty list when none was). The output folder may not be or hold an input (images, prompt file,
masks); existing outputs are refused unless ``--overwrite``; an unreadable image stops the run naming
it, or with ``--skip-bad`` is reported, skipped, listed in ``skipped.json`` and counted at the end.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samflow.data.folder import IMAGE_SUFFIXES
from samflow.usage import CommandParser, PositiveInt


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


# ---- outputs ----
def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's compressed RLE of a boolean (H, W) mask, ``counts`` as text (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(rle)


RESULTS = "results.json"
SKIPPED = "skipped.json"


def planned_outputs(out: Path, entries: list[ImagePrompts], fmt: str) -> list[Path]:
    files = [out / RESULTS, out / SKIPPED]
    for entry in entries:
        stem = entry.image.stem
        if fmt == "labels":
            files.append(out / "labels" / f"{stem}.png")
        else:
            files += [out / "masks" / f"{stem}_{k}.png" for k in range(len(entry.prompts))]
    return files


def check_outputs(out: Path, inputs: list[Path], planned: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that is, lies in or holds an input, and existing outputs unless ``overwrite``."""
    target = out.resolve()
    for item in inputs:
        real = item.resolve()
        if target == real or real in target.parents or (real.is_dir() and target in real.parents):
            raise PromptFileError(
                f"--out {str(out)!r} would write into the input {str(item)!r}; choose another folder."
            )
        if not real.is_dir() and target in real.parents:
            raise PromptFileError(f"--out {str(out)!r} holds the input {str(item)!r}; choose another folder.")
    existing = [p for p in planned if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise PromptFileError(
            f"{len(existing)} outputs exist already ({shown}); pass --overwrite or another --out."
        )
    inputs_real = {p.resolve() for p in inputs}
    for p in existing:
        if p.resolve() in inputs_real:
            raise PromptFileError(f"the output {str(p)!r} is a link to an input; refused.")


def _read_rgb(path: Path) -> np.ndarray:
    from samflow.data.folder import read_image

    image = read_image(path)  # (3, H, W) in [0, 1]
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _predict_image(
    predictor: Any, image: np.ndarray, prompts: list[Prompt], tile: int | None
) -> Iterator[tuple[np.ndarray, float]]:
    if tile is None:
        predictor.set_image(image)
        for prompt in prompts:
            masks, scores, _ = predictor.predict(
                point_coords=prompt.points,
                point_labels=prompt.labels,
                box=prompt.box,
                multimask_output=None,  # the model's own prediction, as validation scored it
            )
            yield masks[0], float(scores[0])
        predictor.reset_image()
        return
    # prompts of one shape (box or not, number of points) are tiled together: each window is encoded
    # once per group.
    groups: dict[tuple[bool, int], list[int]] = {}
    for k, prompt in enumerate(prompts):
        count = 0 if prompt.points is None else len(prompt.points)
        groups.setdefault((prompt.box is not None, count), []).append(k)
    predicted: dict[int, tuple[np.ndarray, float]] = {}
    for (has_box, count), members in groups.items():
        chosen = [prompts[k] for k in members]
        boxes = np.stack([p.box for p in chosen if p.box is not None]) if has_box else None
        coords = np.stack([p.points for p in chosen if p.points is not None]) if count else None
        labels = np.stack([p.labels for p in chosen if p.labels is not None]) if count else None
        masks, scores = predictor.predict_tiled(
            image, boxes=boxes, point_coords=coords, point_labels=labels, tile=tile, progress=True
        )
        for row, k in enumerate(members):  # masks (N, 1, H, W), scores (N, 1)
            predicted[k] = (masks[row, 0], float(scores[row, 0]))
    yield from (predicted[k] for k in range(len(prompts)))


def predict_prompts(
    predictor: Any,
    entries: list[ImagePrompts],
    out: Path,
    *,
    fmt: str = "instances",
    skip_bad: bool = False,
    tile: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every prompt of ``entries`` and write the outputs (see the module docstring).

    Returns ``{"images": n, "prompts": n, "skipped": [records as in skipped.json], "results": [...],
    "seconds": s}``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    done = prompts_done = 0
    start = time.perf_counter()
    columns = [TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}")]
    with Progress(*columns, TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("images", total=len(entries), rate="")
        for entry in entries:
            before = len(skipped)
            prompts_done += _one_image(predictor, entry, out, fmt, skip_bad, tile, results, skipped)
            done += len(skipped) == before
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.2f} images/s")
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(results))
    (out / SKIPPED).write_text(json.dumps(skipped, indent=1) + "\n")
    return {
        "images": done,
        "prompts": prompts_done,
        "skipped": skipped,
        "results": results,
        "seconds": time.perf_counter() - start,
    }


def _one_image(
    predictor: Any,
    entry: ImagePrompts,
    out: Path,
    fmt: str,
    skip_bad: bool,
    tile: int | None,
    results: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
) -> int:
    """Predict and write one image's prompts; the number of prompts (0 for a skipped image)."""
    try:
        image = _read_rgb(entry.image)
    except (OSError, ValueError, SyntaxError) as err:  # what PIL raises for broken files
        if not skip_bad:
            raise PromptFileError(
                f"cannot read the image {str(entry.image)!r} ({err}); pass --skip-bad to skip it."
            ) from None
        print(f"samflow: skipped unreadable image {entry.image} ({err})", file=sys.stderr)
        skipped.append(
            {
                "file_name": entry.image.name,
                "path": str(entry.image),
                "image_id": entry.image_id,
                "prompts": len(entry.prompts),
                "error": f"{type(err).__name__}: {err}",
            }
        )
        return 0
    predicted = list(_predict_image(predictor, image, entry.prompts, tile))
    stem = entry.image.stem
    if fmt == "labels":
        label = np.zeros(image.shape[:2], np.uint16)
        best = np.full(image.shape[:2], -np.inf)
        for k, (mask, score) in enumerate(predicted):
            win = mask & (score > best)
            label[win], best[win] = k + 1, score
        (out / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(out / "labels" / f"{stem}.png")
    else:
        (out / "masks").mkdir(parents=True, exist_ok=True)
        for k, (mask, _) in enumerate(predicted):
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{stem}_{k}.png")
    for prompt, (mask, score) in zip(entry.prompts, predicted, strict=True):
        results.append(
            {
                "image_id": entry.image_id,
                "file_name": entry.image.name,
                "instance": prompt.name,
                "category_id": prompt.category_id,
                "segmentation": mask_to_rle(mask),
                "score": score,
            }
        )
    return len(predicted)


def _load_predictor(source: Path, sam_checkpoint: str | None, device: str | None) -> Any:
    from samflow.predictor import Predictor

    kwargs: dict[str, Any] = {"device": device} if device else {}
    if source.is_dir() and (source / "samflow.json").is_file():
        return Predictor.from_export(source, sam_checkpoint=sam_checkpoint, **kwargs)
    if source.is_file():
        return Predictor.from_checkpoint(source, sam_checkpoint=sam_checkpoint, **kwargs)
    return Predictor.from_run(source, sam_checkpoint=sam_checkpoint, **kwargs)


def main(argv: list[str]) -> int:
    """``samflow predict --prompts FILE ...`` (see the module docstring)."""
    parser = CommandParser(
        prog="samflow predict",
        description=__doc__.split("\n\n")[0],
        help_command="samflow predict --prompts FILE",
    )
    parser.add_argument("--model", required=True, help="a run folder, a .ckpt or a `samflow export` folder")
    parser.add_argument("--images", required=True, help="the folder of images to predict")
    parser.add_argument("--prompts", required=True, help="JSON, CSV, COCO annotations or a folder of masks")
    parser.add_argument("--out", required=True, help="the output folder (not an input folder)")
    parser.add_argument(
        "--format",
        choices=("instances", "labels"),
        default="instances",
        help="a mask PNG per prompt, or a label image per input image",
    )
    parser.add_argument(
        "--derive",
        choices=("box", "points"),
        default=None,
        help="COCO / mask prompts: the box (default), or points drawn inside the instance",
    )
    parser.add_argument(
        "--points",
        type=PositiveInt,
        default=None,
        help="points per instance with --derive points (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn points")
    parser.add_argument("--sam-checkpoint", default=None, help="the SAM file instead of the run's")
    parser.add_argument(
        "--tile", type=PositiveInt, default=None, help="tiled prediction with windows of N pixels"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the best there is)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    parser.add_argument("--skip-bad", action="store_true", help="report and skip unreadable images")
    args = parser.parse_args(argv)
    images, prompts, out = Path(args.images), Path(args.prompts), Path(args.out)
    entries = read_prompts(prompts, images, derive=args.derive, points=args.points, seed=args.seed)
    inputs = [images, prompts, *(e.image for e in entries)]
    check_outputs(out, inputs, planned_outputs(out, entries, args.format), args.overwrite)
    predictor = _load_predictor(Path(args.model), args.sam_checkpoint, args.device)
    summary = predict_prompts(
        predictor, entries, out, fmt=args.format, skip_bad=args.skip_bad, tile=args.tile
    )
    rate = summary["images"] / max(summary["seconds"], 1e-9)
    skipped = summary["skipped"]
    lost = sum(s["prompts"] for s in skipped)
    print(
        f"samflow: predicted {summary['prompts']} prompts on {summary['images']} images ({rate:.2f} images/s); "
        f"skipped {len(skipped)} unreadable"
        + (f" ({lost} prompts not predicted; listed in {out / SKIPPED})" if skipped else "")
    )
    print(f"samflow: model {args.model}")
    print(f"samflow: outputs in {out.resolve()}")
    return 0
