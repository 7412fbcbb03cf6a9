"""Balanced error rate, the shadow-detection metric (ISTD, SBU)."""

from __future__ import annotations

import torch
from torch import Tensor

from samflow.metrics.functional._inputs import format_inputs, ratio_or

# SAM-Adapter's BER threshold (utils.py, calc_ber): ``pred * 255 > 125`` on the probabilities.
SAM_ADAPTER_BER_LEVEL = 125.0


def binary_confusion_counts(
    preds: Tensor, target: Tensor, threshold: float = 0.5, level: float | None = None
) -> Tensor:
    """Per-image ``[TP, TN, FP, FN]`` pixel counts, (N, 4) int64.

    Foreground is ``preds > threshold`` (in float64), or, when ``level`` is given,
    ``preds * 255 > level`` computed in ``preds``' own dtype, or float32 for bf16 / float16 preds:
    SAM-Adapter's ``pred * 255 > 125`` on its float32 maps (a strict ``>``; a float32 probability
    125/255 gives exactly 125.0 there and is background). A half-precision product would round to 0.5
    at 125 (bf16 251/512 -> 125.0); in float32 it is exact, as the product of 8 and 11 significant bits.
    """
    raw = preds.to(torch.promote_types(preds.dtype, torch.float32))
    preds, target = format_inputs(preds, target)
    pred_fg = preds > threshold if level is None else (raw * 255 > level).reshape(target.shape)
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


def per_image_ber(preds: Tensor, target: Tensor, level: float = SAM_ADAPTER_BER_LEVEL) -> Tensor:
    """BER in percent of each image, (N,) float64, as SAM-Adapter's ``calc_ber`` computes it.

    Foreground is ``preds * 255 > level`` (default 125, strict, in ``preds``' dtype or float32); the
    dataset value is the mean of these (``PerImageBER``), not the BER of the pooled counts (``BER``). An image
    without shadow (or without background) counts that class as perfectly classified, where the
    reference divides 0 by 0 and gets NaN.
    """
    return balanced_error_rate(binary_confusion_counts(preds, target, level=level))
