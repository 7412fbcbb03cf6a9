"""``EvalShardSampler``: under DDP, each process's contiguous, unpadded part of an evaluation set.

``eval_shard_sampler`` gives the sampler of this process from the trainer (None in one process), for
``SegmentationDataModule``, ``CocoDataModule`` and ``SlideDataModule``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DistributedSampler

from samflow.data.errors import DataError


class EvalShardSampler(DistributedSampler):
    """One process's part of an evaluation set: a contiguous, unpadded range of indices, in order.

    ``n`` images on ``W`` processes: the first ``n % W`` processes get ``n // W + 1`` images, the others
    ``n // W``, so every image is evaluated exactly once (``DistributedSampler`` instead repeats
    images until every process has as many). Process 0 gets the first images, as one process would
    see them. A set with fewer images than processes is refused: a process without any batch would
    leave Lightning's and the metrics' collective calls unmatched.

    It is a ``DistributedSampler``, so Lightning keeps it instead of injecting its own.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, key: str = "the evaluation set") -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        total = len(dataset)
        if total < num_replicas:
            raise DataError(
                f"{key} has {total} image(s), fewer than the {num_replicas} processes of this run; "
                "each process evaluates a part of every set without repeating images, so run with at "
                f"most {total} device(s) or give the set more images."
            )
        base, extra = divmod(total, num_replicas)
        self.start = rank * base + min(rank, extra)
        self.num_samples = base + (rank < extra)
        self.total_size = total

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.start + self.num_samples))

    def __len__(self) -> int:
        return self.num_samples


def eval_shard_sampler(trainer: Any, dataset: Any, key: str) -> EvalShardSampler | None:
    """Under DDP, this process's ``EvalShardSampler`` of an evaluation ``dataset`` (``key`` names it in
    errors); None in one process, without a trainer, or with the trainer's ``use_distributed_sampler``
    off (then the loaders are the user's business)."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    connector = getattr(trainer, "_accelerator_connector", None)
    if (
        not kwargs
        or kwargs.get("num_replicas", 1) <= 1
        or not getattr(connector, "use_distributed_sampler", True)
    ):
        return None
    return EvalShardSampler(dataset, num_replicas=kwargs["num_replicas"], rank=kwargs["rank"], key=key)
