"""Balanced error rate for shadow detection."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from samflow.metrics.functional.ber import balanced_error_rate, binary_confusion_counts


class BER(Metric):
    """Balanced error rate in percent, ``100·(1 - (TP/(TP + FN) + TN/(TN + FP)) / 2)``; lower is better.

    ``per_image=False`` (default, the shadow benchmarks' convention): TP/TN/FP/FN are summed over the
    whole dataset, then BER is computed once. ``per_image=True``: BER of each image, averaged (what
    SAM-Adapter's ``utils.py`` computes). Foreground is ``preds > threshold``; a class absent from the
    GT counts as perfectly classified (accuracy 1). ``compute()`` returns a float64 scalar.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    counts: Tensor
    per_image_sum: Tensor
    num_images: Tensor

    def __init__(self, *, threshold: float = 0.5, per_image: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.per_image = per_image
        # [TP, TN, FP, FN] summed over all images; int64 keeps large datasets exact.
        self.add_state("counts", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("per_image_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add images: preds in [0, 1] and target {0, 1}, (H, W), (N, H, W) or (N, 1, H, W)."""
        counts = binary_confusion_counts(preds, target, self.threshold)  # (N, 4)
        self.counts += counts.sum(dim=0)
        self.per_image_sum += balanced_error_rate(counts).sum()
        self.num_images += counts.shape[0]

    def compute(self) -> Tensor:
        if self.per_image:
            return self.per_image_sum / self.num_images
        return balanced_error_rate(self.counts)
