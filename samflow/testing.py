"""Helpers for testing plugins: a random batch in samflow's data contract; a synthetic slide.

For plugin authors as much as for samflow's own tests and benchmarks::

    from samflow import HookedSam, PluginStack, build_sam
    from samflow.testing import random_batch

    out = HookedSam(build_sam("tiny"), PluginStack({"mine": MyPlugin()}))(random_batch(2))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def write_disc_slide(path: str | Path, width: int, height: int, mpp: float = 0.5, tile: int = 64) -> Path:
    """A pyramidal TIFF slide of ``width`` x ``height`` px at ``mpp`` um/px (levels halving down to 64 px,
    as scanners write them, in ``tile`` x ``tile`` TIFF tiles): textured tissue with dark discs every
    96 px, and glass on the right eighth (so tissue detection has two classes). Needs ``tifffile``
    (``samflow[wsi]``)."""
    import tifffile

    rng = np.random.default_rng(0)
    level = np.stack([rng.integers(lo, lo + 40, (height, width)) for lo in (200, 120, 170)], -1).astype(
        np.uint8
    )
    yy, xx = np.mgrid[0:height, 0:width]
    level[((xx % 96) - 48) ** 2 + ((yy % 96) - 48) ** 2 < 30**2] = (90, 30, 120)
    level[:, width - width // 8 :] = 255
    levels = [level]
    while max(levels[-1].shape[:2]) > 64:
        a = levels[-1]
        h, w = a.shape[0] // 2, a.shape[1] // 2
        levels.append(a[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean((1, 3)).astype(np.uint8))
    path = Path(path)
    with tifffile.TiffWriter(path) as tif:
        for i, lv in enumerate(levels):
            res = 1e4 / (mpp * 2**i)  # pixels per centimetre
            tif.write(
                lv,
                tile=(tile, tile),
                photometric="rgb",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subifds=len(levels) - 1 if i == 0 else None,
                subfiletype=None if i == 0 else 1,
            )
    return path
