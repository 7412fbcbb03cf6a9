"""Metrics by the names experiments use (``model.metrics: [iou, dice, mae]``)."""

from __future__ import annotations

from collections.abc import Sequence

from torchmetrics import Metric, MetricCollection

from samflow.metrics.ber import BER
from samflow.metrics.boundary_iou import BoundaryIoU
from samflow.metrics.segmentation import BinaryDice, BinaryIoU, MeanAbsoluteError
from samflow.metrics.sod import EMeasure, SMeasure, WeightedFMeasure


class SodMAE(MeanAbsoluteError):
    """The SOD benchmarks' MAE (PySODMetrics, SAM-Adapter): each prediction min-max normalised first.

    ``MeanAbsoluteError(normalize=True)`` under the registry name ``mae_sod``; ``mae`` is the plain
    MAE of the probabilities.
    """

    def __init__(self, *, normalize: bool = True, **kwargs) -> None:
        super().__init__(normalize=normalize, **kwargs)


METRICS: dict[str, type[Metric]] = {
    "iou": BinaryIoU,
    "dice": BinaryDice,
    "mae": MeanAbsoluteError,
    "mae_sod": SodMAE,
    "boundary_iou": BoundaryIoU,
    "s_measure": SMeasure,
    "e_measure": EMeasure,
    "weighted_f": WeightedFMeasure,
    "ber": BER,
}


def build_metrics(names: Sequence[str]) -> MetricCollection:
    """A ``MetricCollection`` of the named metrics; an unknown name lists the valid ones."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {sorted(METRICS)} (model.metrics).")
    return MetricCollection({name: METRICS[name]() for name in names}, compute_groups=False)
