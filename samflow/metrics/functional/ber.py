"""Balanced error rate, the shadow-detection metric (ISTD, SBU)."""

from __future__ import annotations

import torch
from torch import Tensor

from samflow.metrics.functional._inputs import format_inputs, ratio_or


def binary_confusion_counts(preds: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-image ``[TP, TN, FP, FN]`` pixel counts, (N, 4) int64; foreground where ``preds > threshold``."""
    preds, target = format_inputs(preds, target)
    pred_fg = preds > threshold
    counts = [pred_fg & target, ~pred_fg & ~target, pred_fg & ~target, ~pred_fg & target]
    return torch.stack([c.sum(dim=(1, 2)) for c in counts], dim=-1)


def balanced_error_rate(counts: Tensor) -> Tensor:
    """``BER = 100·(1 - (TP/(TP + FN) + TN/(TN + FP)) / 2)`` from ``[..., TP, TN, FP, FN]`` counts.

    A class absent from the GT cannot be missed: its accuracy (``TP/(TP + FN)`` with no shadow
    pixels, ``TN/(TN + FP)`` with no background pixels) counts as 1.
    """
    tp, tn, fp, fn = counts.to(torch.float64).unbind(-1)
    pos_acc = ratio_or(tp, tp + fn, 1.0)
    neg_acc = ratio_or(tn, tn + fp, 1.0)
    return 100 * (1 - (pos_acc + neg_acc) / 2)
