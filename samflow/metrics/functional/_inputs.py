"""Input formatting shared by the metric kernels."""

from __future__ import annotations

import torch
from torch import Tensor

# Kernels compute in float64: SOD metrics are compared against MATLAB/NumPy references at 1e-4 and
# bin predictions at multiples of 1/255, where float32 rounding would move pixels across bins.
DTYPE = torch.float64
# NumPy's ``np.spacing(1)`` (MATLAB's ``eps``), the guard the SOD references add to denominators.
EPS = torch.finfo(torch.float64).eps


def format_inputs(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Check and batch a probability map and a binary mask.

    Args:
        preds: probabilities in [0, 1], (H, W), (N, H, W) or (N, 1, H, W).
        target: ground truth of the same shape, bool or {0, 1}; foreground is ``target > 0.5``.

    Returns:
        preds as float64 (N, H, W) and target as bool (N, H, W).
    """
    if preds.shape != target.shape:
        raise ValueError(
            f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape."
        )
    if preds.ndim == 4 and preds.shape[1] == 1:
        preds, target = preds[:, 0], target[:, 0]
    elif preds.ndim == 2:
        preds, target = preds[None], target[None]
    elif preds.ndim != 3:
        raise ValueError(f"Expected (H, W), (N, H, W) or (N, 1, H, W) masks, got {tuple(preds.shape)}.")
    if not preds.is_floating_point():
        raise TypeError(f"preds must be a float probability map in [0, 1], got dtype {preds.dtype}.")
    if preds.numel() and (preds.min() < 0 or preds.max() > 1):
        raise ValueError(
            f"preds must be probabilities in [0, 1], got values in [{preds.min():.3g}, {preds.max():.3g}]; "
            "apply a sigmoid to logits first."
        )
    target = target if target.dtype == torch.bool else target > 0.5
    return preds.to(DTYPE), target


def minmax_normalize(preds: Tensor) -> Tensor:
    """Stretch each image of (N, H, W) to [0, 1]: ``(p - min) / (max - min)``; constant images are kept.

    This is MATLAB's ``mapminmax`` as the SOD benchmarks (and PySODMetrics) apply it per image.
    """
    low = preds.amin(dim=(-2, -1), keepdim=True)
    high = preds.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    constant = span == 0
    stretched = (preds - low) / torch.where(constant, torch.ones_like(span), span)
    return torch.where(constant, preds, stretched)


def ratio_or(numerator: Tensor, denominator: Tensor, value: float) -> Tensor:
    """``numerator / denominator``, and ``value`` where the denominator is 0."""
    empty = denominator == 0
    safe = torch.where(empty, torch.ones_like(denominator), denominator)
    return torch.where(empty, torch.full_like(numerator, value), numerator / safe)
