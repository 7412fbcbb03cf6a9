"""Evaluation metrics (torchmetrics ``Metric``s) on probability maps in [0, 1] against binary masks.

Kernels that return per-image scores live in :mod:`samflow.metrics.functional`.
"""

from samflow.metrics.ber import BER, PerImageBER
from samflow.metrics.boundary_iou import BoundaryIoU
from samflow.metrics.segmentation import BinaryDice, BinaryIoU, MeanAbsoluteError, SodMAE
from samflow.metrics.slide import SlideDice
from samflow.metrics.sod import EMeasure, SMeasure, WeightedFMeasure

__all__ = [
    "BER",
    "BinaryDice",
    "BinaryIoU",
    "BoundaryIoU",
    "EMeasure",
    "MeanAbsoluteError",
    "PerImageBER",
    "SMeasure",
    "SlideDice",
    "SodMAE",
    "WeightedFMeasure",
]
