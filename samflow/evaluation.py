"""Evaluation of ``SamflowModule``, per evaluation set, at each image's original resolution.

``EvalTally`` holds the images and the loss of one set as sums; ``EvaluationMixin``, the base class of
``SamflowModule``, keeps a ``MetricCollection`` and an ``EvalTally`` per set and reduces them over
processes at the epoch's end. ``row_targets`` gives each prompt row the mask it is scored against.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from samflow.batch import SamBatch
from samflow.metrics.registry import build_metrics
from samflow.sam import SamOutput, upcast

if TYPE_CHECKING:
    from samflow.plugins import DecoderContext, PluginStack


class EvalTally(Metric):
    """Images and loss of one evaluation set, as sums (``dist_reduce_fx="sum"``).

    ``images`` counts the images evaluated; ``loss`` is the row-weighted mean of the batch losses,
    ``Σ_b r_b·L_b / Σ_b r_b`` over batches of r_b prompt rows: the mean of per-row losses whenever a
    batch's loss is the mean of its rows' (all built-in losses but ``balanced_bce`` with
    ``per_image: false``, whose weight depends on the batch), so it does not depend on which images
    share a batch, also with several rows per image (COCO instances). Sums reduce exactly over
    processes whatever images each one evaluated, unlike a mean of per-process means.
    """

    is_differentiable = False
    full_state_update = False

    images: Tensor
    loss_sum: Tensor
    loss_rows: Tensor
    nonfinite: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("loss_rows", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nonfinite", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        images: int,
        loss: Tensor | None = None,
        rows: int | None = None,
        nonfinite: Tensor | None = None,
    ) -> None:
        """Add a batch of ``images`` images and, when it has ground truth, its loss (a scalar, the mean
        over its ``rows`` prompt rows; default one row per image); ``nonfinite``: how many of its rows
        predicted a NaN or infinite value (a tensor on the device: counted without a host sync)."""
        self.images += images
        if nonfinite is not None:
            self.nonfinite += nonfinite.to(self.nonfinite)
        if loss is not None:
            weight = images if rows is None else rows
            self.loss_sum += torch.as_tensor(loss).detach().to(self.loss_sum) * weight
            self.loss_rows += weight

    def compute(self) -> dict[str, Tensor]:
        loss = self.loss_sum / self.loss_rows  # NaN without ground truth
        return {
            "images": self.images.clone(),
            "loss_rows": self.loss_rows.clone(),
            "loss": loss,
            "nonfinite": self.nonfinite.clone(),
        }


def row_targets(batch: SamBatch, image_index: Tensor) -> list[Tensor]:
    """The ground truth of each prompt row (``image_index``: the rows' images) at its image's original
    size, bool (H, W): the row's own instance in a batch with ``instance_masks`` (``CocoBatch``: one
    row per instance, an image's rows in the order of its masks), else its image's ``gt_original``."""
    assert batch.gt_original is not None
    images = image_index.tolist()
    instances = getattr(batch, "instance_masks", None)
    if not instances:
        return [batch.gt_original[i] for i in images]
    counts = [m.shape[0] for m in instances]
    taken = [0] * len(instances)
    targets = []
    for i in images:
        if taken[i] < counts[i]:
            targets.append(instances[i][taken[i]])
        taken[i] += 1
    if taken != counts:
        raise ValueError(
            f"the batch of {batch.names[:3]} has {taken} prompt row(s) per image but {counts} instance "
            "mask(s): each row is scored against its own instance, so a plugin must not add or drop "
            "evaluation rows of a batch with instance_masks."
        )
    return targets


class EvaluationMixin(LightningModule):
    """The evaluation steps of ``SamflowModule`` (its base class, not used on its own).

    ``SamflowModule``'s validation / test hooks call these; ``predict_step`` calls ``probabilities``.
    """

    if TYPE_CHECKING:  # set and defined by SamflowModule
        metric_spec: list[str | dict[str, Any]] | dict[str, Any]
        threshold: float
        _metrics: dict[str, MetricCollection]
        _tallies: dict[str, EvalTally]

        @property
        def plugins(self) -> PluginStack: ...

        def upsample(self, logits: Tensor) -> Tensor: ...

        def compute_losses(
            self, out: SamOutput, batch: SamBatch, ctx: DecoderContext
        ) -> dict[str, Tensor]: ...

    # ---- evaluation at the original resolution ----
    def frame_logits(self, out: SamOutput) -> Tensor:
        """Logits of each prompt row in the input frame (N, 1, S, S), in float32 (float64 stays) also
        under bf16 autocast."""
        return upcast(self.upsample(out.pred))

    def frame_probabilities(self, out: SamOutput, logits: Tensor | None = None) -> Tensor:
        """Foreground probability of each prompt row in the input frame (N, 1, S, S), in float32 (float64
        stays) also under bf16 autocast: what the sample pictures threshold. ``logits``:
        ``frame_logits(out)``, when computed already."""
        return (self.frame_logits(out) if logits is None else logits).sigmoid()

    def probabilities(self, out: SamOutput, batch: SamBatch, logits: Tensor | None = None) -> list[Tensor]:
        """Foreground probability of each prompt row at its image's original size: list of (H, W).

        As ``Sam.postprocess_masks`` and ``Predictor.postprocess``: the logits in the S x S frame are
        cropped to the image and resized to (H, W), and only then made probabilities, so ``p > t`` is
        ``Predictor``'s ``logit > log(t / (1 - t))`` at every pixel (resizing probabilities instead
        moves the edge of a confident mask). ``logits``: ``frame_logits(out)``, when computed already.
        """
        full = self.frame_logits(out) if logits is None else logits
        maps = []
        for row, image in enumerate(out.image_index.tolist()):
            h, w = batch.input_size[image].tolist()
            size = batch.original_size[image].tolist()
            crop = full[row : row + 1, :, :h, :w]
            maps.append(F.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0, 0].sigmoid())
        return maps

    # Under DDP each process evaluates its own images (SegmentationDataModule shards val / test sets
    # without repeating any, so processes may run different numbers of batches). Nothing in the
    # evaluation steps talks to the other processes; at the epoch's end every process reduces the
    # states of every set, in the same order, with or without batches of that set: metric states and
    # EvalTally are sums (or concatenations), so the reduced values are those of one process.
    def _metric_set(self, stage: str, dataloader_idx: int) -> MetricCollection:
        name = f"{stage}/{dataloader_idx}"
        if name not in self._metrics:
            self._metrics[name] = build_metrics(self.metric_spec, self.threshold).to(self.device)
        return self._metrics[name]

    def _tally(self, stage: str, dataloader_idx: int) -> EvalTally:
        name = f"{stage}/{dataloader_idx}"
        if name not in self._tallies:
            self._tallies[name] = EvalTally().to(self.device)
        return self._tallies[name]

    def _evaluate(self, stage: str, batch: SamBatch, dataloader_idx: int) -> dict[str, Any] | None:
        if batch.num_rows == 0:  # images without prompt rows (COCO, ``empty: keep``): counted only
            self._tally(stage, dataloader_idx).update(batch.num_images, None, 0)
            return None
        out, ctx = self(batch)
        loss = self.compute_losses(out, batch, ctx)["total"] if batch.mask is not None else None
        metrics = self._metric_set(stage, dataloader_idx)
        if batch.gt_original is None:
            raise ValueError(
                f"{stage}: the batch of {batch.names[:3]} has no ground truth; {stage} needs masks."
            )
        nonfinite = (~torch.isfinite(out.pred)).flatten(1).any(1).sum()
        self._tally(stage, dataloader_idx).update(batch.num_images, loss, batch.num_rows, nonfinite)
        targets = row_targets(batch, out.image_index)
        logits = self.frame_logits(out)  # float32, also under bf16 autocast
        frame = self.frame_probabilities(out, logits)  # the sample pictures' (SampleGrid)
        original = self.probabilities(out, batch, logits)
        for image, prob, target in zip(out.image_index.tolist(), original, targets):
            source = batch.path[image] if batch.path else ""  # per-slide metrics group by it (slide_dice)
            metrics.update(prob, target, source=source)
        # SampleGrid draws ``probs`` (the S x S frame) and scores each row on ``original`` and ``targets``
        return {"out": out, "ctx": ctx, "probs": frame, "original": original, "targets": targets}

    def _finish(self, stage: str) -> dict[str, float]:
        """Reduce the metrics and the loss of every evaluation set over processes, log and return them.

        Returns the metrics (``{stage}/{metric}[/{dataset}]``); the loss is logged as
        ``{stage}/loss[/{dataset}]``. A set no process evaluated an image of is left out.
        """
        results: dict[str, float] = {}
        losses: dict[str, float] = {}
        several = self._num_loaders(stage) > 1
        for index in range(self._num_loaders(stage)):
            tally = self._tally(stage, index).compute()  # collective under DDP, on every process
            if int(tally["images"]) == 0:
                continue  # the same decision on every process: the count is reduced
            suffix = f"/{self._dataset_name(stage, index)}" if several else ""
            if int(tally["nonfinite"]):  # reduced: every process raises
                from samflow.callbacks.finite import NonFiniteError

                raise NonFiniteError(
                    f"{stage}{suffix}: the model predicted NaN or infinite values for {int(tally['nonfinite'])} "
                    f"prompt row(s) of {int(tally['images'])} image(s); their metrics would read as empty "
                    "masks. The weights are likely non-finite (a diverged run or a damaged checkpoint), or a "
                    f"plugin produces non-finite values (plugins: {', '.join(self.plugins) or 'none'}): evaluate "
                    "another checkpoint, train with --non_finite.action error (the default: a diverging run "
                    "stops with its last finite checkpoint), or check the plugins' outputs."
                )
            with warnings.catch_warnings():  # a process may have had no batch of this set
                warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
                values = self._metric_set(stage, index).compute()
            for key, value in values.items():
                results[f"{stage}/{key}{suffix}"] = float(value)
            if int(tally["loss_rows"]):
                losses[f"{stage}/loss{suffix}"] = float(tally["loss"])
        for name in [n for n in self._metrics if n.startswith(f"{stage}/")]:
            self._metrics[name].reset()
        for name in [n for n in self._tallies if n.startswith(f"{stage}/")]:
            self._tallies[name].reset()
        if results or losses:
            self.log_dict({**results, **losses}, sync_dist=False)  # the states are reduced already
        return results

    def _num_loaders(self, stage: str) -> int:
        """The stage's number of data loaders (all of them, also those without batches in this process)."""
        seen = [
            int(n.split("/")[1]) + 1 for n in (*self._metrics, *self._tallies) if n.startswith(f"{stage}/")
        ]
        batches = None
        if self._trainer is not None:
            batches = self.trainer.num_val_batches if stage == "val" else self.trainer.num_test_batches
        return max([len(batches or []), *seen], default=0)

    def _dataset_name(self, stage: str, index: int) -> str:
        # Lightning sets Trainer.datamodule at run time without declaring it.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, f"{stage}_names", None)
        return names[index] if names and index < len(names) else str(index)

    def _reset(self, stage: str) -> None:
        for store in (self._metrics, self._tallies):
            for name in [n for n in store if n.startswith(f"{stage}/")]:
                del store[name]
