"""``CocoDataModule``: COCO instances for Lightning (``samflow.data.coco_instances``: the dataset, its
items and their rules), chosen in an experiment as ``data: {class_path: samflow.data.coco.CocoDataModule,
init_args: {...}}``; ``collate_coco`` batches its items into ``CocoBatch``es, one prompt row per instance.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from samflow.data.coco_batch import collate_coco
from samflow.data.coco_instances import CocoInstances
from samflow.data.coco_proposals import sam_checksum
from samflow.data.errors import DataError
from samflow.data.eval_shard import EvalShardSampler, eval_shard_sampler
from samflow.data.resumable import ResumableLoader
from samflow.data.transforms import ImageResize

__all__ = ["CocoDataModule", "CocoInstances"]


class CocoDataModule(L.LightningDataModule):
    """COCO instances for Lightning: ``train`` / ``val`` / ``test`` / ``predict`` are each
    ``{annotations: FILE, images: FOLDER}`` (or None); the other arguments go to ``CocoInstances``.

    Args:
        train: the training split, ``{annotations: FILE, images: FOLDER}``.
        val: the validation split (same form).
        test: the test split (same form).
        predict: the split ``samflow predict`` reads (same form).
        img_size: S, the model's square input side.
        points: ``"qc"`` (sampled quasi-centre points) or ``"annotation"`` (read ``point_key``).
        points_per_instance: P, points per instance (``"qc"``: P independent draws; ``"annotation"``:
            the first P given, an error if fewer).
        point_key: the annotation key holding points for ``points="annotation"``.
        seed: seed of the quasi-centre points (the training order follows the run's ``seed_everything``
            seed and the epoch, and resumes mid-epoch: ``samflow.data.ResumableLoader``).
        crowd: ``"skip"`` (iscrowd regions are no rows; kept as ``crowd_mask``) or ``"keep"``.
        empty: ``"skip"`` (images without instances are left out) or ``"keep"`` (they are images without
            prompt rows: counted in evaluation, scored by no metric; a training batch of only such
            images teaches nothing, its step is skipped).
        image_resize: ``"sam"`` (segment-anything's own Pillow resize, exact) or ``"bilinear"``
            (torch's antialiased interpolate, faster, within one grey level).
        batch_size: images per batch (every instance of an image is a row of the batch).
        num_workers: data-loader worker processes.
        proposals: the ``proposals.json`` (or store folder) of ``samflow proposals`` for the train split:
            each row then carries its proposal bag (``CocoBatch.proposals``, SAPNet's input). Refused
            when made for other data, or (in ``setup``, when the run's module is a SAM model) by
            another SAM.
        aux_masks: see ``CocoInstances``; the train split only (the evaluation files need not have them).
    """

    def __init__(
        self,
        train: dict[str, str] | None = None,
        val: dict[str, str] | None = None,
        test: dict[str, str] | None = None,
        predict: dict[str, str] | None = None,
        img_size: int = 1024,
        points: Literal["qc", "annotation"] = "qc",
        points_per_instance: int = 1,
        point_key: str = "point",
        seed: int = 0,
        crowd: Literal["skip", "keep"] = "skip",
        empty: Literal["skip", "keep"] = "skip",
        batch_size: int = 2,
        num_workers: int = 0,
        proposals: str | None = None,
        aux_masks: str | None = None,
        image_resize: ImageResize = "sam",
    ) -> None:
        super().__init__()
        self.splits = {"train": train, "val": val, "test": test, "predict": predict}
        self.proposals = proposals
        self.options = {
            "img_size": img_size,
            "points": points,
            "points_per_instance": points_per_instance,
            "point_key": point_key,
            "seed": seed,
            "crowd": crowd,
            "empty": empty,
            "image_resize": image_resize,
        }
        self.aux_masks = aux_masks
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
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
            options: dict[str, Any] = dict(self.options)
            if split == "train" and self.proposals and proposals:
                options["proposals"] = self.proposals
            if split == "train" and self.aux_masks:
                options["aux_masks"] = self.aux_masks
            dataset = CocoInstances(spec["annotations"], spec.get("images"), **options)
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
