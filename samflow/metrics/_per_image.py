"""Base class of the metrics that average one score per image over the dataset."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class PerImageMean(Metric):
    """Mean over images of a per-image score: ``compute() = Σ_i s_i / n``, a float64 scalar.

    Both states are sums (``dist_reduce_fx="sum"``), so DDP reduction and ``merge_state`` are exact
    up to float64 summation order. Subclasses implement :meth:`_scores`.
    """

    is_differentiable = False
    full_state_update = False

    score_sum: Tensor
    num_images: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        """Per-image scores (N,) of probabilities ``preds`` against masks ``target``."""
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add images: preds in [0, 1] and target {0, 1}, (H, W), (N, H, W) or (N, 1, H, W)."""
        scores = self._scores(preds, target)
        self.score_sum += scores.sum()
        self.num_images += scores.numel()

    def compute(self) -> Tensor:
        return self.score_sum / self.num_images
