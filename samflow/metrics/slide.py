"""Dice per slide: the patches' overlaps summed per source file (a slide), then Dice, mean over slides."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from samflow.metrics.functional._inputs import format_inputs


def source_id(source: str) -> int:
    """A 63-bit id of a source path, the same in every process (blake2b, not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.blake2b(source.encode(), digest_size=8).digest(), "little") >> 1


class SlideDice(Metric):
    """Dice per slide, averaged over slides (registered ``slide_dice``).

    For slide s with evaluated patches i, ``P_i = preds_i > threshold`` and ``G_i`` the ground truth:

        D_s = 2 Σ_i |P_i ∩ G_i| / (Σ_i |P_i| + Σ_i |G_i|)     (1 when both sums are 0)

    and ``compute() = mean_s D_s`` (float64). ``dice`` is instead the mean over patches of each
    patch's Dice; on tumour-free patches it is 0 or 1, while a slide counts every pixel once.

    The slide of a patch is ``update``'s ``source``: ``SamflowModule`` passes each image's
    ``SamBatch.path``, which ``SlideDataModule`` sets to the slide file (for image folders it is the
    image, so ``slide_dice`` equals ``dice``). The states are per-patch integers (source id,
    ``|P ∩ G|``, ``|P| + |G|``) concatenated over processes, so the reduction under DDP is exact
    whichever process saw which patches of a slide.

    Args:
        threshold: probability above which a pixel of ``preds`` is foreground (0.5; named by its short
            name in ``model.metrics``, the metric takes ``model.threshold``).
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    source_ids: list[Tensor]
    intersections: list[Tensor]
    totals: list[Tensor]

    def __init__(self, *, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("source_ids", "intersections", "totals"):
            self.add_state(name, [], dist_reduce_fx="cat")
        self.names: dict[int, str] = {}  # this process's sources, for ``per_slide``

    def update(self, preds: Tensor, target: Tensor, source: str | Sequence[str] = "") -> None:
        """Add patches: preds in [0, 1] and target {0, 1}, (H, W) or (N, [1,] H, W); ``source`` the
        slide of each (one path for all, or one per patch)."""
        preds, target = format_inputs(preds, target)
        sources = [source] * preds.shape[0] if isinstance(source, str) else list(source)
        if len(sources) != preds.shape[0]:
            raise ValueError(f"SlideDice: {preds.shape[0]} patches but {len(sources)} sources.")
        pred_fg = preds > self.threshold
        ids = [source_id(s) for s in sources]
        self.names.update(zip(ids, sources))
        self.source_ids.append(torch.tensor(ids, dtype=torch.long, device=preds.device))
        self.intersections.append((pred_fg & target).sum(dim=(1, 2)).long())
        self.totals.append((pred_fg.sum(dim=(1, 2)) + target.sum(dim=(1, 2))).long())

    def _per_source(self) -> tuple[Tensor, Tensor]:
        """(source ids (S,), Dice per source (S,) float64), ids sorted."""
        ids = dim_zero_cat(self.source_ids)
        ids, inverse = torch.unique(ids, return_inverse=True)
        inter = torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        total = torch.zeros_like(inter)
        inter.index_add_(0, inverse, dim_zero_cat(self.intersections))
        total.index_add_(0, inverse, dim_zero_cat(self.totals))
        dice = torch.where(total > 0, 2 * inter.double() / total.clamp_min(1).double(), 1.0)
        return ids, dice

    def compute(self) -> Tensor:
        return self._per_source()[1].mean()

    def per_slide(self) -> dict[str, float]:
        """Dice of every slide, by path, over the patches of all processes (under DDP a collective:
        every process calls it)."""
        names = dict(self.names)
        with self.sync_context(should_unsync=True):
            ids, dice = self._per_source()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict[int, str] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, names)
            for part in gathered:
                names.update(part or {})
        return {names.get(int(i), f"#{int(i)}"): float(d) for i, d in zip(ids, dice)}
