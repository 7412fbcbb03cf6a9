"""Region metrics averaged over images: IoU, Dice, MAE."""

from __future__ import annotations

from torch import Tensor

from samflow.metrics._per_image import PerImageMean
from samflow.metrics.functional.segmentation import binary_dice, binary_iou, mean_absolute_error


class BinaryIoU(PerImageMean):
    """Mean over images of ``|P ∩ G| / |P ∪ G|`` with ``P = preds > threshold`` (HQ-SAM's mIoU).

    This is the per-image mean, not the dataset-level IoU of summed counts. An image with both P and
    G empty scores 1.

    Args:
        threshold: probability above which a pixel of ``preds`` is foreground (0.5; named by its short
            name in ``model.metrics``, the metric takes ``model.threshold``).
    """

    higher_is_better = True

    def __init__(self, *, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        return binary_iou(preds, target, self.threshold)


class BinaryDice(PerImageMean):
    """Mean over images of ``2|P ∩ G| / (|P| + |G|)`` with ``P = preds > threshold``.

    An image with both P and G empty scores 1.

    Args:
        threshold: probability above which a pixel of ``preds`` is foreground (0.5; named by its short
            name in ``model.metrics``, the metric takes ``model.threshold``).
    """

    higher_is_better = True

    def __init__(self, *, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        return binary_dice(preds, target, self.threshold)


class MeanAbsoluteError(PerImageMean):
    """Mean over images of ``mean_{H,W} |p - g|``.

    ``normalize=False`` (default) uses the probabilities as they are; ``normalize=True`` min-max
    stretches each prediction first, which is the SOD benchmarks' MAE (PySODMetrics, SAM-Adapter) and
    the convention of :class:`SMeasure`, :class:`EMeasure` and :class:`WeightedFMeasure`.

    Args:
        normalize: min-max stretch each prediction to [0, 1] before taking the error.
    """

    higher_is_better = False

    def __init__(self, *, normalize: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.normalize = normalize

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        return mean_absolute_error(preds, target, self.normalize)


class SodMAE(MeanAbsoluteError):
    """The SOD benchmarks' MAE (PySODMetrics ``MAE``, SAM-Adapter's ``sod_metric.py``), registered ``mae_sod``.

    Per image, the prediction is min-max stretched to [0, 1] (left as it is when constant), then
    ``mean |p - g|``; the dataset value is the mean over images. PySODMetrics does the same on the
    8-bit map divided by 255 with the GT at ``> 128``. ``MeanAbsoluteError(normalize=True)``; ``mae``
    (:class:`MeanAbsoluteError`) is the plain MAE of the probabilities, not comparable to SOD papers.

    Args:
        normalize: min-max stretch each prediction to [0, 1] first (False gives ``mae``).
    """

    def __init__(self, *, normalize: bool = True, **kwargs) -> None:
        super().__init__(normalize=normalize, **kwargs)
