"""The tiles of ``samflow predict-slide`` and their probabilities, split over processes.

``tile_chunks`` lays the tile grid over a slide at the HR mpp, keeps the tiles that touch tissue and
cuts them into batches (``Chunk``) in the order one process runs them; ``tile_probabilities`` runs a
batch through the model with its LR context; ``chunk_probabilities`` runs chunk g on process g mod N
and gathers each round on process 0 (``samflow.wsi_predict`` describes the whole command).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samflow.data.batch import collate
from samflow.data.wsi.patches import pair_item, wsi_sam_prompts
from samflow.data.wsi.slide import Slide
from samflow.data.wsi.tissue import tissue_mask

_NO_PROMPT = wsi_sam_prompts()  # pair_item draws prompts only with a ground truth; tiles get a box


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts covering [0, length): 0, stride, 2 stride, ... while the previous tile ends before length."""
    return [i * stride for i in range(max(1, math.ceil(max(length - tile, 0) / stride) + 1))]


def _tile_has_tissue(tissue: np.ndarray, ds: float, x0: float, y0: float, side: float) -> bool:
    """Whether the level-0 square [x0, x0 + side) x [y0, y0 + side) touches tissue (at its level)."""
    r0, c0 = max(int(y0 / ds), 0), max(int(x0 / ds), 0)
    r1, c1 = math.ceil((y0 + side) / ds), math.ceil((x0 + side) / ds)
    return bool(tissue[r0:r1, c0:c1].any())


@torch.no_grad()
def tile_probabilities(
    module: Any, slide: Slide, origins: Sequence[tuple[int, int]], *, mpp: float, factor: float, tile: int
) -> Tensor:
    """Sigmoid probabilities (N, tile, tile) of the HR tiles starting at ``origins`` (HR pixels)."""
    size = module.model.img_size
    pixel = mpp / slide.mpp  # level-0 px per HR px
    items = []
    for x0, y0 in origins:
        centre = ((x0 + tile / 2) * pixel, (y0 + tile / 2) * pixel)
        hr, lr = slide.read(centre, mpp, tile), slide.read(centre, mpp * factor, tile)
        item = pair_item(
            hr,
            lr,
            None,
            None,
            factor=factor,
            size=size,
            sampler=_NO_PROMPT,
            generator=torch.Generator(),
            item_id="",
        )
        item["box"] = torch.tensor([0.0, 0.0, size - 1.0, size - 1.0])  # the whole tile
        items.append(item)
    batch = collate(items).to(module.device)
    out, _ = module(batch)
    logits = torch.nn.functional.interpolate(
        out.pred.float(), size=(tile, tile), mode="bilinear", align_corners=False
    )
    return torch.sigmoid(logits[:, 0]).cpu()


Chunk = tuple[int, list[tuple[int, int]]]  # (tile row k, HR origins of one batch of tiles in that row)


def tile_chunks(
    slide: Slide, *, mpp: float, tile: int, overlap: int, batch_size: int, tissue_mpp: float
) -> tuple[list[int], list[int], list[Chunk]]:
    """(x origins, y origins, batches of tissue tiles in the order one process runs them: row by row,
    left to right, ``batch_size`` tiles of one row at a time)."""
    pixel = mpp / slide.mpp
    width, height = (math.ceil(d / pixel) for d in slide.dimensions)
    stride = tile - overlap
    tissue, ds = tissue_mask(slide, tissue_mpp)
    xs, ys = tile_origins(width, tile, stride), tile_origins(height, tile, stride)
    chunks: list[Chunk] = []
    for k, y0 in enumerate(ys):
        row = [(x0, y0) for x0 in xs if _tile_has_tissue(tissue, ds, x0 * pixel, y0 * pixel, tile * pixel)]
        chunks += [(k, row[i : i + batch_size]) for i in range(0, len(row), batch_size)]
    return xs, ys, chunks


def rank_and_world_in(group: Any = None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (the default group), (0, 1) without torch.distributed; unlike
    ``samflow.commands.rank_and_world`` it takes a group and never joins one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def chunk_probabilities(
    module: Any,
    slide: Slide,
    chunks: Sequence[Chunk],
    *,
    mpp: float,
    factor: float,
    tile: int,
    group: Any = None,
) -> Iterator[tuple[int, np.ndarray | None]]:
    """(index of the chunk, its probabilities (n, tile, tile)) for every chunk, in order, on process 0.

    Chunk g runs on process g mod N; after each round of N chunks process 0 gathers the round's
    results (``gather_object`` in ``group``). Other processes yield (g, None) for the chunks they ran.
    """
    import torch.distributed as dist

    rank, world = rank_and_world_in(group)
    for start in range(0, len(chunks), world):
        g = start + rank
        mine = None
        if g < len(chunks):
            mine = tile_probabilities(module, slide, chunks[g][1], mpp=mpp, factor=factor, tile=tile).numpy()
        if world == 1:
            yield g, mine
            continue
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=dist.get_global_rank(group, 0) if group else 0, group=group)
        if rank == 0:
            assert gathered is not None
            yield from ((start + r, gathered[r]) for r in range(min(world, len(chunks) - start)))
        elif mine is not None:
            yield g, None
