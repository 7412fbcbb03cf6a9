"""``SlideDataModule``: WSI-SAM's concentric HR / LR patches of slides as a Lightning data module.

Chosen in an experiment like every data module::

    data:
      class_path: samflow.data.wsi.SlideDataModule
      init_args:
        train: [{slide: /data/CAMELYON16/training/tumor/tumor_001.tif,
                 annotations: /data/CAMELYON16/training/lesion_annotations/tumor_001.xml}]
        val: [...]

A slide entry is ``{slide: PATH, annotations: PATH or null}``; annotations are GeoJSON, ASAP XML or a
label image (with ``label_downsample``). Training draws new patch centres each epoch (seeded per
slide and epoch); validation and test draw once (epoch 0), so every evaluation sees the same patches.
Every sample carries its slide in ``SamBatch.path``, so the ``slide_dice`` metric reports Dice per
slide beside the per-patch ``dice``; under DDP each process evaluates a contiguous, unpadded part
of the patches (``EvalShardSampler``), so both equal one process's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from samflow.batch import SamBatch
from samflow.data.augment import BatchAugment, augment_training_batch
from samflow.data.batch import collate
from samflow.data.errors import DataError, check_loader_counts
from samflow.data.eval_shard import EvalShardSampler, eval_shard_sampler
from samflow.data.prompts import PromptSampler
from samflow.data.resumable import ResumableLoader
from samflow.data.wsi.patches import SlidePatches, wsi_sam_prompts


def _entries(split: str, entries: Sequence[Mapping[str, Any]] | None) -> tuple[list[str], list[str | None]]:
    slides: list[str] = []
    annotations: list[str | None] = []
    for i, entry in enumerate(entries or []):
        if not isinstance(entry, Mapping) or "slide" not in entry:
            raise ValueError(
                f"data.init_args.{split}[{i}]: expected {{slide: PATH, annotations: PATH or null}}, got {entry!r}."
            )
        slides.append(str(entry["slide"]))
        ann = entry.get("annotations")
        annotations.append(None if ann is None else str(ann))
    return slides, annotations


def _check_options(positive: dict[str, float], tumour_fraction: float) -> None:
    """Refuse values the patches cannot use, naming the option, when the data module is built (else the
    first slide read fails with a traceback); the counts: ``check_loader_counts``."""
    for name, value in positive.items():
        if not value > 0:  # NaN too
            raise ValueError(f"data.init_args.{name} must be positive, got {value}.")
    if not 0 <= tumour_fraction <= 1:
        raise ValueError(
            f"data.init_args.tumour_fraction is a share of the patches, in [0, 1]; got {tumour_fraction}."
        )


class SlideDataModule(L.LightningDataModule):
    """Concentric HR / LR patches of whole slides for two-resolution plugins (WSI-SAM).

    Args:
        train: training slides, entries ``{slide: PATH, annotations: PATH | null}``.
        val: validation slides (same form; empty: no validation).
        test: test slides (same form).
        mpp: HR microns per pixel (1.0: 10x); LR at ``factor * mpp`` (2: 5x).
        factor: LR / HR mpp.
        patch_size: side of both patches in slide pixels (1024).
        img_size: the model's input side.
        patches_per_slide: training samples per slide and epoch.
        eval_patches_per_slide: validation / test samples per slide (drawn once).
        tumour_fraction: share of a slide's samples centred in tumour.
        seed: the sampler's seed (slide s, epoch e draws from (seed, s, e)).
        prompt: the training prompt sampler (default: WSI-SAM's uniform box / 10 points / noisy mask).
        eval_prompt: the evaluation prompt sampler (default: the same mix, seeded, so fixed per patch).
        slide_mpp: level-0 mpp for slides without metadata.
        tissue_mpp: resolution of the tissue detection.
        label_downsample: level-0 pixels per pixel of label-image annotations.
        hflip_jitter: WSI-SAM's shared flip and colour jitter for HR and LR on training patches.
        augment: an optional batch augmentation on the device (e.g. ``GpuAugment``; it transforms
            the context view with the same draw).
        batch_size: training patches per batch.
        eval_batch_size: validation and test patches per batch.
        num_workers: data-loader worker processes.
    """

    def __init__(
        self,
        train: list[dict[str, Any]] | None = None,
        val: list[dict[str, Any]] | None = None,
        test: list[dict[str, Any]] | None = None,
        *,
        mpp: float = 1.0,
        factor: float = 2.0,
        patch_size: int = 1024,
        img_size: int = 1024,
        patches_per_slide: int = 10,
        eval_patches_per_slide: int = 10,
        tumour_fraction: float = 0.5,
        seed: int = 0,
        prompt: PromptSampler | None = None,
        eval_prompt: PromptSampler | None = None,
        slide_mpp: float | None = None,
        tissue_mpp: float = 16.0,
        label_downsample: float = 1.0,
        hflip_jitter: bool = True,
        augment: BatchAugment | None = None,
        batch_size: int = 1,
        eval_batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_options(
            positive={
                "mpp": mpp,
                "factor": factor,
                "tissue_mpp": tissue_mpp,
                "label_downsample": label_downsample,
                **({} if slide_mpp is None else {"slide_mpp": slide_mpp}),
            },
            tumour_fraction=tumour_fraction,
        )
        counts = {
            "patch_size": patch_size,
            "patches_per_slide": patches_per_slide,
            "eval_patches_per_slide": eval_patches_per_slide,
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
        }
        check_loader_counts("data.init_args.", counts, num_workers)
        self.entries = {
            split: _entries(split, entries)
            for split, entries in (("train", train), ("val", val), ("test", test))
        }
        self.common: dict[str, Any] = {
            "mpp": mpp,
            "factor": factor,
            "patch_size": patch_size,
            "img_size": img_size,
            "tumour_fraction": tumour_fraction,
            "seed": seed,
            "slide_mpp": slide_mpp,
            "tissue_mpp": tissue_mpp,
            "label_downsample": label_downsample,
        }
        self.patches_per_slide, self.eval_patches_per_slide = patches_per_slide, eval_patches_per_slide
        self.prompt = prompt if prompt is not None else wsi_sam_prompts()
        self.eval_prompt = eval_prompt if eval_prompt is not None else wsi_sam_prompts()
        self.hflip_jitter, self.augment = hflip_jitter, augment
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.datasets: dict[str, SlidePatches] = {}

    def dataset(self, split: str) -> SlidePatches:
        """The split's patches (built on first use; tissue detection reads each slide once)."""
        if split not in self.datasets:
            slides, annotations = self.entries[split]
            if not slides:
                raise DataError(f"SlideDataModule: no slides for '{split}' (set data.init_args.{split}).")
            train = split == "train"
            self.datasets[split] = SlidePatches(
                slides,
                annotations,
                patches_per_slide=self.patches_per_slide if train else self.eval_patches_per_slide,
                prompt=self.prompt if train else self.eval_prompt,
                augment=self.hflip_jitter and train,
                **self.common,
            )
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", ())
        for split in splits:
            if self.entries[split][0]:
                self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        common: dict[str, Any] = {"num_workers": self.num_workers, "collate_fn": collate}
        if split == "train":
            # order and centres from (seed, epoch): the sampler tells the patches each epoch (at its
            # start, and on resume), and a run resumed mid-epoch skips the batches it trained
            return ResumableLoader(dataset, shuffle=shuffle, batch_size=self.batch_size, **common)
        sampler = self._eval_sampler(split, dataset)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, **common)

    def _eval_sampler(self, split: str, dataset: SlidePatches) -> EvalShardSampler | None:
        """Under DDP, this process's contiguous, unpadded part of the val / test patches, so every
        patch is evaluated once and per-patch and per-slide metrics equal one process's (Lightning's
        ``DistributedSampler`` would repeat patches). None in one process or without
        ``use_distributed_sampler``."""
        key = f"data.init_args.{split} ({len(dataset)} patches: eval_patches_per_slide x slides)"
        return eval_shard_sampler(self.trainer, dataset, key)

    def train_dataloader(self) -> DataLoader:
        """Training patches: centres, order, flips and prompts drawn anew each epoch (from the seeds and
        the epoch: a resumed run draws the uninterrupted run's)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation patches (fixed), or no validation when ``val`` is empty."""
        return self._loader("val", shuffle=False) if self.entries["val"][0] else []

    def test_dataloader(self) -> DataLoader:
        """Test patches (fixed)."""
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch: SamBatch, dataloader_idx: int) -> SamBatch:
        """Apply ``augment`` to training batches, on the device (``augment_training_batch``: an
        augmentation with ``set_epoch`` learns the trainer's epoch first)."""
        return augment_training_batch(self.augment, self.trainer, batch)

    def batch_example(self, split: str = "val", size: int = 2) -> SamBatch:
        """A collated batch of the first ``size`` patches of ``split``."""
        dataset = self.dataset(split)
        return collate([dataset[i] for i in range(min(size, len(dataset)))])

    def __repr__(self) -> str:
        sizes = {k: len(v[0]) for k, v in self.entries.items()}
        return f"SlideDataModule(mpp={self.common['mpp']}, factor={self.common['factor']}, slides={sizes})"
