"""``samflow predict --prompts FILE``: a trained model on a folder of images, one mask per prompt.

    samflow predict --model RUN_OR_CKPT_OR_EXPORT --images DIR --prompts FILE --out DIR
                    [--format instances|labels] [--derive box|points] [--points N] [--seed N]
                    [--sam-checkpoint PATH] [--tile N] [--overwrite | --resume] [--skip-bad]
                    [--device DEV]

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
prompts overlap the higher score wins), ``results/<stem>.json`` per image (its part of
``results.json``, written after its masks), ``results.json``: COCO results (``image_id``,
``category_id``, ``segmentation`` as RLE, ``score``: the model's IoU prediction; every image's part in
the prompt file's order), ``skipped.json``: the images skipped as unreadable (``file_name``, ``path``,
``image_id``, ``prompts``, ``error``; an empty list when none was), and ``samflow_prompts.json``, the
record of what makes the outputs, written by every run before its first output: the model (the
weights file it loads: a run's checkpoint, the checkpoint, an export's adapter, by SHA-256), the
``--sam-checkpoint`` and prompt file (or mask folder) by SHA-256, ``--format``, ``--derive``,
``--points``, ``--seed``, ``--tile`` and the images folder. The output folder may not be or hold an
input (images, prompt file, masks); existing outputs of these images (an earlier or interrupted run's,
in either format) are refused unless ``--overwrite``, which removes them all before the run (other
files are left alone), or ``--resume``. ``results.json`` is written last, so a run without it did not
finish. Every file is written whole (under a hidden temporary name, ``.<name>.partial``, renamed when
complete): an interrupted run leaves no truncated PNG under an output's name, and the next run on these
images removes its temporaries (they never count as outputs). A run holds ``--out``'s lock file
(``.predict.lock``, ``samflow.outputs.PREDICT_LOCK``) from these checks, before the model is loaded, to its
end: a second run into the same folder at the same moment is refused in one line naming the process
(a killed run holds nothing).

``--resume`` continues a killed run (started with or without it): the images whose outputs are all in
``--out`` are not predicted again (no forward), the others are, and ``results.json`` and
``skipped.json`` are written anew, so the folder ends byte for byte as an uninterrupted run's (an image
skipped as unreadable has no outputs: it is read again). It is refused in one line, exit 1, when the
record's settings differ from this run's (naming each: ``seed: 0 -> 1``; files compared by SHA-256,
not by path), when the folder holds outputs of these images but no record, and with ``--overwrite``.

Two images whose outputs would share a name (``a.png`` and ``a.jpg``, or ``a.png`` and ``A.png``: one
file on a case-insensitive disk) and a prompt file with no prompt for any image are refused. An
unreadable image stops the run naming it, or with ``--skip-bad`` is reported, skipped, listed in
``skipped.json`` and counted at the end; a run in which every image with prompts was skipped (nothing
predicted) ends with one error line naming ``skipped.json``, exit status 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samflow.callbacks.run_folder import hold_folder
from samflow.outputs import PREDICT_LOCK
from samflow.prompt_files import ImagePrompts, Prompt, PromptFileError, read_prompts
from samflow.prompted_outputs import (
    PARTS,
    RECORD,
    RESULTS,
    SKIPPED,
    check_outputs,
    check_resume,
    earlier_outputs,
    images_left,
    leftovers,
    mask_to_rle,
    merged_results,
    planned_outputs,
    run_record,
    write_png,
    write_record,
    write_text,
)
from samflow.usage import CommandParser, PositiveInt, require_extra


def _read_rgb(path: Path) -> np.ndarray:
    from samflow.data.reading import read_image

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
    resume: bool = False,
) -> dict[str, Any]:
    """Predict every prompt of ``entries`` (with ``resume``: of those whose outputs are not all in
    ``out``) and write the outputs (see the module docstring).

    Returns ``{"images": n predicted, "prompts": n predicted, "skipped": [records as in skipped.json],
    "results": [as in results.json], "seconds": s}``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    todo = images_left(out, entries, fmt) if resume else entries
    if resume:
        done_before = len(entries) - len(todo)
        rest = f"predicting the other {len(todo)}" if todo else "nothing left to predict"
        print(
            f"samflow: {done_before} of {len(entries)} images have all their outputs in {out} already; {rest}."
        )
    skipped: list[dict[str, Any]] = []
    done = prompts_done = 0
    start = time.perf_counter()
    columns = [TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}")]
    with Progress(*columns, TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("images", total=len(todo), rate="")
        for entry in todo:
            before = len(skipped)
            prompts_done += _one_image(predictor, entry, out, fmt, skip_bad, tile, skipped)
            done += len(skipped) == before
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.2f} images/s")
    # an image skipped is never done, so a continued run reads it again: skipped.json is whole too
    results = merged_results(out, entries)
    write_text(out / SKIPPED, json.dumps(skipped, indent=1) + "\n")
    write_text(out / RESULTS, json.dumps(results))  # last: a run without it did not finish
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
    skipped: list[dict[str, Any]],
) -> int:
    """Predict and write one image's prompts, its part of results.json last; the number of prompts
    (0 for a skipped image)."""
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
        write_png(out / "labels" / f"{stem}.png", Image.fromarray(label))
    else:
        for k, (mask, _) in enumerate(predicted):
            write_png(out / "masks" / f"{stem}_{k}.png", Image.fromarray(mask.astype(np.uint8) * 255))
    results = [
        {
            "image_id": entry.image_id,
            "file_name": entry.image.name,
            "instance": prompt.name,
            "category_id": prompt.category_id,
            "segmentation": mask_to_rle(mask),
            "score": score,
        }
        for prompt, (mask, score) in zip(entry.prompts, predicted, strict=True)
    ]
    write_text(out / PARTS / f"{stem}.json", json.dumps(results))
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
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"continue a killed run in --out: predict only the images whose outputs are not all there "
        f"(refused when {RECORD} holds other settings)",
    )
    parser.add_argument("--skip-bad", action="store_true", help="report and skip unreadable images")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        raise PromptFileError(
            "--resume continues the run in --out and --overwrite starts it again: pass one of them."
        )
    require_extra("pycocotools.mask", "coco", "samflow predict --prompts (results.json holds COCO RLE masks)")
    images, prompts, out = Path(args.images), Path(args.prompts), Path(args.out)
    entries = read_prompts(prompts, images, derive=args.derive, points=args.points, seed=args.seed)
    if not any(entry.prompts for entry in entries):
        raise PromptFileError(
            f"{prompts}: no prompt for any image of --images {str(images)!r}, so nothing to predict; check "
            "that the file names its images as they are in that folder."
        )
    inputs = [images, prompts, *(e.image for e in entries)]
    keep = "--overwrite" if args.overwrite else "--resume" if args.resume else None
    # no input folder (nor a folder of another run's outputs) gets the lock file; the model is loaded after
    check_outputs(
        out, inputs, planned_outputs(out, entries, args.format) + earlier_outputs(out, entries), keep
    )
    lock = hold_folder(out, PREDICT_LOCK, lambda holder: PromptFileError(_busy(out, holder)))
    try:
        return _predict(args, entries, inputs, keep)
    finally:
        lock.release()


