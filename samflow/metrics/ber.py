"""Balanced error rate for shadow detection."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from samflow.metrics._per_image import PerImageMean
from samflow.metrics.functional.ber import (
    SAM_ADAPTER_BER_LEVEL,
    balanced_error_rate,
    binary_confusion_counts,
    per_image_ber,
)


class BER(Metric):
    """Global balanced error rate in percent, ``100·(1 - (TP/(TP + FN) + TN/(TN + FP)) / 2)``; lower is better.

    ``per_image=False`` (default, the shadow benchmarks' convention): TP/TN/FP/FN are summed over the
    whole dataset, then BER is computed once. ``per_image=True``: BER of each image, averaged (as
    :class:`PerImageBER`, registered ``ber_per_image``, which also has SAM-Adapter's threshold).
    Foreground is ``preds > threshold``, or ``preds * 255 > level`` in ``preds``' dtype (float32 for
    bf16 / float16) when ``level`` is given (``level: 125`` is SAM-Adapter's rule); a class absent from
    the GT counts as perfectly classified (accuracy 1). ``compute()`` returns a float64 scalar.

    Args:
        threshold: probability above which a pixel of ``preds`` is foreground (when ``level`` is None;
            0.5; named by its short name in ``model.metrics``, the metric takes ``model.threshold``).
        level: foreground where ``preds * 255 > level`` instead (125: SAM-Adapter's rule).
        per_image: average the BER of each image instead of computing it once from the counts of
            the whole dataset.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    counts: Tensor
    per_image_sum: Tensor
    num_images: Tensor

    def __init__(
        self, *, threshold: float = 0.5, level: float | None = None, per_image: bool = False, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.level = level
        self.per_image = per_image
        # [TP, TN, FP, FN] summed over all images; int64 keeps large datasets exact.
        self.add_state("counts", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("per_image_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add images: preds in [0, 1] and target {0, 1}, (H, W), (N, H, W) or (N, 1, H, W)."""
        counts = binary_confusion_counts(preds, target, self.threshold, self.level)  # (N, 4)
        self.counts += counts.sum(dim=0)
        self.per_image_sum += balanced_error_rate(counts).sum()
        self.num_images += counts.shape[0]

    def compute(self) -> Tensor:
        if self.per_image:
            return self.per_image_sum / self.num_images
        return balanced_error_rate(self.counts)


class PerImageBER(PerImageMean):
    """BER as SAM-Adapter reports it (its ISTD 1.43): the mean over images of each image's BER, in percent.

    Foreground is ``preds * 255 > level`` with ``level = 125`` (the reference's ``pred * 255 > 125``,
    strict, evaluated in ``preds``' dtype, float32 for bf16 / float16); see ``functional.per_image_ber``.
    Lower is better. The states are sums (of per-image BER and of images), so DDP reduction is exact.
    The global one (counts pooled over all pixels of the set) is :class:`BER`.

    Args:
        level: foreground where ``preds * 255 > level`` (125: SAM-Adapter's rule).
    """

    higher_is_better = False

    def __init__(self, *, level: float = SAM_ADAPTER_BER_LEVEL, **kwargs) -> None:
        super().__init__(**kwargs)
        self.level = level

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        return per_image_ber(preds, target, self.level)
