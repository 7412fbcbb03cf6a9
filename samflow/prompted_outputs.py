"""What ``samflow predict --prompts`` writes in ``--out``, the checks before it writes, and the record
that lets a killed run be continued (``--resume``).

Each image's outputs are its masks (``masks/<stem>_<k>.png``) or label image (``labels/<stem>.png``)
and ``results/<stem>.json``, its part of ``results.json``, written after them. ``results.json`` (the
parts of every image, in the prompt file's order) and ``skipped.json`` are written last, so a run
continued with ``--resume`` (which predicts only the images whose outputs are not all there) ends with
the same files as a run that was never stopped. ``samflow_prompts.json`` (``RECORD``) holds what makes
the outputs; a continued run with other settings is refused naming what differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samflow.outputs import (
    case_clash,
    device_kind,
    file_record,
    final_path,
    partial_path,
    record_problem,
    write_whole,
)
from samflow.prompt_files import ImagePrompts, PromptFileError

RESULTS = "results.json"
SKIPPED = "skipped.json"
PARTS = "results"  # results/<stem>.json: one image's part of results.json
RECORD = "samflow_prompts.json"  # what makes the outputs of a folder


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's compressed RLE of a boolean (H, W) mask, ``counts`` as text (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(rle)


# ---- the files of a run ----
def image_outputs(out: Path, entry: ImagePrompts, fmt: str) -> list[Path]:
    """The files one image's prediction writes, its part of ``results.json`` last."""
    stem = entry.image.stem
    if fmt == "labels":
        files = [out / "labels" / f"{stem}.png"]
    else:
        files = [out / "masks" / f"{stem}_{k}.png" for k in range(len(entry.prompts))]
    return [*files, out / PARTS / f"{stem}.json"]


def planned_outputs(out: Path, entries: list[ImagePrompts], fmt: str) -> list[Path]:
    """The files the run writes; refused when two entries would write the same ones (their images
    share a stem, or one image is listed twice)."""
    family = "labels/{}.png" if fmt == "labels" else "masks/{}_<k>.png"
    clash = case_clash((family.format(entry.image.stem), entry.image) for entry in entries)
    if clash is not None and clash.first == clash.second:
        raise PromptFileError(
            f"the image {str(clash.first)!r} is listed twice in the prompts; give its prompts in one entry."
        )
    if clash is not None:
        raise PromptFileError(
            clash.message(
                "the images", "rename one, or predict them into different --out folders.", show=_quoted
            )
        )
    return [out / RESULTS, out / SKIPPED, *(p for entry in entries for p in image_outputs(out, entry, fmt))]


def _quoted(path: Path) -> str:
    return repr(str(path))


def images_left(out: Path, entries: list[ImagePrompts], fmt: str) -> list[ImagePrompts]:
    """The entries whose outputs are not all in ``out`` (``--resume`` predicts these)."""
    return [e for e in entries if not all(p.is_file() for p in image_outputs(out, e, fmt))]


def merged_results(out: Path, entries: list[ImagePrompts]) -> list[dict[str, Any]]:
    """``results.json``: the parts of the images that have one, in the order of ``entries``."""
    results: list[dict[str, Any]] = []
    for entry in entries:
        part = out / PARTS / f"{entry.image.stem}.json"
        if part.is_file():
            results += json.loads(part.read_text())
    return results


def check_outputs(out: Path, inputs: list[Path], planned: list[Path], keep: str | None) -> None:
    """Refuse an output folder that is, lies in or holds an input, and existing outputs unless
    ``keep`` (``"--overwrite"`` or ``"--resume"``) says what to do with them."""
    if out.exists() and not out.is_dir():
        raise PromptFileError(f"--out {str(out)!r} is a file, not a folder; choose a folder.")
    target = out.resolve()
    for item in inputs:
        real = item.resolve()
        if target == real or real in target.parents or (real.is_dir() and target in real.parents):
            raise PromptFileError(
                f"--out {str(out)!r} would write into the input {str(item)!r}; choose another folder."
            )
        if not real.is_dir() and target in real.parents:
            raise PromptFileError(f"--out {str(out)!r} holds the input {str(item)!r}; choose another folder.")
    existing = list(dict.fromkeys(p for p in planned if p.exists() or p.is_symlink()))
    if existing and keep is None:
        raise PromptFileError(
            f"{len(existing)} outputs exist already ({_shown(existing)}); pass --overwrite to replace them "
            "(an earlier or interrupted run's, of these images), --resume to continue the run that wrote "
            "them, or another --out."
        )
    inputs_real = {p.resolve() for p in inputs}
    for p in existing:
        if p.resolve() in inputs_real:
            raise PromptFileError(f"the output {str(p)!r} is a link to an input; refused.")


