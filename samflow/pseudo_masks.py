"""``samflow pseudo-masks --experiment NAME --ckpt CKPT --out FILE``: a trained selection's pseudo masks.

After a selection plugin (SAPNet) has trained on the proposal bags of ``samflow proposals``, this
command runs it once more over the training split (same experiment, same proposal store, weights from
``CKPT``) and writes, for every instance, the proposal it selects as a COCO instances file: the
input of the student (``samflow student``).

**Which proposal.** A plugin that chooses among ``batch.proposals`` reports its choice per prompt row
in ``out.extras`` as an object with a ``pseudo_index`` tensor (N,) (SAPNet's ``SapnetResult``: the
proposal whose box has the highest IoU with the final box after PRM and BMS). Exactly one such
report is needed. The plugin's ``losses`` hook is what computes it, so the command runs the model and
its loss terms under ``torch.no_grad`` in eval mode; the base losses (``model.losses``) are not part
of a point-supervised experiment and are skipped here.

**Output.** A COCO instances JSON (``images`` and ``categories`` of the training file, original
category ids) whose ``annotations`` are the pseudo masks: ``id`` and ``image_id`` of the source
annotation, ``category_id``, ``segmentation`` (the chosen proposal's RLE at the original size),
``area``, ``bbox`` (``[x, y, w, h]`` of the mask), ``iscrowd`` of the source annotation (1 only for
the crowd regions that ``data.crowd: keep`` makes rows, so the student's data still tells them apart),
``point`` (the prompt point), ``proposal_index`` and ``score`` (SAM's predicted IoU of that
proposal); when the report also has an
``mps_index`` (N, R) (SAPNet: the proposals ranked 2, 4, 6 by the stage-1 score), ``mps_proposal_index``
and ``mps_segmentation`` (their RLEs), which ``samflow student`` adds as MPS supervision. ``info.samflow_pseudo_masks``
records the checkpoint, the proposal store's key and the mean IoU of the pseudo masks with the
annotation masks (a diagnostic; the annotation masks are used for nothing else) and ``left_out``: each
annotation of the training file without a pseudo mask, with its ``id``, ``image_id`` and ``reason``
(``iscrowd (data.crowd: skip)``, ``empty mask``, or an ``image_id`` not in the file's ``images``).

**Refusals.** Before anything runs: a ``batch_size`` below 1, an ``out`` that is a folder (or lies
under a file) or one of the inputs (the training annotations, the proposal store's file, the
checkpoint; ``--overwrite`` never replaces those), and a proposal store made with another SAM than the
experiment's (as ``samflow fit`` refuses).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samflow.data.coco import CocoDataModule, CocoInstances
from samflow.data.coco_batch import CocoBatch, collate_coco
from samflow.data.coco_file import makes_row
from samflow.data.coco_masks import decode_segmentation
from samflow.data.coco_proposals import sam_checksum
from samflow.data.errors import DataError
from samflow.outputs import write_whole
from samflow.usage import CommandParser, PositiveInt

__all__ = ["left_out", "pseudo_index_of", "selection_report", "write_pseudo_masks"]


def pseudo_index_of(extras: dict[str, Any]) -> Tensor:
    """The (N,) ``pseudo_index`` of the one selection report in ``out.extras`` (module docstring)."""
    return selection_report(extras).pseudo_index


def selection_report(extras: dict[str, Any]) -> Any:
    """The one value of ``out.extras`` with a ``pseudo_index`` tensor (module docstring)."""
    found = {k: v for k, v in extras.items() if isinstance(getattr(v, "pseudo_index", None), Tensor)}
    if len(found) != 1:
        raise DataError(
            "samflow pseudo-masks: the experiment needs exactly one plugin that selects among batch.proposals "
            f"(reports pseudo_index in out.extras, as SAPNet); found {sorted(found) or 'none'}."
        )
    return next(iter(found.values()))


def _decode(rle: dict[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_api

    return mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def _xywh(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _iscrowd(batch: CocoBatch, row: int) -> int:
    """The ``iscrowd`` flag (0 / 1) of the annotation of prompt ``row``: a crowd region kept as a row
    (``crowd: keep``) stays a crowd region in the pseudo-mask file."""
    return int(batch.iscrowd[row]) if batch.iscrowd is not None else 0


def _refuse_a_folder(out: Path) -> None:
    """A DataError when ``out``, the JSON file to write, is a folder or lies under a file."""
    if out.is_dir():
        raise DataError(
            f"samflow pseudo-masks: --out {out} is a folder; give the JSON file to write "
            f"(e.g. {out / 'pseudo_masks.json'})."
        )
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DataError(
            f"samflow pseudo-masks: --out {out} lies under the file {blocking}; choose another --out."
        )


def _refuse_an_input(out: Path, dataset: CocoInstances, checkpoint: str) -> None:
    """A DataError when ``out`` is the training annotations, the proposal store's file or the checkpoint."""
    assert dataset.proposals is not None
    inputs = {"training annotations": dataset.file, "proposal store": dataset.proposals.file}
    if checkpoint:
        inputs["checkpoint"] = Path(checkpoint)
    for what, path in inputs.items():
        if out.resolve() == path.expanduser().resolve():
            raise DataError(
                f"samflow pseudo-masks: --out {out} is an input of samflow pseudo-masks (the {what}); "
                "choose another --out (--overwrite never replaces an input)."
            )


