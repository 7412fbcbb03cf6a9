"""Salient / camouflaged object detection metrics, following PySODMetrics' conventions.

Each prediction is min-max stretched to [0, 1] per image unless ``normalize=False`` (PySODMetrics
reads 8-bit maps, divides by 255 and stretches); the GT is foreground where ``target > 0.5``.
Scores are computed in float64: 8-bit maps passed as float64 ``u8 / 255`` reproduce PySODMetrics to
~1e-15; float32 inputs move a few pixels across the E-measure's 1/255 bins (mean E within ~1e-5).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from samflow.metrics._per_image import PerImageMean
from samflow.metrics.functional.e_measure import NUM_THRESHOLDS, adaptive_e_measure, e_measure_curve
from samflow.metrics.functional.s_measure import s_measure
from samflow.metrics.functional.weighted_f_measure import weighted_f_measure


class SMeasure(PerImageMean):
    """Mean over images of the S-measure ``max(0, α·S_o + (1 - α)·S_r)`` (see ``functional.s_measure``).

    An empty GT scores ``1 - mean(p)``, a full GT ``mean(p)``.

    Args:
        alpha: weight α of the object-aware term S_o; the region-aware term S_r gets 1 - α.
        normalize: min-max stretch each prediction to [0, 1] first (PySODMetrics' convention).
    """

    higher_is_better = True

    def __init__(self, *, alpha: float = 0.5, normalize: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 <= alpha <= 1:
            raise ValueError(f"SMeasure: alpha must be in [0, 1], got {alpha}.")
        self.alpha = alpha
        self.normalize = normalize

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        return s_measure(preds, target, self.alpha, self.normalize)


class WeightedFMeasure(PerImageMean):
    """Mean over images of the weighted F-measure ``F^w_β`` (β² = 0.3); an empty GT scores 0.

    The distance transform runs on the CPU (scipy), see ``functional.weighted_f_measure``.

    Args:
        beta2: β², the weight of recall against precision (0.3 in SOD papers).
        normalize: min-max stretch each prediction to [0, 1] first (PySODMetrics' convention).
    """

    higher_is_better = True

    def __init__(self, *, beta2: float = 0.3, normalize: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if beta2 <= 0:
            raise ValueError(f"WeightedFMeasure: beta2 must be > 0, got {beta2}.")
        self.beta2 = beta2
        self.normalize = normalize

    def _scores(self, preds: Tensor, target: Tensor) -> Tensor:
        return weighted_f_measure(preds, target, self.beta2, self.normalize)


class EMeasure(Metric):
    """E-measure, in the three forms SOD papers report; ``compute()`` returns a dict of float64 scalars.

    * ``"em_mean"`` (Eφ, what SAM-Adapter reports): mean over the 256 thresholds of the dataset-mean curve.
    * ``"em_max"``: max over thresholds of the dataset-mean curve (not a mean of per-image maxima).
    * ``"em_adaptive"``: mean over images of E at the threshold ``min(2·mean(p), 1)``.

    ``curve()`` returns the dataset-mean curve itself, (256,), ascending threshold t = 0..255.
    In a ``MetricCollection`` the dict is flattened into these three keys.

    Args:
        normalize: min-max stretch each prediction to [0, 1] first (PySODMetrics' convention).
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    #: the keys of ``compute()``, logged in place of the metric's name; the first is its main value
    result_keys = ("em_mean", "em_max", "em_adaptive")

    curve_sum: Tensor
    adaptive_sum: Tensor
    num_images: Tensor

    def __init__(self, *, normalize: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.normalize = normalize
        self.add_state("curve_sum", torch.zeros(NUM_THRESHOLDS, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("adaptive_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add images: preds in [0, 1] and target {0, 1}, (H, W), (N, H, W) or (N, 1, H, W)."""
        curves = e_measure_curve(preds, target, self.normalize)
        self.curve_sum += curves.sum(dim=0)
        self.adaptive_sum += adaptive_e_measure(preds, target, self.normalize).sum()
        self.num_images += curves.shape[0]

    def curve(self) -> Tensor:
        """Dataset-mean E-measure at thresholds t = 0..255, (256,), synced across processes like compute()."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            return (self.curve_sum / self.num_images).clone()

    def compute(self) -> dict[str, Tensor]:
        curve = self.curve_sum / self.num_images
        return {
            "em_mean": curve.mean(),
            "em_max": curve.max(),
            "em_adaptive": self.adaptive_sum / self.num_images,
        }
