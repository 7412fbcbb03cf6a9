"""``CocoDataModule``: COCO instances for Lightning (``samflow.data.coco_instances``: the dataset, its
items and their rules), chosen in an experiment as ``data: {class_path: samflow.data.coco.CocoDataModule,
init_args: {...}}``; ``collate_coco`` batches its items into ``CocoBatch``es, one prompt row per instance.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from samflow.data.coco_batch import collate_coco
from samflow.data.coco_instances import CocoInstances
from samflow.data.coco_proposals import sam_checksum
from samflow.data.errors import DataError, check_loader_counts
from samflow.data.eval_shard import EvalShardSampler, eval_shard_sampler
from samflow.data.resumable import ResumableLoader
from samflow.usage import require_extra

__all__ = ["CocoDataModule", "CocoInstances"]

# CocoInstances's options that CocoDataModule passes on (the split's files and the train split's extras
# are its own)
INSTANCE_OPTIONS = tuple(
    name
    for name in inspect.signature(CocoInstances).parameters
    if name not in ("annotations", "images", "proposals", "aux_masks")
)

CHECKED_OPTIONS = ("points", "points_per_instance", "crowd", "empty", "image_resize")


class CocoDataModule(L.LightningDataModule):
    """COCO instances for Lightning: ``train`` / ``val`` / ``test`` / ``predict`` are each
    ``{annotations: FILE, images: FOLDER}`` (or None); ``CocoInstances``'s other options (``img_size``,
    ``points``, ``points_per_instance``, ``point_key``, ``seed``, ``crowd``, ``empty``, ``resize_mode``,
    ``image_resize``) are options of this module too, passed to every split's ``CocoInstances``.

    Args:
        train: the training split, ``{annotations: FILE, images: FOLDER}``.
        val: the validation split (same form).
        test: the test split (same form).
        predict: the split ``samflow predict`` reads (same form).
        batch_size: images per batch (every instance of an image is a row of the batch).
        num_workers: data-loader worker processes.
        proposals: the ``proposals.json`` (or store folder) of ``samflow proposals`` for the train split:
            each row then carries its proposal bag (``CocoBatch.proposals``, SAPNet's input). Refused
            when made for other data, or (in ``setup``, when the run's module is a SAM model) by
            another SAM.
        aux_masks: see ``CocoInstances``; the train split only (the evaluation files need not have them).
        **options: ``CocoInstances``'s options above, by name (``img_size=1024, points="qc"``), kept as
            ``options``; in a config they are written like the others (``init_args: {img_size: 1024}``).
    """

    def __init__(
        self,
        train: dict[str, str] | None = None,
        val: dict[str, str] | None = None,
        test: dict[str, str] | None = None,
        predict: dict[str, str] | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        proposals: str | None = None,
        aux_masks: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        # without the coco extra a run stops here, in one line, not at the first batch (in a loader worker)
        require_extra("pycocotools.mask", "coco", "COCO data (CocoDataModule)")
        unknown = sorted(set(options) - set(INSTANCE_OPTIONS))
        if unknown:
            raise TypeError(
                f"CocoDataModule: unknown option(s) {unknown}; the options of CocoInstances it takes are "
                f"{list(INSTANCE_OPTIONS)}."
            )
        check_loader_counts("data.init_args.", {"batch_size": batch_size}, num_workers)
        # a bad value stops here, not when setup reads the data (the Literal options jsonargparse checks)
        checked = {k: v for k, v in options.items() if k in CHECKED_OPTIONS}
        CocoInstances.check_options(**checked, where="data.init_args.")
        self.splits = {"train": train, "val": val, "test": test, "predict": predict}
        self.proposals = proposals
        self.aux_masks = aux_masks
        self.options = options
        self.batch_size, self.num_workers = batch_size, num_workers
        self.datasets: dict[str, CocoInstances] = {}

    def dataset(self, split: str, proposals: bool = True) -> CocoInstances:
        """The ``CocoInstances`` of ``split``; a DataError naming ``data.<split>`` when it is not set.

        ``proposals=False`` gives the train split without its proposal store (what ``samflow proposals``
        reads to make the store), built anew and not kept.
        """
        if split not in self.datasets or not proposals:
            spec = self.splits.get(split)
            if not spec or "annotations" not in spec:
                raise DataError(f"data.{split}: give {{annotations: FILE, images: FOLDER}} for COCO data.")
            train = split == "train"
            dataset = CocoInstances(
                spec["annotations"],
                spec.get("images"),
                proposals=(self.proposals or None) if train and proposals else None,
                aux_masks=self.aux_masks if train else None,
                **self.options,
            )
            if not proposals:
                return dataset
            self.datasets[split] = dataset
        return self.datasets[split]

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each class index, from the first split set (train, val, test, predict)."""
        for split, spec in self.splits.items():
            if spec:
                return self.dataset(split).category_ids
        return []

    def setup(self, stage: str | None = None) -> None:
        for split, spec in self.splits.items():
            if spec:
                self.dataset(split)
        train = self.datasets.get("train")
        if train is not None and train.proposals is not None and stage in (None, "fit"):
            sam = _run_sam(self)
            if sam is not None:
                train.proposals.check_sam(sam_checksum(sam), "the experiment's model.sam")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        common: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "collate_fn": collate_coco,
        }
        if shuffle:  # the order from (the run's seed, epoch), resumable mid-epoch (``ResumableLoader``)
            return ResumableLoader(dataset, shuffle=True, **common)
        return DataLoader(dataset, sampler=self._eval_sampler(split, dataset), **common)

    def _eval_sampler(self, split: str, dataset: CocoInstances) -> EvalShardSampler | None:
        """Under DDP, this process's contiguous, unpadded part of an evaluation split (``EvalShardSampler``:
        no image counted twice in COCO AP); None in one process or with ``use_distributed_sampler`` off."""
        return eval_shard_sampler(getattr(self, "trainer", None), dataset, f"data.{split}")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The val split's loader; none (no validation during fit) when ``val`` is not set."""
        return self._loader("val", False) if self.splits.get("val") else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False)


def _run_sam(datamodule: L.LightningDataModule) -> torch.nn.Module | None:
    """The SAM of the module the data module's trainer runs (``module.model.sam``), if there is one."""
    trainer = getattr(datamodule, "trainer", None)
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    sam = getattr(getattr(module, "model", None), "sam", None)
    return sam if isinstance(sam, torch.nn.Module) else None
