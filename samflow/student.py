"""SAPNet's student: a SOLOv2 head on SAM's frozen embedding, trained on pseudo masks, evaluated without points.

``StudentModule`` is a LightningModule over ``CocoBatch`` batches: the frozen SAM image encoder
(``HookedSam.encode``, no prompts, no plugins) gives the embedding, ``samflow.instance.SOLOv2Head``
trains on each image's instances (``instance_mask`` in the S x S frame, contiguous ``classes``), and
validation / test predict every image without any prompt and score COCO mask AP with ``CocoMaskAP``
against the split's annotation masks at the original resolution (``val/ap``, ``val/ap50``, ...,
``test/ap_l``). Test predictions are also kept as COCO results (original category ids through the
data's ``category_ids``) for ``results.json``.

``samflow student --experiment NAME --pseudo FILE --out DIR`` is the stage after ``samflow fit`` and
``samflow pseudo-masks``: the same experiment supplies the SAM (``model.sam``), the data settings
(image size, batch size, workers, the ``val`` / ``test`` annotation files and the train images folder),
the optimizer and scheduler (``model.optimizer``, ``model.scheduler``) and every ``trainer.*`` setting
(epochs, devices, precision, ``max_time``, ``limit_*``, ``trainer.callbacks`` such as the warm-up; its
``enable_checkpointing: false`` and ``barebones: true`` are refused, a ``default_root_dir`` is said to
be unused, the logger is its own);
the train split becomes the pseudo-mask file. ``model.sam.embedding_store`` is refused (the student
runs the encoder; ``model.sam.encoder_cache`` works). It writes ``DIR/checkpoints/last.ckpt`` (the head only),
``DIR/metrics.csv``, ``DIR/student_metrics.json`` and, with a test split, ``DIR/results.json``
(COCO results that pycocotools' ``COCO.loadRes`` reads).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from samflow.data.coco import CocoDataModule
from samflow.data.coco_batch import CocoBatch
from samflow.data.coco_masks import encode_mask
from samflow.data.errors import DataError
from samflow.instance import CocoMaskAP, SOLOv2Head
from samflow.module import SamSpec
from samflow.sam import EncoderCache, HookedSam, build_sam
from samflow.usage import CommandParser

__all__ = ["StudentModule"]

ENCODER_PREFIX = "encoder."


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
            is also computed with each of the R masks as every instance's target, and
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
            for r in range(aux.shape[1]):  # each MPS rank as every instance's target (SAPNet's MPS)
                other = [{**t, "masks": aux[batch.image_index == b, r]} for b, t in enumerate(targets)]
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
        preds = []
        for b, (masks, scores, labels) in enumerate(self.head.predict(outputs, sizes)):
            h, w = (int(v) for v in batch.original_size[b].tolist())
            if masks.shape[0]:
                masks = (
                    F.interpolate(masks[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
                    >= 0.5
                )
            else:
                masks = masks.new_zeros((0, h, w))
            preds.append((masks, scores, labels))
        return preds

    def _evaluate(self, stage: str, batch: CocoBatch) -> None:
        assert batch.classes is not None
        preds = self.predict_instances(batch)
        targets = []
        for b in range(batch.num_images):
            rows = batch.image_index == b
            targets.append({"masks": batch.instance_masks[b].to(self.device), "labels": batch.classes[rows]})
        self.ap[stage].update(preds, targets)
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

    # ---- checkpoints hold the head, not the frozen SAM ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(ENCODER_PREFIX)]:
            del state[key]

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a student checkpoint; the frozen SAM weights it omits stay as built."""
        state = dict(state_dict)
        for key, value in self.state_dict().items():
            if key.startswith(ENCODER_PREFIX) and key not in state:
                state[key] = value
        return super().load_state_dict(state, strict=strict, assign=assign)


# ---- the command ----
# trainer.* keys the student does not take from the experiment: its own logger (metrics.csv in --out),
# callbacks (the experiment's own are kept, samflow fit's are not) and run folder (--out, said in a
# warning line when the experiment sets one). Two settings would stop it writing --out: refused at
# those values. Every other trainer.* key the experiment or a flag sets goes to the student's Trainer.
OWN_TRAINER_KEYS = ("logger", "callbacks")
UNUSED_TRAINER_KEYS = {"default_root_dir": "the student writes to --out"}
REFUSED_TRAINER_VALUES = {
    "enable_checkpointing": (False, "the student always writes --out/checkpoints/last.ckpt"),
    "barebones": (True, "the student needs its logger and checkpoint"),
}


