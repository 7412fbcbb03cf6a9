"""Structure measure (Fan et al., "Structure-measure: A new way to evaluate foreground maps", ICCV 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from samflow.metrics.functional._inputs import EPS, format_inputs, minmax_normalize


def s_measure(preds: Tensor, target: Tensor, alpha: float = 0.5, normalize: bool = True) -> Tensor:
    """S-measure per image, (N,).

    ``S = max(0, α·S_o + (1 - α)·S_r)``, with special cases ``1 - mean(p)`` for an empty GT and
    ``mean(p)`` for a full GT (Eq. 8 of the paper's code).

    * Object term: ``S_o = μ·O(p | G) + (1 - μ)·O(1 - p | ¬G)``, μ the GT foreground fraction and
      ``O(x) = 2x̄ / (x̄² + 1 + σ_x + eps)`` (σ_x the standard deviation with ddof = 1, 0 for one pixel).
    * Region term: split at the GT centroid, rounded half to even, plus one (MATLAB's 1-based
      ``1:X``), into four quadrants q of area fraction w_q; ``S_r = Σ_q w_q·ssim_q`` with
      ``ssim = 4x̄ȳσ_xy / ((x̄² + ȳ²)(σ_x² + σ_y²) + eps)`` (variances over ``n - 1 + eps``), 1 when
      numerator and denominator are both 0, 0 when only the numerator is.
      An empty quadrant (centroid on the last row/column) has w_q = 0 and scores 0; PySODMetrics
      returns nan there.

    ``normalize`` min-max stretches each prediction first (PySODMetrics' convention).
    """
    preds, target = format_inputs(preds, target)
    if normalize:
        preds = minmax_normalize(preds)
    gt = target.to(preds.dtype)
    fg_fraction = gt.mean(dim=(1, 2))
    mixed = alpha * _object_score(preds, target, fg_fraction) + (1 - alpha) * _region_score(preds, target)
    score = mixed.clamp_min(0)
    pred_mean = preds.mean(dim=(1, 2))
    score = torch.where(fg_fraction == 0, 1 - pred_mean, score)
    return torch.where(fg_fraction == 1, pred_mean, score)


def _masked_mean_std(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and sample std (ddof = 1; 0 for a single pixel) of x over mask, per image."""
    m = mask.to(x.dtype)
    n = m.sum(dim=(1, 2))
    mean = (x * m).sum(dim=(1, 2)) / n.clamp_min(1)
    sq = (((x - mean[:, None, None]) ** 2) * m).sum(dim=(1, 2))
    std = torch.where(n > 1, (sq / (n - 1).clamp_min(1)).sqrt(), torch.zeros_like(sq))
    return mean, std


def _object_similarity(x: Tensor, mask: Tensor) -> Tensor:
    mean, std = _masked_mean_std(x, mask)
    return 2 * mean / (mean**2 + 1 + std + EPS)


def _object_score(preds: Tensor, target: Tensor, fg_fraction: Tensor) -> Tensor:
    fg = _object_similarity(preds, target)
    bg = _object_similarity(1 - preds, ~target)
    return fg_fraction * fg + (1 - fg_fraction) * bg


def _region_score(preds: Tensor, target: Tensor) -> Tensor:
    n, h, w = preds.shape
    gt = target.to(preds.dtype)
    rows = torch.arange(h, device=preds.device, dtype=preds.dtype)
    cols = torch.arange(w, device=preds.device, dtype=preds.dtype)
    count = gt.sum(dim=(1, 2)).clamp_min(1)
    cy = torch.round((gt.sum(dim=2) * rows).sum(dim=1) / count) + 1  # (N,), 1-based split as in MATLAB
    cx = torch.round((gt.sum(dim=1) * cols).sum(dim=1) / count) + 1
    top = rows[None, :, None] < cy[:, None, None]  # (N, H, 1)
    left = cols[None, None, :] < cx[:, None, None]  # (N, 1, W)
    score = torch.zeros(n, dtype=preds.dtype, device=preds.device)
    for quadrant in (top & left, top & ~left, ~top & left, ~top & ~left):
        weight = quadrant.sum(dim=(1, 2)).to(preds.dtype) / (h * w)
        score = score + weight * _ssim(preds, gt, quadrant)
    return score


def _ssim(preds: Tensor, gt: Tensor, mask: Tensor) -> Tensor:
    """The S-measure's single-window SSIM of preds vs gt over mask, per image; 0 on an empty mask."""
    m = mask.to(preds.dtype)
    n = m.sum(dim=(1, 2))
    x = (preds * m).sum(dim=(1, 2)) / n.clamp_min(1)
    y = (gt * m).sum(dim=(1, 2)) / n.clamp_min(1)
    dx = (preds - x[:, None, None]) * m
    dy = (gt - y[:, None, None]) * m
    sigma_x = (dx**2).sum(dim=(1, 2)) / (n - 1 + EPS)
    sigma_y = (dy**2).sum(dim=(1, 2)) / (n - 1 + EPS)
    sigma_xy = (dx * dy).sum(dim=(1, 2)) / (n - 1 + EPS)
    numerator = 4 * x * y * sigma_xy
    denominator = (x**2 + y**2) * (sigma_x + sigma_y)
    score = torch.where(numerator != 0, numerator / (denominator + EPS), (denominator == 0).to(preds.dtype))
    return torch.where(n > 0, score, torch.zeros_like(score))
