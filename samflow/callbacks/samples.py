"""Validation samples as pictures: the prompt, ground truth, prediction and error map of each row.

A grid row shows one prompt row of a validation batch, in the model's S x S input frame:

==============  ==================================================================================
panel           what it shows
==============  ==================================================================================
prompt          the image with its prompt: box (yellow), positive points (green), negative points
                (red), the mask prompt's outline (cyan)
ground truth    the ground truth overlaid in green on the image
prediction      the prediction (probability > threshold, by default ``model.threshold``) overlaid in
                orange on the image
errors          false positives in red and false negatives in blue on the dimmed grey image
<key>/<name>    panels plugins add through ``SamPlugin.sample_panels`` (e.g. HQ-SAM's HQ mask)
==============  ==================================================================================

A header strip names the panels; above each row a strip gives the image's id and its IoU as validation
scores that row (``EvaluationMixin.probabilities``: the logits resized to the image's original size,
then thresholded, against the row's ground truth at that size; the ``iou`` metric's kernel
``binary_iou``). The pictures are drawn with torchvision's ``draw_segmentation_masks``,
``draw_bounding_boxes`` and ``draw_keypoints``; the text with PIL.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import numpy as np
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torch import Tensor
from typing_extensions import override

from samflow.callbacks.resume import before_training
from samflow.callbacks.sample_drawing import SampleRow, row_iou, sample_grid, to_uint8
from samflow.console import local_log_dir
from samflow.metrics.functional.segmentation import binary_iou
from samflow.plugins import SamplePanel

#: The threshold of a module that declares none (``SampleGrid(threshold=None)``).
DEFAULT_THRESHOLD = 0.5


def batch_rows(
    batch: Any, outputs: dict[str, Any], threshold: float, keep: list[int] | None = None
) -> list[SampleRow]:
    """``SampleRow``s of a validation step's prompt rows (all, or those in ``keep``), on the CPU.

    ``outputs``: the step's ``{"out", "probs", "ctx"}`` (``probs`` in the S x S frame, what is drawn),
    with ``"original"`` and ``"targets"`` (each row's probabilities and ground truth at the image's
    original size, what the IoU is computed on; see ``row_ious``), and ``"model"``, the ``HookedSam``
    whose plugins may add panels (``PluginStack.sample_panels``).
    """
    out, probs = outputs["out"], outputs["probs"]
    ctx = outputs.get("ctx")
    stack: Any = getattr(outputs.get("model"), "plugins", None)
    panels: dict[str, SamplePanel] = {}
    if ctx is not None and hasattr(stack, "sample_panels"):
        panels = stack.sample_panels(out, ctx)
    rows = []
    row_mask = batch.row_mask  # each row's own ground truth (with COCO instances: its instance)
    images = out.image_index.tolist()  # one read of the rows' images, not one per row
    for n in range(len(images)) if keep is None else keep:
        i = images[n]
        h, w = (int(v) for v in batch.input_size[i])
        prob = probs[n].detach().float().cpu()
        target = row_mask[n].detach().float().cpu()
        iou = _row_iou(batch, outputs, n, i, threshold)
        has_box = batch.box is not None and (batch.has_box is None or bool(batch.has_box[n]))
        has_mask = batch.mask_prompt is not None and (
            batch.has_mask_prompt is None or bool(batch.has_mask_prompt[n])
        )
        rows.append(
            SampleRow(
                id=batch.names[i],
                image=batch.image[i].detach().float().cpu(),
                target=target,
                prob=prob,
                size=(h, w),
                iou=iou,
                box=batch.box[n].detach().cpu() if has_box else None,
                points=batch.points[n].detach().cpu() if batch.points is not None else None,
                labels=batch.point_labels[n].detach().cpu() if batch.point_labels is not None else None,
                mask_prompt=batch.mask_prompt[n].detach().cpu() if has_mask else None,
                panels={name: _panel_row(p, n) for name, p in panels.items()},
            )
        )
    return rows


def _panel_row(panel: SamplePanel, n: int) -> SamplePanel:
    """Row ``n`` of a plugin panel, on the CPU (as a panel of one row)."""

    def take(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[n : n + 1].detach().float().cpu()

    labels = panel.point_labels[n : n + 1].detach().cpu() if panel.point_labels is not None else None
    return SamplePanel(take(panel.values), panel.style, take(panel.points), labels)  # type: ignore[arg-type]


def row_ious(batch: Any, outputs: dict[str, Any], threshold: float) -> list[float]:
    """The IoU of each prompt row of a validation step, as validation's ``iou`` metric scores the row:
    ``binary_iou`` of its probabilities at the image's original size (``outputs["original"]``, which
    ``SamflowModule``'s validation step returns) against its ground truth there (``outputs["targets"]``).
    A step that returns only the S x S frame's ``probs`` gets the IoU inside the image in that frame."""
    return [
        _row_iou(batch, outputs, n, i, threshold) for n, i in enumerate(outputs["out"].image_index.tolist())
    ]