def _trainer_kwargs(cli: Any) -> dict[str, Any]:
    """The experiment's trainer.* keys that are set (differ from the parser's defaults), as Trainer
    arguments; a value the student cannot honour is refused with one line."""
    given = cli.config.get("trainer") or {}
    defaults = cli.parser.get_defaults().get("trainer") or {}
    config = cli.config_init.get("trainer") or {}
    kwargs: dict[str, Any] = {}
    for key, value in given.items():
        if key in OWN_TRAINER_KEYS or value == defaults.get(key):
            continue
        if key in UNUSED_TRAINER_KEYS:
            sys.stderr.write(
                f"samflow: warning: trainer.{key} {value} is not used ({UNUSED_TRAINER_KEYS[key]}).\n"
            )
            continue
        if key in REFUSED_TRAINER_VALUES:
            refused, why = REFUSED_TRAINER_VALUES[key]
            if value == refused:
                raise DataError(
                    f"samflow student: trainer.{key} {value} is not supported ({why}); drop it. The student "
                    "honours every other trainer.* key and the experiment's trainer.callbacks."
                )
            continue  # the value the student has anyway
        kwargs[key] = config.get(key)
    return kwargs


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="samflow student",
        description="Train SAPNet's SOLOv2 student on SAM's frozen embedding from pseudo masks (`samflow pseudo-masks`) "
        "and evaluate it without prompts (COCO mask AP on the experiment's val / test annotations). The experiment "
        "gives SAM, data settings, optimizer, scheduler and trainer settings; other arguments override it.",
    )
    p.add_argument("--experiment", required=True, help="experiment name or YAML path (the SAPNet experiment)")
    p.add_argument("--pseudo", required=True, help="pseudo-mask COCO file written by `samflow pseudo-masks`")
    p.add_argument(
        "--out",
        required=True,
        help="output folder (checkpoints, metrics.csv, student_metrics.json, results.json)",
    )
    p.add_argument(
        "--images",
        default=None,
        help="folder of the training images (default: the experiment's train images)",
    )
    p.add_argument(
        "--mps-weight",
        type=float,
        default=0.5,
        help="weight of the pseudo-mask file's MPS masks (SAPNet: 0.5, summed over the ranks / 6); 0 turns them off",
    )
    p.add_argument(
        "--head", default=None, help="SOLOv2Head options as YAML/JSON, e.g. '{num_grids: [40, 24, 16]}'"
    )
    return p


def _build_cli(experiment: str, overrides: list[str]) -> Any:
    import sys

    from samflow.cli import _experiment_from_argv
    from samflow.lightning_cli import SamflowCLI

    args, name = _experiment_from_argv(["--experiment", experiment, *overrides])
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return SamflowCLI(name or "student", args=[*args, "--trainer.logger=false"], run=False)
    finally:
        sys.argv = argv


def main(argv: list[str]) -> int:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    opts, overrides = _parser().parse_known_args(argv)
    pseudo = Path(opts.pseudo).expanduser()
    if not pseudo.is_file():
        raise DataError(
            f"samflow student: --pseudo {pseudo} not found; write it with `samflow pseudo-masks`."
        )
    cli = _build_cli(opts.experiment, overrides)
    model, data = cli.model, cli.datamodule
    if model.sam_spec.embedding_store:
        raise DataError(
            "samflow student: model.sam.embedding_store is not read by the student (it runs SAM's encoder "
            "on every image); pass --model.sam.embedding_store null (model.sam.encoder_cache is honoured)."
        )
    if not isinstance(data, CocoDataModule):
        raise DataError(
            f"samflow student: the experiment's data is {type(data).__name__}; it needs samflow.data.coco.CocoDataModule."
        )
    train = data.splits.get("train") or {}
    images = (
        opts.images or train.get("images") or str(Path(train.get("annotations", pseudo)).expanduser().parent)
    )
    first = (json.loads(pseudo.read_text()).get("annotations") or [{}])[0]
    student_data = CocoDataModule(
        train={"annotations": str(pseudo), "images": images},
        aux_masks="mps_segmentation" if "mps_segmentation" in first and opts.mps_weight else None,
        val=data.splits.get("val"),
        test=data.splits.get("test"),
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        # images without instances count in COCO's evaluation (false positives): keep them
        **{**data.options, "empty": "keep"},  # type: ignore[arg-type]
    )
    ids = student_data.dataset("train").category_ids
    for split in ("val", "test"):
        if student_data.splits.get(split) and student_data.dataset(split).category_ids != ids:
            raise DataError(
                f"samflow student: data.{split}'s categories differ from those of {pseudo}; the classes would not match."
            )
    head = yaml.safe_load(opts.head) if opts.head else {}
    student = StudentModule(
        len(ids),
        model.sam_spec,
        head=head,
        category_ids=ids,
        optimizer=model.optimizer,
        scheduler=model.scheduler,
        frozen_sam=model.model.sam,
        mps_weight=opts.mps_weight,
    )
    config = cli.config_init.get("trainer") or {}
    kwargs = {"enable_model_summary": False, "num_sanity_val_steps": 0, **_trainer_kwargs(cli)}
    if str(kwargs.get("strategy", "")).startswith("ddp_find_unused"):
        kwargs["strategy"] = "ddp"  # the student's head uses every parameter
    out = Path(opts.out).expanduser()
    # the experiment's own trainer.callbacks (e.g. the warm-up) come first; samflow fit's (sample grids,
    # reports, its checkpointing) are for SamflowModule and are left out
    own = len(cli.config.get("trainer", {}).get("callbacks") or [])
    callbacks = [
        *(config.get("callbacks") or [])[:own],
        ModelCheckpoint(dirpath=out / "checkpoints", save_last=True),
    ]
    trainer = Trainer(
        **kwargs, callbacks=callbacks, logger=CSVLogger(out, name="", version=""), default_root_dir=out
    )
    trainer.fit(student, datamodule=student_data)
    if student_data.splits.get("test"):
        trainer.test(student, datamodule=student_data, verbose=False)
        if trainer.is_global_zero:
            (out / "results.json").write_text(json.dumps(student.results))
    if trainer.is_global_zero:
        (out / "student_metrics.json").write_text(json.dumps(student.metrics, indent=2))
        for stage, values in student.metrics.items():
            print(f"samflow student {stage}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
        print(f"samflow student: {out}")
    return 0
