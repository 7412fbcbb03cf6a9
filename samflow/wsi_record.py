"""The record of a ``samflow predict-slide`` run (``samflow_slides.json`` in ``--out``) and ``--resume``.

Every run writes ``RECORD`` before its first slide's files: what makes the masks, as JSON values (files
by SHA-256, compared with ``samflow.outputs.record_differences``): the experiment file and the
arguments that override it, ``--ckpt`` and the SAM checkpoint, mpp, factor, threshold, tile, overlap,
batch size (a tile's probabilities differ in the last bits with the batch it runs in), ``--slide-mpp``,
the device (a GPU model, or the CPU, computes other bits), and each slide (its path and size, not its
bytes: a slide is gigabytes) with its annotations. The number of processes is not in it: they write
the bytes of one process (``samflow.wsi_predict``).

``--resume`` predicts the slides whose files are not all there (a slide's files appear together), so
the folder ends as an uninterrupted run's; it is refused in one line when the record differs (naming
what), or when the folder holds these slides' files without a record.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samflow.data.wsi.slide import SlideError
from samflow.outputs import device_kind, file_record, record_problem, write_whole

RECORD = "samflow_slides.json"


def slide_outputs(out: Path, slide: str | Path) -> list[Path]:
    """``<slide>_mask.tif``, ``<slide>.geojson`` and ``<slide>.json`` (Dice) in ``out``."""
    stem = Path(slide).stem
    return [out / f"{stem}{end}" for end in ("_mask.tif", ".geojson", ".json")]


def refuse_existing(outputs: Sequence[Path]) -> None:
    """Refuse outputs of an earlier run (as ``samflow predict`` does) unless ``--overwrite`` or ``--resume``."""
    existing = [str(o) for o in outputs if o.exists()]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise SlideError(
            f"predict-slide: {existing[0]}{more} exist(s) already; pass --overwrite to replace them, "
            "--resume to continue the run that wrote them, or choose another --out."
        )


def run_record(
    experiment: str,
    overrides: Sequence[str],
    ckpt: str | None,
    module: Any,
    settings: dict[str, Any],
    device: Any,
    slides: Sequence[str],
    annotations: Sequence[str | None],
) -> dict[str, Any]:
    """What makes a run's masks (``RECORD``), as JSON values: files by SHA-256. ``experiment``: its name
    or YAML; ``settings``: mpp, factor, threshold, tile, overlap, batch_size, slide_mpp."""

    from samflow.commands import resolve_experiment

    sam = dict(getattr(module, "hparams", None) or {}).get("sam")
    return {
        "experiment": file_record(resolve_experiment(experiment)),
        "overrides": list(overrides),
        "ckpt": file_record(ckpt),
        "sam_checkpoint": file_record(getattr(sam, "checkpoint", None)),
        **{key: settings[key] for key in sorted(settings)},
        "device": device_kind(device),
        "slides": {
            Path(slide).stem: {
                "path": str(Path(slide).resolve()),
                "bytes": Path(slide).stat().st_size,
                "annotations": file_record(truth),
            }
            for slide, truth in zip(slides, annotations, strict=True)
        },
    }


def done(out: Path, slide: str | Path, annotated: bool) -> bool:
    """Whether ``slide``'s files are all in ``out`` (its Dice file too when it has annotations)."""
    mask, geojson, dice = slide_outputs(out, slide)
    return mask.is_file() and geojson.is_file() and (dice.is_file() or not annotated)


def check_resume(out: Path, record: dict[str, Any], slides: Sequence[str]) -> None:
    """Refuse to continue the run in ``out`` when what made these slides' files there is unknown (no
    ``RECORD``) or differs from ``record``; one line (``record_problem``)."""
    earlier = [p for s in slides for p in slide_outputs(out, s) if p.exists()]
    held = f"{len(earlier)} files of these slides ({earlier[0]} ...)" if earlier else None
    redo = "pass --overwrite to predict the slides again, or choose another --out"
    problem = record_problem(out / RECORD, record, held, redo)
    if problem is not None:
        raise SlideError(f"predict-slide: {problem}")


def slides_left(
    out: Path, record: dict[str, Any] | None, slides: Sequence[str], resume: bool, group: Any = None
) -> list[int]:
    """The indices of ``slides`` this run predicts (every one without ``resume``), decided by process 0
    (``record``: its record, None on the others) and shared with every process of ``group``; a
    refusal (``check_resume``) stops every process with process 0's line. Process 0 then writes
    ``record``, before any slide's files."""
    from samflow.wsi_tiles import rank_and_world_in

    rank, world = rank_and_world_in(group)
    box: list[Any] = [None, None]
    if rank == 0:
        assert record is not None
        try:
            if resume:
                check_resume(out, record, slides)
                annotated = [entry["annotations"] is not None for entry in record["slides"].values()]
                box[0] = [i for i, s in enumerate(slides) if not done(out, s, annotated[i])]
            else:
                box[0] = list(range(len(slides)))
        except SlideError as err:
            box[1] = str(err)
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    if box[1] is not None:
        raise SlideError(box[1])
    if rank == 0 and record is not None:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=2) + "\n"
        write_whole(out / RECORD, lambda temp: temp.write_text(text))
    return list(box[0])