def _row_iou(batch: Any, outputs: dict[str, Any], n: int, image: int, threshold: float) -> float:
    """Row ``n``'s IoU (see ``row_ious``); ``image``: the row's image."""
    original, targets = outputs.get("original"), outputs.get("targets")
    if original is not None and targets is not None:
        return float(binary_iou(original[n].detach(), targets[n], threshold)[0])
    h, w = (int(v) for v in batch.input_size[image])
    return row_iou(outputs["probs"][n, 0, :h, :w] > threshold, batch.row_mask[n, 0, :h, :w] > 0.5)


class SampleGrid(Callback):
    """Pictures of validation images after every validation: ``samples/val_<stage>.png`` and W&B.

    - ``samples/val_sanity.png`` (before training; the sanity check Lightning repeats in a fit resumed
      from a checkpoint of an epoch end draws nothing) and ``samples/val_epoch<NNN>.png``: the first
      ``num_samples`` prompt rows of the first validation set (not shuffled: the same images every
      epoch), panels as described in ``samflow/callbacks/samples.py``. Under DDP, of the images the
      first process evaluated (the set's first part), so fewer when that part has fewer rows;
    - ``samples/val_best.png`` and ``samples/val_worst.png``: the ``num_extremes`` rows of the last
      validation with the highest and the lowest IoU (overwritten every validation; the run report
      shows them). Under DDP, of the images the first process evaluated;
    - W&B: ``val/samples``, the same images with the ground truth and the prediction as mask layers and
      the prompt as a box layer (points as small boxes), at the ``trainer/global_step`` of that
      validation's metrics.

    Args:
        num_samples: how many prompt rows of the first validation batches to show (0: none; the best
            and worst grids are still written).
        threshold: probability above which a predicted pixel is foreground, in the pictures and the IoU
            shown; default: the model's ``model.threshold`` (what ``samflow predict`` and the metrics
            use; 0.5 for a module without one). A value given here wins.
        num_extremes: rows in the best and worst grids (0 turns them off).
    """

    def __init__(self, num_samples: int = 8, threshold: float | None = None, num_extremes: int = 4) -> None:
        for name, value in (("num_samples", num_samples), ("num_extremes", num_extremes)):
            if value < 0:
                raise MisconfigurationException(
                    f"samples.{name} is {value}; give a count >= 0 (0 turns those pictures off)."
                )
        self.num_samples = num_samples
        self.threshold = threshold
        self.num_extremes = num_extremes
        self._rows: list[SampleRow] = []
        self._best: list[tuple[float, int, SampleRow]] = []
        self._worst: list[tuple[float, int, SampleRow]] = []
        self._seen = 0

    def threshold_for(self, pl_module: LightningModule | None) -> float:
        """The threshold in use: ``threshold`` when given, else ``pl_module.threshold`` (0.5 without one)."""
        if self.threshold is not None:
            return self.threshold
        return float(getattr(pl_module, "threshold", DEFAULT_THRESHOLD))

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows, self._best, self._worst, self._seen = [], [], [], 0

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or batch.mask is None or not isinstance(outputs, dict):
            return
        outputs = {**outputs, "model": getattr(pl_module, "model", None)}
        threshold = self.threshold_for(pl_module)
        missing = self.num_samples - len(self._rows)
        if missing > 0:
            rows = min(missing, outputs["out"].image_index.shape[0])
            self._rows += batch_rows(batch, outputs, threshold, list(range(rows)))
        if self.num_extremes > 0:
            self._track_extremes(batch, outputs, threshold)

    def _track_extremes(self, batch: Any, outputs: dict[str, Any], threshold: float) -> None:
        """Keep the ``num_extremes`` rows of highest and of lowest IoU seen so far (heaps)."""
        k = self.num_extremes
        wanted = []
        for n, iou in enumerate(row_ious(batch, outputs, threshold)):
            order = self._seen + n  # ties: the earlier row wins
            best = len(self._best) < k or (iou, -order) > (self._best[0][0], -self._best[0][1])
            worst = len(self._worst) < k or (-iou, -order) > (self._worst[0][0], -self._worst[0][1])
            if best or worst:
                wanted.append((n, iou, order, best, worst))
        self._seen += outputs["out"].image_index.shape[0]
        if not wanted:
            return
        rows = batch_rows(batch, outputs, threshold, [w[0] for w in wanted])
        for (_, iou, order, best, worst), row in zip(wanted, rows):
            if best:
                heapq.heappush(self._best, (iou, -order, row))
                if len(self._best) > k:
                    heapq.heappop(self._best)
            if worst:
                heapq.heappush(self._worst, (-iou, -order, row))
                if len(self._worst) > k:
                    heapq.heappop(self._worst)

    def extremes(self) -> tuple[list[SampleRow], list[SampleRow]]:
        """The best rows (highest IoU first) and the worst rows (lowest IoU first) of this validation."""
        best = [row for _, _, row in sorted(self._best, key=lambda e: (-e[0], e[1]))]
        worst = [row for _, _, row in sorted(self._worst, key=lambda e: (-e[0], e[1]))]
        return best, worst

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking and not before_training(trainer):
            return  # repeated in a fit resumed at an epoch end: those weights were drawn at their validation
        log_dir = local_log_dir(trainer) if trainer.is_global_zero else None
        best, worst = self.extremes()
        if not (self._rows or best or worst) or log_dir is None:
            return
        stage = "sanity" if trainer.sanity_checking else f"epoch{trainer.current_epoch:03d}"
        folder = Path(log_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        threshold = self.threshold_for(pl_module)
        if self._rows:
            Image.fromarray(sample_grid(self._rows, threshold)).save(folder / f"val_{stage}.png")
        for name, rows in (("best", best), ("worst", worst)):
            if rows:
                Image.fromarray(sample_grid(rows, threshold)).save(folder / f"val_{name}.png")
        if not self._rows:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                overlays = [wandb_image(row, threshold) for row in self._rows]
                # at the step Lightning logs this validation's metrics (the last training batch's), not
                # trainer.global_step, one later; through the logger, which numbers its rows
                step = trainer.fit_loop.epoch_loop._batches_that_stepped
                logger.log_metrics({"val/samples": overlays}, step=step)  # type: ignore[dict-item]


def wandb_image(row: SampleRow, threshold: float) -> Any:
    """A ``wandb.Image`` of the row: ground truth and prediction as mask layers, the prompt as boxes."""
    import wandb

    h, w = row.size
    picture = to_uint8(row.image).permute(1, 2, 0).numpy()
    pred = ((row.prob[0] > threshold).numpy()).astype(np.uint8)
    target = (row.target[0] > 0.5).numpy().astype(np.uint8)
    pred[h:], pred[:, w:], target[h:], target[:, w:] = 0, 0, 0, 0
    boxes = []
    if row.box is not None:
        boxes.append(_box(row.box.tolist(), 1, "box"))
    if row.points is not None:
        labels = row.labels.tolist() if row.labels is not None else [1] * len(row.points)
        for (x, y), label in zip(row.points.tolist(), labels):
            if label in (0, 1):
                boxes.append(_box([x - 2, y - 2, x + 2, y + 2], 2 if label == 1 else 3, None))
    layers = {
        "prompt": {
            "box_data": boxes,
            "class_labels": {1: "box", 2: "positive point", 3: "negative point"},
        }
    }
    masks = {
        "prediction": {"mask_data": pred, "class_labels": {1: "object"}},
        "ground_truth": {"mask_data": target, "class_labels": {1: "object"}},
    }
    return wandb.Image(
        picture, masks=masks, boxes=layers if boxes else None, caption=f"{row.id} IoU {row.iou:.3f}"
    )


def _box(xyxy: list[float], class_id: int, caption: str | None) -> dict[str, Any]:
    x0, y0, x1, y1 = xyxy
    box: dict[str, Any] = {
        "position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1},
        "domain": "pixel",
        "class_id": class_id,
    }
    if caption:
        box["box_caption"] = caption
    return box
