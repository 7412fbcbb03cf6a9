"""Boundary IoU averaged over images (HQ-SAM's mBIoU)."""

from __future__ import annotations

from torch import Tensor

from samflow.metrics._per_image import PerImageMean
from samflow.metrics.functional.boundary_iou import boundary_iou


class BoundaryIoU(PerImageMean):
    """Mean over images of the IoU of the d-pixel inner boundary bands of ``preds > threshold`` and the GT.

    ``d = max(1, round(dilation_ratio · image diagonal))``, the image border counts as boundary, and an
    image where both masks are empty scores 1 (see ``functional.boundary_iou``).

    Args:
        dilation_ratio: width d of the boundary bands as a fraction of the image diagonal.
        threshold: probability above which a pixel of ``preds`` is foreground (0.5; named by its short
            name in ``model.metrics``, the metric takes ``model.threshold``).
    """

    higher_is_better = True

    def __init__(self, *, dilation_ratio: float = 0.02, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        if dilation_ratio <= 0:
            raise ValueError(f"BoundaryIoU: dilation_ratio must be > 0, got {dilation_ratio}.")
        self.dilation_ratio = dilation_ratio
        self.threshold = threshold

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        return boundary_iou(preds, target, self.dilation_ratio, self.threshold)