def _busy(out: Path, holder: str) -> str:
    """The one line refusing an ``--out`` that another live samflow process writes into now."""
    return (
        f"--out {str(out)!r} is being written by another samflow process ({holder}); wait until it ends, "
        "or choose another --out."
    )


def _predict(args: Any, entries: list[ImagePrompts], inputs: list[Path], keep: str | None) -> int:
    """``main`` once the output folder's lock (``PREDICT_LOCK``) is held: its outputs checked again
    (another run may have written some before it ended), the model loaded, the prompts predicted."""
    images, prompts, out = Path(args.images), Path(args.prompts), Path(args.out)
    planned = planned_outputs(out, entries, args.format)
    earlier = earlier_outputs(out, entries)
    check_outputs(out, inputs, planned + earlier, keep)
    settings = {k: getattr(args, k) for k in ("derive", "points", "seed", "tile", "sam_checkpoint")}
    predictor = _load_predictor(Path(args.model), args.sam_checkpoint, args.device)
    record = run_record(
        model=Path(args.model),
        prompts=prompts,
        images=images,
        fmt=args.format,
        device=predictor.device,
        **settings,
    )
    if args.resume:
        check_resume(out, record, earlier)
    # a continued run's results.json and skipped.json are written again, last
    gone = earlier if args.overwrite else [out / RESULTS, out / SKIPPED] if args.resume else []
    for path in [*gone, *leftovers(out, entries)]:
        path.unlink(missing_ok=True)
    write_record(out, record)  # before the first output
    summary = predict_prompts(
        predictor, entries, out, fmt=args.format, skip_bad=args.skip_bad, tile=args.tile, resume=args.resume
    )
    rate = summary["images"] / max(summary["seconds"], 1e-9)
    skipped = summary["skipped"]
    if skipped and not summary["results"]:
        raise PromptFileError(
            f"nothing predicted: every image with prompts was unreadable ({len(skipped)} skipped, listed in "
            f"{out / SKIPPED}); fix or replace them, then run again with --overwrite."
        )
    lost = sum(s["prompts"] for s in skipped)
    print(
        f"samflow: predicted {summary['prompts']} prompts on {summary['images']} images ({rate:.2f} images/s); "
        f"skipped {len(skipped)} unreadable"
        + (f" ({lost} prompts not predicted; listed in {out / SKIPPED})" if skipped else "")
    )
    print(f"samflow: model {args.model}")
    print(f"samflow: outputs in {out.resolve()}")
    return 0
