"""Enhanced-alignment measure (Fan et al., "Enhanced-alignment Measure for Binary Foreground Map
Evaluation", IJCAI 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from samflow.metrics.functional._inputs import EPS, format_inputs, minmax_normalize

NUM_THRESHOLDS = 256


def e_measure_curve(preds: Tensor, target: Tensor, normalize: bool = True) -> Tensor:
    """E-measure of each image at the 256 thresholds t = 0..255, (N, 256), ascending in t.

    The prediction is quantised to ``q = floor(255·p)`` and binarised as ``FM_t = q >= t``
    (PySODMetrics' histogram convention); see :func:`enhanced_alignment` for the score.
    The SOD benchmarks report the mean over t ("mean E", Eφ) and the max over t of the dataset-mean curve.
    """
    preds, target = format_inputs(preds, target)
    if normalize:
        preds = minmax_normalize(preds)
    n = preds.shape[0]
    levels = (preds * (NUM_THRESHOLDS - 1)).floor().long().clamp_(0, NUM_THRESHOLDS - 1)
    offsets = torch.arange(n, device=preds.device)[:, None, None] * NUM_THRESHOLDS
    flat = (levels + offsets).flatten()
    fg_hist = torch.bincount(flat[target.flatten()], minlength=n * NUM_THRESHOLDS)
    all_hist = torch.bincount(flat, minlength=n * NUM_THRESHOLDS)

    def at_or_above(hist: Tensor) -> Tensor:  # pixel count with q >= t, (N, 256)
        return hist.view(n, NUM_THRESHOLDS).flip(1).cumsum(1).flip(1)

    return enhanced_alignment(at_or_above(fg_hist), at_or_above(all_hist), target)


def adaptive_e_measure(preds: Tensor, target: Tensor, normalize: bool = True) -> Tensor:
    """E-measure of each image binarised at ``p >= min(2·mean(p), 1)``, (N,)."""
    preds, target = format_inputs(preds, target)
    if normalize:
        preds = minmax_normalize(preds)
    threshold = (2 * preds.mean(dim=(1, 2), keepdim=True)).clamp_max(1)
    binary = preds >= threshold
    true_pos = (binary & target).sum(dim=(1, 2))[:, None]
    pred_fg = binary.sum(dim=(1, 2))[:, None]
    return enhanced_alignment(true_pos, pred_fg, target)[:, 0]


def enhanced_alignment(true_pos: Tensor, pred_fg: Tensor, target: Tensor) -> Tensor:
    """E-measure from pixel counts of binarised foreground maps FM, (N, T) -> (N, T).

    ``E = Σ φ / (H·W - 1 + eps)`` with the enhanced alignment ``φ = (1 + ξ)² / 4`` and
    ``ξ = 2·(GT - μ_GT)(FM - μ_FM) / ((GT - μ_GT)² + (FM - μ_FM)² + eps)``. φ takes one value on each
    of the four (FM, GT) pixel classes, so only their counts are needed. An empty GT gives
    ``Σφ = |¬FM|`` and a full GT ``Σφ = |FM|`` (the paper code's special cases).

    Args:
        true_pos: ``|FM ∧ GT|`` per image and threshold (N, T).
        pred_fg: ``|FM|`` (N, T).
        target: the GT masks (N, H, W), bool.
    """
    numel = target.shape[1] * target.shape[2]
    dtype = torch.float64
    gt_fg = target.sum(dim=(1, 2)).to(dtype)[:, None]  # (N, 1)
    true_pos, pred_fg = true_pos.to(dtype), pred_fg.to(dtype)
    false_pos = pred_fg - true_pos
    false_neg = gt_fg - true_pos
    true_neg = numel - pred_fg - false_neg
    mu_fm, mu_gt = pred_fg / numel, gt_fg / numel

    def phi(fm_value: Tensor, gt_value: Tensor) -> Tensor:
        xi = 2 * fm_value * gt_value / (fm_value**2 + gt_value**2 + EPS)
        return (1 + xi) ** 2 / 4

    total = (
        true_pos * phi(1 - mu_fm, 1 - mu_gt)
        + false_pos * phi(1 - mu_fm, -mu_gt)
        + false_neg * phi(-mu_fm, 1 - mu_gt)
        + true_neg * phi(-mu_fm, -mu_gt)
    )
    total = torch.where(gt_fg == 0, numel - pred_fg, total)
    total = torch.where(gt_fg == numel, pred_fg, total)
    return total / (numel - 1 + EPS)
