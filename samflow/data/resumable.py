"""``ResumableLoader``: training batches that a run killed mid-epoch continues exactly.

Two things make a resumed epoch differ from an uninterrupted one, and this loader removes both:

- The order. ``ResumableSampler`` draws the epoch's permutation from ``(seed, epoch)`` alone (as
  ``DistributedSampler`` does, whose subclass it is, so Lightning keeps it under DDP and it shards
  by the current process group), and its state (``seed``, ``epoch``, batches handed out) goes into
  the checkpoint through Lightning's resumable-loader interface (``state_dict`` /
  ``load_state_dict`` of the loader): a resumed epoch skips the batches already trained.
- The per-sample randomness (training prompts, anything a dataset draws from the global torch,
  numpy or ``random`` generators). Each sample is read with the three global generators seeded from
  ``(seed, epoch, index)`` and restored afterwards (``SeededSamples``), so a sample's draws do not
  depend on what ran before it, in which worker, or whether the run was restarted. A dict item also
  carries its ``sample_seed``, from which batch augmentation (``GpuAugment``) draws the sample's
  transform on the device. The process's own generators (dropout, a plugin's draws) are not touched by
  data loading at all. The data loader's worker base seed comes from the loader's own generator, not
  from the global one.
- What a dataset draws per epoch (``SlidePatches``' patch centres): a dataset with a ``set_epoch``
  method is told the sampler's epoch, at each epoch's start and on resume.

``seed`` defaults to the run's ``seed_everything`` seed (``PL_GLOBAL_SEED``), else 0.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from samflow.seeding import cpu_seeded, derived_seed

__all__ = ["ResumableLoader", "ResumableSampler", "SeededSamples", "sample_seed"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index`` in ``epoch``: independent streams for every triple."""
    return derived_seed(seed % 2**63, epoch, index)


class SeededSamples(Dataset):
    """``dataset[index]`` read with the global torch / numpy / ``random`` generators seeded per sample.

    Items are ``(seed, index)`` pairs (from ``ResumableSampler``); a plain index reads the sample as is.
    The generators' states are restored after each read. A dict item gets the seed as ``sample_seed``.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (samples, root, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if not isinstance(item, tuple):
            return self.dataset[item]
        seed, index = item
        numpy_state, python_state = np.random.get_state(), random.getstate()
        try:
            with cpu_seeded(seed):  # not torch.manual_seed: that would reseed the run's CUDA generator
                np.random.seed(seed % 2**32)
                random.seed(seed)
                sample = self.dataset[index]
            return {**sample, "sample_seed": seed} if isinstance(sample, dict) else sample
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) indices from ``(seed, epoch)``, sharded over the current process group,
    as ``(sample seed, index)`` pairs; ``skip`` leaves out the first samples of the next epoch."""

    def __init__(self, dataset: Any, seed: int = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0

    def _sync_world(self) -> None:
        """Read the process group when used, not when built (the loader is built before DDP starts)."""
        replicas, rank = _world()
        if (replicas, rank) != (self.num_replicas, self.rank):
            self.num_replicas, self.rank = replicas, rank
            size = len(self.dataset)  # type: ignore[arg-type]
            if self.drop_last and size % replicas:
                self.num_samples = math.ceil((size - replicas) / replicas)
            else:
                self.num_samples = math.ceil(size / replicas)
            self.total_size = self.num_samples * replicas

    def __len__(self) -> int:
        self._sync_world()
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (Lightning sets it at each epoch's start, a resume at the saved
        one); a dataset with its own ``set_epoch`` (``SlidePatches``' patch centres) is told too."""
        super().set_epoch(epoch)
        tell = getattr(self.dataset, "set_epoch", None)
        if callable(tell):
            tell(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override,unused-ignore]
        self._sync_world()
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        for index in indices[skip:]:
            yield sample_seed(self.seed, self.epoch, index), index


class ResumableLoader(DataLoader):
    """A ``DataLoader`` of training batches that Lightning can checkpoint and resume mid-epoch.

    Args:
        dataset: a map-style dataset.
        shuffle: shuffle each epoch (from ``(seed, epoch)``).
        seed: the seed of the order and of the per-sample draws; None: ``PL_GLOBAL_SEED`` or 0.
        drop_last: drop the last incomplete batch.
        **kwargs: the other ``DataLoader`` arguments (``batch_size``, ``num_workers``, ``collate_fn``,
            ...); not ``sampler``, ``batch_sampler`` or ``generator``.
    """

    def __init__(
        self,
        dataset: Any,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        kwargs.pop("sampler", None)  # Lightning passes them back when it re-creates a loader
        kwargs.pop("generator", None)
        data = dataset if isinstance(dataset, SeededSamples) else SeededSamples(dataset)
        sampler = ResumableSampler(data, seed=seed, shuffle=shuffle, drop_last=drop_last)
        super().__init__(
            data,
            sampler=sampler,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )
        self.batches = 0  # batches handed out in the current epoch

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler)
        self.batches = -(-sampler.skip // self.batch_size) if self.batch_size else 0  # before workers start
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # The DataLoader's own iterator is made at the first batch, not here: Lightning makes the
        # iterator of a run's first epoch before it sets the sampler's epoch, and worker processes
        # read the sampler (and take their copy of the dataset) as soon as they start, so a run
        # resumed at an epoch's end would have trained that epoch in epoch 0's order.
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The position in the epoch: seed, epoch and batches handed out so far."""
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler)
        return {"seed": sampler.seed, "epoch": sampler.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved epoch after its last trained batch (Lightning calls it on a mid-epoch resume)."""
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler)
        sampler.seed = int(state["seed"])
        sampler.set_epoch(int(state["epoch"]))
        sampler.skip = int(state["batches"]) * int(self.batch_size or 1)