def left_out(dataset: CocoInstances, written: set[int]) -> list[dict[str, Any]]:
    """Each annotation of ``dataset``'s file whose id is not in ``written``, with the reason it has no row."""
    source = json.loads(dataset.file.read_text())
    images = {int(img["id"]): img for img in source["images"]}
    missing: list[dict[str, Any]] = []
    for ann in source["annotations"]:
        if ann.get("id") in written:
            continue
        img = images.get(int(ann["image_id"]))
        if img is None:
            reason = f"image_id {ann['image_id']} is not in the file's images"
        elif not makes_row(ann, dataset.crowd):
            reason = "iscrowd (data.crowd: skip)"
        elif not decode_segmentation(ann["segmentation"], int(img["height"]), int(img["width"])).any():
            reason = "empty mask"
        else:
            reason = "no prompt row of the data"
        missing.append({"id": ann.get("id"), "image_id": ann["image_id"], "reason": reason})
    return missing


@torch.no_grad()
def write_pseudo_masks(
    module: Any,
    dataset: CocoInstances,
    out: str | Path,
    *,
    batch_size: int = 1,
    device: Any = "cpu",
    checkpoint: str = "",
    progress: Callable[[int], object] | None = None,
) -> dict[str, float]:
    """Write the pseudo-mask file ``out`` for ``dataset`` (with proposals); return ``{instances, mean_iou,
    left_out}`` (module docstring).

    ``module`` is a ``SamflowModule`` holding the trained selection plugin.
    """
    if dataset.proposals is None:
        raise DataError(
            f"samflow pseudo-masks: the training split ({dataset.file}) has no proposal store; set "
            "data.init_args.proposals to the folder `samflow proposals` wrote."
        )
    if batch_size < 1:
        raise DataError(f"samflow pseudo-masks: batch_size {batch_size} must be >= 1.")
    path = Path(out).expanduser()
    _refuse_a_folder(path)
    _refuse_an_input(path, dataset, checkpoint)
    dataset.proposals.check_sam(sam_checksum(module.model.sam), "the experiment's model.sam")
    was_training = module.training
    module.eval().to(device)
    annotations: list[dict[str, Any]] = []
    ious: list[float] = []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch: CocoBatch = collate_coco(items)
            if batch.num_rows:
                assert batch.proposal_rles is not None and batch.proposal_scores is not None
                assert batch.category_ids is not None and batch.ann_ids is not None
                assert batch.points_original is not None
                moved = batch.to(device)
                output, ctx = module(moved)
                module.plugins.losses(output, moved, ctx)  # the selection is made in the losses hook
                report = selection_report(output.extras)
                chosen = report.pseudo_index.cpu().tolist()
                mps = getattr(report, "mps_index", None)
                mps_rows = mps.cpu().tolist() if isinstance(mps, Tensor) else None
                first = torch.cumsum(torch.bincount(batch.image_index, minlength=batch.num_images), 0)
                for r, k in enumerate(chosen):
                    b = int(batch.image_index[r])
                    j = r - (int(first[b - 1]) if b else 0)  # the row's instance within its image
                    rle = batch.proposal_rles[r][k]
                    mask = _decode(rle)
                    truth = batch.instance_masks[b][j].numpy()
                    union = np.logical_or(mask, truth).sum()
                    ious.append(float(np.logical_and(mask, truth).sum() / union) if union else 0.0)
                    annotations.append(
                        {
                            "id": int(batch.ann_ids[r]),
                            "image_id": batch.image_ids[b],
                            "category_id": int(batch.category_ids[r]),
                            "segmentation": rle,
                            "area": float(mask.sum()),
                            "bbox": _xywh(mask),
                            "iscrowd": _iscrowd(batch, r),
                            "point": [round(v, 4) for v in batch.points_original[r, 0].tolist()],
                            "proposal_index": int(k),
                            "score": round(float(batch.proposal_scores[r, k]), 6),
                        }
                    )
                    if mps_rows is not None:  # MPS: lower-ranked proposals as extra student targets
                        annotations[-1]["mps_proposal_index"] = [int(i) for i in mps_rows[r]]
                        annotations[-1]["mps_segmentation"] = [batch.proposal_rles[r][i] for i in mps_rows[r]]
            if progress is not None:
                progress(len(items))
    finally:
        module.train(was_training)
    missing = left_out(dataset, {a["id"] for a in annotations})
    stats = {
        "instances": float(len(annotations)),
        "mean_iou": float(np.mean(ious)) if ious else float("nan"),
        "left_out": float(len(missing)),
    }
    info = {
        "samflow_pseudo_masks": {
            "checkpoint": checkpoint,
            "proposals": str(dataset.proposals.file),
            "proposals_key": dataset.proposals.key,
            "mean_iou_with_annotations": stats["mean_iou"] if ious else None,  # JSON has no NaN
            "left_out": missing,
        }
    }
    images = [{k: img[k] for k in ("id", "file_name", "height", "width")} for img in dataset.images]
    cats = [{"id": c, "name": name} for c, name in sorted(dataset.categories.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"info": info, "images": images, "categories": cats, "annotations": annotations})
    write_whole(path, lambda tmp: tmp.write_text(text))
    return stats


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="samflow pseudo-masks",
        description="Write the pseudo masks a trained selection plugin (SAPNet) picks among the stored proposals "
        "of the experiment's training split, as a COCO instances file for `samflow student`. Other arguments "
        "override the experiment.",
    )
    p.add_argument(
        "--experiment", required=True, help="experiment name or YAML path (the one `samflow fit` ran)"
    )
    p.add_argument(
        "--ckpt", required=True, help="checkpoint of that fit (runs/<experiment>/version_N/checkpoints/...)"
    )
    p.add_argument(
        "--out", required=True, help="the COCO JSON to write (refused if it exists, unless --overwrite)"
    )
    p.add_argument("--batch-size", type=PositiveInt, default=1, help="images per pass")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when a GPU is there)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input)")
    return p


