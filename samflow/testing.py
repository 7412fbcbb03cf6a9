"""Helpers for testing plugins: a random batch in samflow's data contract.

For plugin authors as much as for samflow's own tests and benchmarks::

    from samflow import HookedSam, PluginStack, build_sam
    from samflow.testing import random_batch

    out = HookedSam(build_sam("tiny"), PluginStack({"mine": MyPlugin()}))(random_batch(2))
"""

from __future__ import annotations

import torch

from samflow.batch import SamBatch


def random_batch(
    batch_size: int = 2,
    size: int = 128,
    prompt: str = "box",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SamBatch:
    """A ``SamBatch`` (``samflow/batch.py``) of random images (``dtype``), one rectangle
    mask per image and, by ``prompt``, its box (``"box"``), its centre point (``"points"``) or no
    prompt (``"none"``). Deterministic for ``seed``; on the CPU (move it with ``batch.to(device)``)."""
    if prompt not in ("box", "points", "none"):
        raise ValueError(f"random_batch: prompt must be 'box', 'points' or 'none', got {prompt!r}.")
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(batch_size, 3, size, size, generator=gen)
    mask = torch.zeros(batch_size, 1, size, size)
    boxes = []
    for b in range(batch_size):
        x0, y0 = (torch.randint(0, size // 2, (2,), generator=gen)).tolist()
        x1, y1 = x0 + size // 3, y0 + size // 4
        mask[b, 0, y0:y1, x0:x1] = 1
        boxes.append([x0, y0, x1 - 1, y1 - 1])
    batch = SamBatch(
        image=image.to(dtype),
        mask=mask.to(dtype),
        input_size=torch.full((batch_size, 2), size),
        original_size=torch.full((batch_size, 2), size),
        gt_original=[m[0].bool() for m in mask],
        id=[f"img{b}" for b in range(batch_size)],
    )
    if prompt == "box":
        batch.box = torch.tensor(boxes, dtype=dtype)
    elif prompt == "points":
        batch.points = torch.tensor([[[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]] for b in boxes], dtype=dtype)
        batch.point_labels = torch.ones(batch_size, 1, dtype=torch.long)
    return batch


def to_device(batch: SamBatch, device: torch.device | str) -> SamBatch:
    """The batch with its tensors moved to ``device`` (same as ``batch.to(device)``)."""
    return batch.to(device)
