"""``SamflowModule``: a frozen SAM with plugins, as a LightningModule."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MetricCollection

from samflow.batch import SamBatch
from samflow.callbacks.resume import before_training
from samflow.evaluation import EvalTally, EvaluationMixin
from samflow.losses import build_loss
from samflow.metrics.registry import DEFAULT_METRICS, build_metrics
from samflow.plugins import DecoderContext, PluginStack, SamPlugin
from samflow.sam import EncoderCache, EncoderCacheError, HookedSam, SamOutput, build_sam
from samflow.sam_spec import BuiltOn, SamSpec, check_trained_on

SAM_PREFIX = "model.sam."

# The frozen SAM stays in eval mode on purpose (HookedSam.train keeps it there); Lightning's notice
# about modules in eval mode at the start of training is expected and only noise here.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# A training batch without prompt rows returns no loss on purpose (``_no_rows_loss``), so Lightning skips it.
warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")


class ModelConfigError(ValueError):
    """The experiment's model cannot run as set (nothing to train, another input size than the data's)."""


def plateau_monitor(own: str | None, mode: str, monitor: str | None, checkpoint_mode: str | None) -> str:
    """The metric a ``ReduceLROnPlateau`` in ``mode`` watches: its ``own`` monitor (Lightning's subclass),
    else the checkpoint's ``monitor``, which it must rank in the checkpoint's mode; ``ModelConfigError``
    otherwise. ``SamflowModule.configure_optimizers`` asks it, and ``check_before_build`` before SAM is built."""
    if own:
        return str(own)
    if not monitor:
        raise ModelConfigError(
            "model.scheduler: ReduceLROnPlateau needs a metric to watch and the run has no checkpoint "
            "monitor; set --checkpoint.monitor, or use lightning.pytorch.cli.ReduceLROnPlateau with "
            "init_args.monitor."
        )
    if checkpoint_mode != mode:
        raise ModelConfigError(
            f"model.scheduler: ReduceLROnPlateau(mode={mode!r}) watches {monitor}, which the "
            f"checkpoint ranks with mode {checkpoint_mode!r}; set model.scheduler.init_args.mode {checkpoint_mode}."
        )
    return str(monitor)


def input_size_error(size: int, sam: int, variant: str, sam_size_given: bool) -> str:
    """The refusal of data framed at ``size`` for a SAM that takes ``sam`` x ``sam`` inputs."""
    given = "" if sam_size_given else f", the {variant} variant's default"
    return (
        f"data.init_args.img_size is {size} but model.sam.img_size is {sam}{given}: SAM takes the data's "
        f"{size} x {size} frames as they are and needs {sam} x {sam}. Set both to one size, e.g. "
        f"--model.sam.img_size {size} --data.init_args.img_size {size} (SAM's position tables are resized)."
    )


def nothing_to_train(plugins: list[str]) -> str:
    """The refusal of a fit in which no plugin has trainable parameters."""
    return (
        f"model.plugins: nothing to train, no plugin has trainable parameters (plugins: {', '.join(plugins) or 'none'}). "
        "Add a plugin that trains, e.g. --model.plugins.decoder.class_path DecoderTuning "
        "(`samflow plugins` lists them), or run `samflow validate` to evaluate the frozen SAM."
    )


def no_loss_terms(plugins: list[str]) -> str:
    """The refusal of an experiment with empty ``model.losses`` and no plugin term."""
    return (
        f"model.losses: no loss terms (model.losses is empty and no plugin added a term; plugins: "
        f"{', '.join(plugins) or 'none'}). Set model.losses, e.g. --model.losses '{{bce: 1.0, dice: 1.0}}', or turn on a "
        "plugin's own loss."
    )


class SamflowModule(EvaluationMixin):
    """Train, evaluate and predict with a frozen SAM and its plugins.

    Args:
        sam: the SAM to adapt.
        plugins: plugins keyed by the names they are known by in configs and checkpoints
            (``model.plugins.<key>``); several can run at once.
        losses: base loss terms on the prediction, name -> weight, ``{weight, **kwargs}`` (short names
            ``bce``, ``soft_iou``, ``dice``, ``focal``, ``balanced_bce``) or ``{class_path, init_args,
            weight}`` (any ``nn.Module`` loss); see ``samflow.losses.build_loss``.
        metrics: metrics computed at each image's original resolution: a list of short names (``iou``,
            ``dice``, ``mae``, ``boundary_iou``, ...) or ``{class_path, init_args}`` items (any torchmetrics
            ``Metric``), or a mapping ``{log_name: item}``; see ``samflow.metrics.registry.build_metrics``.
        optimizer: optimizer class and arguments; plugins may set their own ``lr``/``weight_decay``.
        scheduler: optional learning-rate scheduler, stepped per epoch; a ``ReduceLROnPlateau`` watches the
            checkpoint's monitor (the main validation metric) unless it names its own (Lightning's subclass).
        threshold: probability above which a pixel is foreground in predicted masks, and in the
            metrics named by a short name that threshold (``iou``, ``dice``, ``boundary_iou``, ``ber``,
            ``slide_dice``), so validation scores the masks ``samflow predict`` writes.
    """

    def __init__(
        self,
        sam: SamSpec | None = None,
        plugins: dict[str, SamPlugin] | None = None,
        losses: dict[str, Any] | None = None,
        metrics: list[str | dict[str, Any]] | dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["plugins", "optimizer", "scheduler"])
        self.sam_spec = sam or SamSpec()
        stack = PluginStack(plugins or {})  # refuses plugins that cannot run together before SAM is loaded
        frozen = build_sam(
            self.sam_spec.variant, self.sam_spec.checkpoint, self.sam_spec.img_size, seed=self.sam_spec.seed
        )
        spec = self.sam_spec
        cache = (
            EncoderCache(spec.encoder_cache, stages=tuple(spec.encoder_cache_stages))
            if spec.encoder_cache
            else None
        )
        self.model = HookedSam(frozen, stack, spec.multimask_output, spec.checkpoint_blocks, cache)
        # which frozen SAM: ``rebuild.load_trained_checkpoint`` checks a checkpoint's record against it
        self.model.built_on = BuiltOn.of(spec)
        if cache is not None:
            self.model.check_encoder_cache()
        if spec.embedding_store:
            if cache is not None:
                raise EncoderCacheError(
                    "model.sam.encoder_cache and model.sam.embedding_store both reuse encoder outputs; set one."
                )
            self.model.check_encoder_cache("model.sam.embedding_store")
        self.loss = build_loss(losses if losses is not None else {"bce": 1.0, "dice": 1.0})
        self.metric_spec = metrics if metrics is not None else list(DEFAULT_METRICS)
        build_metrics(self.metric_spec)  # an unknown name fails now, not after the first epoch
        self._metrics: dict[str, MetricCollection] = {}
        self._tallies: dict[str, EvalTally] = {}
        self.optimizer = optimizer
        self.scheduler = scheduler
        if not 0 <= threshold < 1:  # else every predicted pixel is one class, silently
            raise ModelConfigError(f"model.threshold is a probability in [0, 1), got {threshold}.")
        self.threshold = threshold
        self.last_val_metrics: dict[str, float] = {}
        self.initial_val_metrics: dict[str, float] = {}

    @property
    def plugins(self) -> PluginStack:
        stack = self.model.plugins
        assert isinstance(stack, PluginStack)
        return stack

    # ---- parameters: the stack owns the record of what trains ----
    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameter count per plugin, SAM parts counted with the plugin that trains them."""
        return self.plugins.trainable_counts()

    def configure_optimizers(self) -> Any:
        """One parameter group per plugin with what it owns (its ``lr`` / ``weight_decay``), each
        trainable parameter once, in the keys' sorted order (``PluginStack.optimizer_groups``); a
        trainable parameter that no plugin owns is refused."""
        self.check_trainable()
        self._refuse_unowned_trainable()
        groups = self.plugins.optimizer_groups()
        optimizer = self.optimizer(groups)
        optimizer.register_load_state_dict_pre_hook(self.plugins.match_saved_groups)
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self._plateau_monitor(scheduler)
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _plateau_monitor(self, scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau) -> str:
        """The metric a ``ReduceLROnPlateau`` watches: its own ``monitor`` (Lightning's subclass), else the
        checkpoint's (the main validation metric), whose mode it must share (``plateau_monitor``)."""
        trainer = self._trainer
        best = trainer.checkpoint_callback if trainer is not None else None
        checkpoint = (getattr(best, "monitor", None), getattr(best, "mode", None))
        return plateau_monitor(getattr(scheduler, "monitor", None), scheduler.mode, *checkpoint)

    def _refuse_unowned_trainable(self) -> None:
        """Refuse parameters that train but belong to no plugin's group: the optimizer would never step them."""
        owned = {id(p) for params in self.plugins.owned.values() for p in params.values()}
        stray = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in owned]
        if stray:
            raise ModelConfigError(
                f"model.plugins: {len(stray)} trainable parameter(s) that no plugin owns, so the optimizer would "
                f"never step them: {', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}. A plugin trains a SAM part by naming it in "
                "sam_modules_to_train (not by setting requires_grad in setup); freeze other parameters "
                "(requires_grad_(False))."
            )

    def check_trainable(self) -> None:
        """Refuse to fit when no plugin trains a parameter (``model.plugins`` empty or all frozen)."""
        if not any(self.plugins.owned.values()):
            raise ModelConfigError(nothing_to_train(list(self.plugins)))

    def check_input_size(self, datamodule: Any) -> None:
        """Refuse data framed at another size than SAM's input (``data.init_args.img_size`` vs
        ``model.sam.img_size``).

        The data module brings every image into its S x S frame and SAM takes that frame as it is: its
        position tables, its prompt frame and its mask-prompt size are those of ``model.sam.img_size``,
        so no other S works, with or without the encoder (an embedding store). A data module is read
        by its ``img_size``, else by the ``img_size`` of its datasets (after ``setup``).
        """
        datasets = getattr(datamodule, "datasets", None)
        sizes = {getattr(datamodule, "img_size", None)} if hasattr(datamodule, "img_size") else set()
        if not sizes and isinstance(datasets, Mapping):
            sizes = {getattr(d, "img_size", None) for d in datasets.values() if hasattr(d, "img_size")}
        for size in sorted(s for s in sizes if isinstance(s, int)):
            self._refuse_input_size(size)

    def _refuse_input_size(self, size: int) -> None:
        sam = self.model.img_size
        if size == sam:
            return
        raise ModelConfigError(
            input_size_error(size, sam, self.sam_spec.variant, bool(self.sam_spec.img_size))
        )

    def setup(self, stage: str) -> None:
        """Check the data's input size (and, to fit, that something trains) before the first step; open
        ``sam.embedding_store`` once the data module's datasets exist, and check it against them."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.check_input_size(datamodule)
        if stage == "fit":
            self.check_trainable()
        if self.sam_spec.embedding_store and self.model.embedding_store is None:
            from samflow.embed import open_for_run

            self.model.embedding_store = open_for_run(self, datamodule, stage)
        if stage == "fit" and self.model.embedding_store is not None and datamodule is not None:
            from samflow.embed.check import skip_training_pixels

            skip_training_pixels(datamodule, self.model.plugins.image_readers())

    def configure_callbacks(self) -> list[Any]:
        """``MonitorCheck``: a checkpoint ``monitor`` the fit does not log stops it at the sanity check or
        the first validation, naming the logged metrics (Lightning would find out after an epoch)."""
        from samflow.callbacks.monitor import MonitorCheck

        return [MonitorCheck()]

    # ---- forward ----
    def forward(self, batch: SamBatch) -> tuple[SamOutput, DecoderContext]:
        self._refuse_input_size(batch.image.shape[-1])  # data modules without an ``img_size`` too
        ctx = self.model.context(batch, epoch=self.current_epoch, global_step=self.global_step)
        return self.model.run(batch, ctx)

    def upsample(self, logits: Tensor) -> Tensor:
        """Low-resolution logits (N, 1, h, w) -> the model's input frame (N, 1, S, S)."""
        size = self.model.img_size
        return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)

    def compute_losses(self, out: SamOutput, batch: SamBatch, ctx: DecoderContext) -> dict[str, Tensor]:
        """The experiment's losses on the prediction plus every plugin's own terms; ``total`` sums them."""
        target = batch.row_mask
        terms = self.loss(self.upsample(out.pred), target) if len(self.loss.losses) else {"total": 0.0}
        total = terms.pop("total")
        extra = self.plugins.losses(out, batch, ctx)
        if not terms and not extra:
            raise ModelConfigError(no_loss_terms(list(self.plugins)))
        for value in extra.values():
            total = total + value
        return {**terms, **extra, "total": total}

    def training_step(self, batch: SamBatch, batch_idx: int) -> Tensor | None:
        if batch.num_rows == 0:
            return self._no_rows_loss()
        out, ctx = self(batch)
        terms = self.compute_losses(out, batch, ctx)
        total = terms["total"]
        if torch.is_grad_enabled() and not (isinstance(total, Tensor) and total.requires_grad):
            raise ModelConfigError(
                "model.plugins: no trainable parameter reached the loss, so nothing can train. Plugins and "
                f"the hooks they override: {self.plugins.hooks_report()}. A plugin's parameters must take part "
                "in what a hook returns (check the hook names against samflow.SamPlugin)."
            )
        batch_size = batch.num_images
        self.log_dict({f"train/loss/{k}": v for k, v in terms.items() if k != "total"}, batch_size=batch_size)
        self.log("train/loss", terms["total"], prog_bar=True, batch_size=batch_size)
        return terms["total"]

    def _no_rows_loss(self) -> Tensor | None:
        """The loss of a training batch without prompt rows (COCO images without instances, kept with
        ``empty: keep``), which has nothing to learn from: None on one process, so Lightning skips the
        step (the optimizer does not step either); under DDP every process takes part in the gradient
        reduction, so zero times every trainable parameter (zero gradients, averaged with the others')."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        return (
            sum((p.sum() for p in self.parameters() if p.requires_grad), torch.zeros((), device=self.device))
            * 0.0
        )

    # ---- epoch hooks (the evaluation steps are EvaluationMixin's, in samflow.evaluation) ----
    def _log_cache(self, stage: str, tally: str) -> None:
        """Log the share of images whose encoder outputs came from the cache in this epoch.

        Hits and misses are summed over processes (every process takes part, with or without images),
        so the rate is that of all images, not a mean of per-process rates.
        """
        cache = self.model.encoder_cache
        if cache is None:
            return
        counts = torch.tensor(cache.counts.get(tally, (0, 0)), dtype=torch.float64, device=self.device)
        if self._trainer is not None:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        hits, misses = counts.tolist()
        if hits + misses:
            self.log(f"{stage}/encoder_cache_hit_rate", hits / (hits + misses), sync_dist=False)

    def _reset_cache_counts(self, tally: str) -> None:
        if self.model.encoder_cache is not None:
            self.model.encoder_cache.reset_counts(tally)

    def on_train_epoch_start(self) -> None:
        self._reset_cache_counts("train")

    def on_train_epoch_end(self) -> None:
        self._log_cache("train", "train")

    def on_validation_epoch_start(self) -> None:
        self._reset("val")
        self._reset_cache_counts("eval")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def validation_step(
        self, batch: SamBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any] | None:
        return self._evaluate("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self.last_val_metrics = self._finish("val")
        self._log_cache("val", "eval")
        # not the sanity check Lightning repeats in a fit resumed at an epoch end (trained weights)
        if self._trainer is not None and self.trainer.sanity_checking and before_training(self.trainer):
            self.initial_val_metrics = dict(self.last_val_metrics)

    def test_step(self, batch: SamBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any] | None:
        return self._evaluate("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._finish("test")

    def predict_step(self, batch: SamBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Each prompt row's ``masks`` (bool) and ``probs`` at its image's original size, its image's
        ``id`` and, for instance data (a batch with ``ann_ids``, COCO), its ``instance`` (annotation id)."""
        if batch.num_rows == 0:  # images without prompt rows: nothing to predict
            return {"id": [], "masks": [], "probs": []}
        out, _ = self(batch)
        probs = self.probabilities(out, batch)
        ids = [batch.names[i] for i in out.image_index.tolist()]
        result = {"id": ids, "masks": [(p > self.threshold) for p in probs], "probs": probs}
        ann_ids = getattr(batch, "ann_ids", None)
        if ann_ids is not None:  # one row per instance: the rows of one image need their own names
            if len(ann_ids) != len(ids):
                raise ValueError(
                    f"predict: the batch of {batch.names[:3]} has {len(ann_ids)} instance(s) but {len(ids)} "
                    "predicted row(s); a plugin must not add or drop the rows of instance data."
                )
            result["instance"] = ann_ids.tolist()
        return result

    # ---- checkpoints hold the plugins and trained SAM parts, not the frozen SAM ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in self.plugins.frozen_sam_keys:
            state.pop(SAM_PREFIX + key, None)
        checkpoint["samflow"] = {
            "sam": asdict(self.sam_spec),
            "frozen_sam_omitted": True,
            "trained_on": BuiltOn.of(self.sam_spec).record(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint loads on top of the frozen SAM it was trained on: another variant, SAM file or
        random seed is refused in one line (``check_trained_on``), before its weights are loaded."""
        check_trained_on(
            checkpoint.get("samflow"),
            BuiltOn.of(self.sam_spec),
            source=f"Checkpoint {ckpt}"
            if (ckpt := getattr(self._trainer, "ckpt_path", None))
            else "The checkpoint",
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a samflow checkpoint: frozen SAM weights it omits come from ``sam.checkpoint``."""
        state = dict(state_dict)
        ours, theirs = (
            {k.split(".")[2] for k in keys if k.startswith("model.plugins.")}
            for keys in (self.state_dict(), state)
        )
        if ours != theirs:  # a checkpoint of another experiment: one line, not torch's key lists
            from samflow.sam.build import CheckpointError

            raise CheckpointError(
                f"The checkpoint holds weights of plugins {sorted(theirs)}, this experiment's plugins with weights are "
                f"{sorted(ours)}; pass the "
                "experiment (and plugin options) the checkpoint was trained with, or a checkpoint of this experiment."
            )
        own = self.state_dict()
        other = [
            f"{key} {tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} here"
            for key, value in state.items()
            if key in own and isinstance(value, Tensor) and value.shape != own[key].shape
        ]
        if other:  # the same plugins with other options: one line, not torch's size mismatches
            from samflow.sam.build import CheckpointError

            raise CheckpointError(
                f"The checkpoint's weights have other shapes than this experiment's: {'; '.join(other)}. It was "
                "trained with other plugin (or SAM) options: pass the options of its run, e.g. --experiment "
                "<run>/config.yaml, or a checkpoint of this experiment."
            )
        # only the frozen SAM weights the checkpoint leaves out (``on_save_checkpoint``) come from the built
        # SAM; a SAM part a plugin trains (``DecoderTuning``'s mask decoder) must be in the checkpoint
        frozen = {SAM_PREFIX + key for key in self.plugins.frozen_sam_keys}
        for key, value in own.items():
            if key in frozen and key not in state:
                state[key] = value
        missing = [key for key in own if key.startswith(SAM_PREFIX) and key not in state]
        if strict and missing:
            from samflow.sam.build import CheckpointError

            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise CheckpointError(
                f"The checkpoint lacks {len(missing)} SAM weight(s) that this experiment's plugins train or "
                f"put into SAM ({shown}): it was trained with other plugins; pass the experiment (and plugin "
                "options) the checkpoint was trained with, or a checkpoint of this experiment."
            )
        extra = [key for key in state if key not in own]
        lacking = [key for key in own if key not in state]
        if strict and (extra or lacking):  # e.g. LoRA on more blocks: one line, not torch's key lists
            from samflow.sam.build import CheckpointError

            def listed(keys: list[str], what: str) -> str:
                return f"{what} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"

            parts = [listed(extra, "holds weights this experiment lacks:")] if extra else []
            parts += [listed(lacking, "lacks weights of this experiment:")] if lacking else []
            raise CheckpointError(
                f"The checkpoint {' and '.join(parts)}. It was trained with other plugin options "
                "(e.g. LoRA's blocks or targets): pass the options of its run, e.g. --experiment <run>/config.yaml, "
                "or a checkpoint of this experiment."
            )
        return super().load_state_dict(state, strict=strict, assign=assign)
