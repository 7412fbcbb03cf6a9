"""``SegmentationDataModule``: folder datasets, prompts and GPU augmentation for Lightning.

The batches follow the contract in ``samflow.data.batch``. Training prompts are drawn afresh each time
(from the global RNG, which ``seed_everything`` and Lightning's worker seeding make reproducible);
validation, test and predict prompts are seeded per sample index, so they are the same every epoch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from samflow.data.batch import collate
from samflow.data.folder import MaskFolderDataset
from samflow.data.prompts import NoPrompt, build_prompt
from samflow.data.quickstart import MARKER, make_quickstart_data
from samflow.data.transforms import GpuAugment, ResizeMode

# What a split may be: a root, a dict {"root": ..., "images": ..., "masks": ..., ...}, or a list of those.
SplitSpec = str | dict[str, Any] | list[str | dict[str, Any]] | None
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


def default_quickstart_root() -> Path:
    """``$XDG_CACHE_HOME/samflow/quickstart`` (``~/.cache/samflow/quickstart`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "samflow" / "quickstart"


class SegmentationDataModule(L.LightningDataModule):
    """Image / mask folders as train, val, test and predict splits.

    Args:
        train: training split: a dataset root (holding ``images/`` and ``masks/``), a dict
            ``{"root": ..., "images": "Imgs", "masks": "GT", "image_suffixes": [...],
            "mask_suffixes": [...]}``,
            or a list of those (concatenated, e.g. the HQSeg-44K parts).
        val: validation split, same forms.
        test: test split, same forms.
        predict: predict split, same forms; masks are optional (a root without a mask folder, or even a
            plain folder of images, predicts without ground truth and without prompts).
        img_size: S, the side of the model's square input (1024 for SAM, 128 for the tiny test SAM).
        resize_mode: ``"longest"`` (SAM's: longest side to S, zero-pad bottom / right) or ``"stretch"``.
        prompt: training prompt, a ``build_prompt`` spec: ``"none"``, ``"box"``, ``"points"``,
            ``"noisy_mask"``, ``"mixed"`` or a dict such as ``{"name": "box", "jitter": 0.1}``.
        eval_prompt: prompt for val / test / predict; ``None`` uses ``prompt``. Seeded per sample.
        batch_size: training batch size.
        eval_batch_size: batch size for val / test / predict; ``None`` uses ``batch_size``.
        num_workers: data-loader worker processes.
        seed: seed of the evaluation prompts (sample i uses ``(seed, i)``).
        augment: GPU augmentation applied to training batches after they reach the device.
        quickstart: generate the procedural quickstart dataset in ``prepare_data`` and use it for every
            split left ``None`` (train, val; test falls back to val). ``True`` uses the defaults of
            ``make_quickstart_data``; a dict passes its keys (``root``, ``n_train``, ``n_val``, ``size``,
            ``seed``).
        pin_memory: pin host memory for faster copies to a GPU.
    """

    def __init__(
        self,
        train: SplitSpec = None,
        val: SplitSpec = None,
        test: SplitSpec = None,
        predict: SplitSpec = None,
        img_size: int = 1024,
        resize_mode: ResizeMode = "longest",
        prompt: str | dict[str, Any] = "box",
        eval_prompt: str | dict[str, Any] | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        augment: GpuAugment | None = None,
        quickstart: bool | dict[str, Any] = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["augment"])
        self.splits: dict[str, SplitSpec] = {"train": train, "val": val, "test": test, "predict": predict}
        self.img_size = img_size
        self.resize_mode = resize_mode
        self.prompt = prompt
        self.eval_prompt = prompt if eval_prompt is None else eval_prompt
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.augment = augment
        self.quickstart = {} if quickstart is True else (dict(quickstart) if quickstart else None)
        self.pin_memory = pin_memory
        self.datasets: dict[str, MaskFolderDataset] = {}

    def _quickstart_root(self) -> Path:
        assert self.quickstart is not None
        return Path(self.quickstart.get("root") or default_quickstart_root()).expanduser()

    def prepare_data(self) -> None:
        """Write the quickstart data (once, on one process per node) when ``quickstart`` is set."""
        if self.quickstart is not None:
            kwargs = {k: v for k, v in self.quickstart.items() if k != "root"}
            make_quickstart_data(self._quickstart_root(), **kwargs)

    def _spec(self, split: str) -> SplitSpec:
        spec = self.splits[split]
        if spec is None and self.quickstart is not None and split != "predict":
            return str(self._quickstart_root() / ("train" if split == "train" else "val"))
        return spec

    def build_dataset(self, split: str) -> MaskFolderDataset:
        """Build the dataset of ``split`` ("train", "val", "test" or "predict")."""
        spec = self._spec(split)
        if spec is None:
            raise ValueError(f"SegmentationDataModule: no '{split}' data; set data.{split} (a folder root).")
        training = split == "train"
        dataset = MaskFolderDataset(
            spec,
            prompt=self.prompt if training else self.eval_prompt,
            img_size=self.img_size,
            resize_mode=self.resize_mode,
            prompt_seed=None if training else self.seed,
            require_masks=split != "predict",
        )
        wants_prompts = not isinstance(build_prompt(self.eval_prompt), NoPrompt)
        if split == "predict" and not dataset.has_masks and wants_prompts:
            rank_zero_warn(f"The predict data {spec} has no masks, so it is predicted without prompts.")
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs that are set (all of them when ``stage`` is None)."""
        if self.quickstart is not None and not (self._quickstart_root() / MARKER).is_file():
            self.prepare_data()  # outside a Trainer nobody called prepare_data
        for split in _STAGE_SPLITS.get(stage or "", ("train", "val", "test", "predict")):
            if split not in self.datasets and self._spec(split) is not None:
                self.datasets[split] = self.build_dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order; an empty list (no validation) when ``val`` is not set."""
        if "val" not in self.datasets and self._spec("val") is None:
            return []
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order (the quickstart's val data when only ``quickstart`` is set)."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Predict batches in a fixed order."""
        return self._loader("predict", shuffle=False)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Apply ``augment`` to training batches, on the device."""
        if self.augment is not None and self.trainer is not None and self.trainer.training:
            batch = self.augment(batch)
        return batch

    def batch_example(self, split: str = "val", size: int = 2) -> dict[str, Any]:
        """A collated batch of the first ``size`` samples of ``split`` (for tests and logging)."""
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        dataset = self.datasets[split]
        return collate([dataset[i] for i in range(min(size, len(dataset)))])

    def __repr__(self) -> str:
        sizes = {k: len(v) for k, v in self.datasets.items()}
        name = type(self).__name__
        return f"{name}(img_size={self.img_size}, resize_mode={self.resize_mode!r}, datasets={sizes})"