def main(argv: list[str]) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from samflow.commands import build_experiment
    from samflow.rebuild import load_trained_checkpoint

    opts, overrides = _parser().parse_known_args(argv)
    out = Path(opts.out).expanduser()
    _refuse_a_folder(out)
    if out.exists() and not opts.overwrite:
        raise DataError(f"samflow pseudo-masks: {out} exists; choose another --out or pass --overwrite.")
    ckpt = Path(opts.ckpt).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"samflow pseudo-masks: checkpoint {ckpt} not found.")
    module, datamodule = build_experiment(opts.experiment, overrides)
    if not isinstance(datamodule, CocoDataModule):
        raise DataError(
            f"samflow pseudo-masks: the experiment's data is {type(datamodule).__name__}; it needs "
            "data: {class_path: samflow.data.coco.CocoDataModule, init_args: {proposals: ...}}."
        )
    if not datamodule.proposals:
        raise DataError(
            "samflow pseudo-masks: the experiment's data has no proposal store; set data.init_args.proposals to "
            "the folder `samflow proposals` wrote (the one the fit trained on)."
        )
    dataset = datamodule.dataset("train")
    load_trained_checkpoint(module.model, ckpt)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    columns = [TextColumn("samflow pseudo-masks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task("images", total=len(dataset))
        stats = write_pseudo_masks(
            module,
            dataset,
            out,
            batch_size=opts.batch_size,
            device=device,
            checkpoint=str(ckpt),
            progress=lambda n: bar.advance(task, n),
        )
    print(
        f"samflow pseudo-masks: {int(stats['instances'])} pseudo masks -> {out} "
        f"(mean IoU with the annotation masks {stats['mean_iou']:.4f}); {int(stats['left_out'])} annotation(s) "
        "of the input without one, each with its reason in info.samflow_pseudo_masks.left_out"
    )
    return 0