def _shown(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")


def earlier_outputs(out: Path, entries: list[ImagePrompts]) -> list[Path]:
    """The files in ``out`` an earlier run on these images wrote, in either format: ``results.json``,
    ``skipped.json``, ``labels/<stem>.png``, ``results/<stem>.json`` and every ``masks/<stem>_<k>.png``
    (also a k this run does not write: an earlier run with more prompts). ``--overwrite`` removes them
    before anything runs, so no stale mask outlives the run and an interrupted run leaves no
    ``results.json``."""
    stems = {entry.image.stem for entry in entries}
    found = _named_outputs(out, stems) + [path for path in _listed(out / "masks") if _is_mask_of(path, stems)]
    return [p for p in found if p.exists() or p.is_symlink()]


def leftovers(out: Path, entries: list[ImagePrompts]) -> list[Path]:
    """The temporaries (``partial_path``) of ``earlier_outputs``'s files that a killed run left in
    ``out``: not outputs (they never make a run need ``--overwrite``), removed before the next run writes."""
    stems = {entry.image.stem for entry in entries}
    found = [partial_path(p) for p in _named_outputs(out, stems)]
    for path in _listed(out / "masks"):
        final = final_path(path)
        if final is not None and _is_mask_of(final, stems):
            found.append(path)
    return [p for p in found if p.exists() or p.is_symlink()]


def _named_outputs(out: Path, stems: set[str]) -> list[Path]:
    """The outputs whose names the images' stems give (the masks' count depends on the prompts)."""
    named = [out / RESULTS, out / SKIPPED]
    for stem in sorted(stems):
        named += [out / "labels" / f"{stem}.png", out / PARTS / f"{stem}.json"]
    return named


def _listed(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _is_mask_of(path: Path, stems: set[str]) -> bool:
    """Whether ``path`` is named ``<stem>_<k>.png`` for one of ``stems``."""
    stem, _, k = path.stem.rpartition("_")
    return path.suffix == ".png" and stem in stems and k.isdigit()


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda tmp: tmp.write_text(text))


def write_png(path: Path, image: Image.Image) -> None:
    """The PNG ``path``, whole or not at all: an interrupted run leaves at most its hidden temporary
    (``leftovers``: the next run removes it), never a truncated PNG under an output's name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda tmp: image.save(tmp, format="PNG"))


# ---- the record (RECORD) ----
def weightsfile_record(model: Path) -> Path | None:
    """The weights file ``--model`` loads: an export's adapter, a checkpoint, a run folder's checkpoint
    (None for a path that is none of these: loading it says why)."""
    from samflow.export import ADAPTER
    from samflow.predictor_types import PredictorError
    from samflow.rebuild import run_files

    if model.is_dir() and (model / "samflow.json").is_file():
        return model / ADAPTER
    try:
        return run_files(model)[0]
    except PredictorError:
        return None


def run_record(
    *,
    model: Path,
    sam_checkpoint: str | None,
    prompts: Path,
    images: Path,
    fmt: str,
    derive: str | None,
    points: int | None,
    seed: int,
    tile: int | None,
    device: Any,
) -> dict[str, Any]:
    """What makes a run's outputs (``RECORD``), as JSON values: files by SHA-256, the device (a
    ``torch.device``) by what computes on it."""
    return {
        "model": file_record(weightsfile_record(model)) or {"path": str(model.resolve()), "sha256": None},
        "sam_checkpoint": file_record(sam_checkpoint),
        "prompts": file_record(prompts),
        "images": str(images.resolve()),
        "format": fmt,
        "derive": derive or "box",  # the defaults the prompt readers use
        "points": points or 1,
        "seed": seed,
        "tile": tile,
        "device": device_kind(device),
    }


def check_resume(out: Path, record: dict[str, Any], earlier: list[Path]) -> None:
    """Refuse to continue the run in ``out`` (``earlier``: the outputs of these images there) when what
    made its outputs is unknown (no ``RECORD``) or differs from ``record``; one line (``record_problem``)."""
    held = f"{len(earlier)} outputs of these images ({_shown(earlier)})" if earlier else None
    problem = record_problem(
        out / RECORD, record, held, "pass --overwrite to predict them again, or another --out"
    )
    if problem is not None:
        raise PromptFileError(f"--out: {problem}")


def write_record(out: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as ``out``'s ``RECORD`` (whole), replacing an earlier one."""
    write_text(out / RECORD, json.dumps(record, indent=2) + "\n")
