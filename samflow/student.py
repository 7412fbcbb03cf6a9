"""SAPNet's student: a SOLOv2 head on SAM's frozen embedding, trained on pseudo masks, evaluated without points.

``StudentModule`` is a LightningModule over ``CocoBatch`` batches: the frozen SAM image encoder
(``HookedSam.encode``, no prompts, no plugins) gives the embedding, ``samflow.instance.SOLOv2Head``
trains on each image's instances (``instance_mask`` in the S x S frame, contiguous ``classes``), and
validation / test predict every image without any prompt and score COCO mask AP with ``CocoMaskAP``
against the split's annotation masks at the original resolution, crowd regions as COCOeval's
``iscrowd`` (``val/ap``, ``val/ap50``, ..., ``test/ap_l``). Test predictions are also kept as COCO
results (original category ids through the data's ``category_ids``) for ``results.json``.

``samflow student`` (``samflow.student_command``) trains it on a pseudo-mask file; ``resume_views`` says
which of a run's settings its ``--resume`` compares.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from samflow.callbacks.resume_config import ResumeError
from samflow.data.coco_batch import CocoBatch
from samflow.data.coco_masks import encode_mask
from samflow.instance import CocoMaskAP, SOLOv2Head
from samflow.instance.solov2 import mask_boxes
from samflow.module import SamSpec
from samflow.sam import EncoderCache, HookedSam, build_sam

__all__ = ["StudentModule", "resume_views"]

ENCODER_PREFIX = "encoder."
METRICS_KEY = "student_metrics"  # the checkpoint's entry of ``StudentModule.metrics``


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.015, momentum=0.9, weight_decay=1e-4)


class StudentModule(LightningModule):
    """A prompt-free SOLOv2 student on a frozen SAM (module docstring).

    Args:
        num_classes: C (the data's contiguous classes).
        sam: the SAM whose image encoder gives the features (ignored when ``frozen_sam`` is given).
        head: keyword arguments of ``SOLOv2Head`` (``num_grids``, ``scale_ranges``, ``feat_channels``, ...).
        category_ids: COCO id of each class index, for the results file (default: the index itself).
        optimizer, scheduler: as ``SamflowModule`` (default SGD 0.015, momentum 0.9, wd 1e-4; none).
        frozen_sam: an already built frozen SAM to use (the command passes the experiment's).
        mps_weight: weight of the MPS term (SAPNet's multi-mask proposal supervision): with
            ``batch.aux_masks`` (N, R, S, S) (the pseudo-mask file's ``mps_segmentation``), the mask loss
            is also computed with each of the R masks as every instance's target (the cells still
            chosen by the pseudo mask's box, the centre by the MPS mask, as the reference), and
            ``loss_mps = mps_weight * Σ_r loss_mask_r / 6`` is added (the reference's 0.5 and 6). 0 turns it off.
    """

    def __init__(
        self,
        num_classes: int,
        sam: SamSpec | None = None,
        head: Mapping[str, Any] | None = None,
        category_ids: list[int] | None = None,
        optimizer: OptimizerCallable = _sgd,
        scheduler: LRSchedulerCallable | None = None,
        frozen_sam: nn.Module | None = None,
        mps_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.sam_spec = sam or SamSpec()
        spec = self.sam_spec
        if frozen_sam is None:
            frozen_sam = build_sam(spec.variant, spec.checkpoint, spec.img_size, seed=spec.seed)
        cache = (
            EncoderCache(spec.encoder_cache, stages=tuple(spec.encoder_cache_stages))
            if spec.encoder_cache
            else None
        )
        self.encoder = HookedSam(frozen_sam, encoder_cache=cache)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        embed_dim = int(getattr(frozen_sam.prompt_encoder, "embed_dim"))  # noqa: B009
        self.head = SOLOv2Head(num_classes, in_channels=embed_dim, **dict(head or {}))
        self.category_ids = list(category_ids) if category_ids is not None else list(range(num_classes))
        if len(self.category_ids) != num_classes:
            raise ValueError(
                f"StudentModule: {len(self.category_ids)} category_ids for {num_classes} classes."
            )
        self.optimizer, self.scheduler = optimizer, scheduler
        self.mps_weight = mps_weight
        self.ap: dict[str, CocoMaskAP] = nn.ModuleDict({"val": CocoMaskAP(), "test": CocoMaskAP()})  # type: ignore[assignment]
        self.results: list[dict[str, Any]] = []
        self.metrics: dict[str, dict[str, float]] = {}

    # ---- features and targets ----
    @torch.no_grad()
    def embed(self, batch: CocoBatch) -> Tensor:
        """SAM's frozen image embedding (B, C, S/16, S/16) of the batch's images; no prompt is read."""
        ctx = self.encoder.context(batch)
        return self.encoder.encode(ctx).embeddings.float()

    @staticmethod
    def targets(batch: CocoBatch) -> list[dict[str, Tensor]]:
        """Per image: ``masks`` (M, S, S) bool in the input frame and ``labels`` (M,) contiguous classes."""
        assert batch.instance_mask is not None and batch.classes is not None
        out = []
        for b in range(batch.num_images):
            rows = batch.image_index == b
            out.append({"masks": batch.instance_mask[rows, 0] > 0.5, "labels": batch.classes[rows]})
        return out

    # ---- training ----
    def training_step(self, batch: CocoBatch, batch_idx: int) -> Tensor:
        outputs = self.head(self.embed(batch))
        targets = self.targets(batch)
        losses = self.head.loss(outputs, targets)
        aux = batch.aux_masks
        if self.mps_weight and aux is not None and aux.shape[0] and aux.shape[1]:
            terms = []
            # each MPS rank as every instance's mask target; the scale and centre region stay the pseudo
            # mask's box (the reference passes its pseudo boxes with the MPS masks)
            boxes = [mask_boxes(t["masks"]) for t in targets]
            for r in range(aux.shape[1]):
                other = [
                    {**t, "masks": aux[batch.image_index == b, r], "boxes": boxes[b]}
                    for b, t in enumerate(targets)
                ]
                terms.append(self.head.loss(outputs, other)["loss_mask"])
            losses["loss_mps"] = self.mps_weight * torch.stack(terms).sum() / 6
            losses["loss"] = losses["loss"] + losses["loss_mps"]
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()}, batch_size=batch.num_images, prog_bar=True
        )
        return losses["loss"]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.head.parameters())
        if self.scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "epoch"},
        }

    # ---- evaluation without prompts ----
    def predict_instances(self, batch: CocoBatch) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image (masks (K, H, W) bool at the original size, scores (K,), labels (K,)); no prompts."""
        outputs = self.head(self.embed(batch))
        sizes = [(int(h), int(w)) for h, w in batch.input_size.tolist()]
        originals = [(int(h), int(w)) for h, w in batch.original_size.tolist()]
        # the probabilities are resized to the original size and thresholded there (the reference's order)
        return self.head.predict(outputs, sizes, originals)

    @staticmethod
    def eval_targets(batch: CocoBatch) -> list[dict[str, Tensor]]:
        """Per image the AP's ground truth at the original size: ``masks``, ``labels`` and ``iscrowd``.

        COCO's crowd regions are in it as ``iscrowd`` 1 (those of the rows, with ``crowd="keep"``, and the
        batch's ``crowd_masks``), as in COCOeval: a detection on one is neither right nor wrong.
        """
        assert batch.classes is not None
        out = []
        for b in range(batch.num_images):
            rows = batch.image_index == b
            masks, labels = batch.instance_masks[b], batch.classes[rows]
            iscrowd = batch.iscrowd[rows] if batch.iscrowd is not None else torch.zeros_like(labels).bool()
            if batch.crowd_masks:
                crowd = batch.crowd_masks[b].to(masks.device)
                masks = torch.cat([masks, crowd])
                labels = torch.cat([labels, batch.crowd_classes[b].to(labels.device)])
                iscrowd = torch.cat([iscrowd, iscrowd.new_ones(crowd.shape[0])])
            out.append({"masks": masks, "labels": labels, "iscrowd": iscrowd})
        return out

    def _evaluate(self, stage: str, batch: CocoBatch) -> None:
        preds = self.predict_instances(batch)
        self.ap[stage].update(preds, self.eval_targets(batch))
        if stage == "test":
            for b, (masks, scores, labels) in enumerate(preds):
                for m, s, k in zip(masks.cpu(), scores.tolist(), labels.tolist(), strict=True):
                    self.results.append(
                        {
                            "image_id": batch.image_ids[b],
                            "category_id": self.category_ids[int(k)],
                            "segmentation": encode_mask(m.numpy()),
                            "score": float(s),
                        }
                    )

    def _finish(self, stage: str) -> None:
        values = {k: float(v) for k, v in self.ap[stage].compute().items()}
        self.ap[stage].reset()
        self.metrics[stage] = values
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=False)  # reduced already

    def validation_step(self, batch: CocoBatch, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_start(self) -> None:
        self.results = []

    def test_step(self, batch: CocoBatch, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_test_epoch_end(self) -> None:
        self._finish("test")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self.results)
            self.results = [r for part in gathered for r in part]

    # ---- checkpoints hold the head, not the frozen SAM, and the metrics so far ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(ENCODER_PREFIX)]:
            del state[key]
        # the last validation's AP: a run resumed from its last epoch's end validates no more
        checkpoint[METRICS_KEY] = {stage: dict(values) for stage, values in self.metrics.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.metrics = {stage: dict(values) for stage, values in checkpoint.get(METRICS_KEY, {}).items()}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a student checkpoint; the frozen SAM weights it omits stay as built."""
        state = dict(state_dict)
        for key, value in self.state_dict().items():
            if key.startswith(ENCODER_PREFIX) and key not in state:
                state[key] = value
        return super().load_state_dict(state, strict=strict, assign=assign)


# ---- what a resume of a student run compares (``samflow student --resume``) ----
#: the experiment's data options the student never reads: the prompts' (it takes none), ``empty`` (it
#: keeps empty images), ``proposals``, ``aux_masks`` and ``train`` (the pseudo-mask file replaces them)
UNUSED_DATA = (
    "points",
    "points_per_instance",
    "point_key",
    "seed",
    "empty",
    "proposals",
    "aux_masks",
    "train",
)
HEAD_KEY = "model.student.head"
INFERENCE_KEY = "model.student.head.inference"  # the compared view's: the head's inference options


def resume_views(
    saved: dict[str, str], settings: dict[str, str], validated: bool, restart: str
) -> tuple[dict[str, str], dict[str, str]]:
    """A run's recorded settings (``saved``) and a resume's, as ``check_resume`` compares them: a resume
    is refused exactly when a change would make it differ from an uninterrupted run with the new
    settings (the head's weights, the ``metrics.csv`` rows). Left out: the experiment's ``UNUSED_DATA``;
    ``--head`` with ``SOLOv2Head``'s defaults (an option given at its default is no change), its
    inference options (``SOLOv2Head.INFERENCE_OPTIONS``), which never change the weights, apart. Those
    changed: a ResumeError when the run ``validated`` before its checkpoint (that AP, in
    ``metrics.csv``, was scored with the run's values; ``restart``: the other way out), else a warning,
    and the validations and the test after the resume use the new values."""
    old, new = _resume_view(saved), _resume_view(settings)
    before, now = old.pop(INFERENCE_KEY, None), new.pop(INFERENCE_KEY, None)
    if before != now and validated:
        raise ResumeError(
            f"the head's inference options changed ({INFERENCE_KEY}: run {before}, now {now}), and the "
            "run's validations before its checkpoint scored their AP (metrics.csv) with the run's "
            f"values. Resume with them, or {restart}."
        )
    if before != now:
        rank_zero_warn(
            f"samflow: resuming with {INFERENCE_KEY} {now} (the run had {before}; no validation had "
            "run): the validations and the test use the new values."
        )
    return old, new


def _unused(key: str) -> bool:
    section, _, rest = key.partition(".")
    return section == "data" and rest.removeprefix("init_args.").split(".")[0] in UNUSED_DATA


def _resume_view(settings: dict[str, str]) -> dict[str, str]:
    out = {key: value for key, value in settings.items() if not _unused(key)}
    if HEAD_KEY in out:
        params = inspect.signature(SOLOv2Head).parameters.values()
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        head = json.loads(json.dumps(defaults)) | json.loads(out[HEAD_KEY])  # tuples as JSON reads them
        inference = {k: head.pop(k) for k in SOLOv2Head.INFERENCE_OPTIONS if k in head}
        out[HEAD_KEY] = json.dumps(head, sort_keys=True)
        out[INFERENCE_KEY] = json.dumps(inference, sort_keys=True)
    return out
