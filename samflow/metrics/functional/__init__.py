"""Functional metric kernels: per-image scores (N,) from probability maps and binary masks."""

from samflow.metrics.functional.ber import balanced_error_rate, binary_confusion_counts, per_image_ber
from samflow.metrics.functional.boundary_iou import boundary_iou, boundary_width, mask_boundary
from samflow.metrics.functional.e_measure import adaptive_e_measure, e_measure_curve, enhanced_alignment
from samflow.metrics.functional.s_measure import s_measure
from samflow.metrics.functional.segmentation import binary_dice, binary_iou, mean_absolute_error
from samflow.metrics.functional.weighted_f_measure import weighted_f_measure

__all__ = [
    "adaptive_e_measure",
    "balanced_error_rate",
    "binary_confusion_counts",
    "binary_dice",
    "binary_iou",
    "boundary_iou",
    "boundary_width",
    "e_measure_curve",
    "enhanced_alignment",
    "mask_boundary",
    "mean_absolute_error",
    "per_image_ber",
    "s_measure",
    "weighted_f_measure",
]
