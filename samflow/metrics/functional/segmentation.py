"""Per-image region metrics: IoU, Dice and mean absolute error.

Every kernel takes ``preds`` (N, H, W) probabilities and ``target`` (N, H, W) masks (see
``format_inputs``) and returns one score per image, (N,); average them for the dataset value.
A prediction is foreground where ``preds > threshold``.
"""

from __future__ import annotations

from torch import Tensor

from samflow.metrics.functional._inputs import format_inputs, minmax_normalize, ratio_or


def binary_iou(preds: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """``IoU = |P ∩ G| / |P ∪ G|`` per image; 1 when both P and G are empty."""
    preds, target = format_inputs(preds, target)
    pred_fg = preds > threshold
    inter = (pred_fg & target).sum(dim=(1, 2)).to(preds.dtype)
    union = (pred_fg | target).sum(dim=(1, 2)).to(preds.dtype)
    return ratio_or(inter, union, 1.0)


def binary_dice(preds: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """``Dice = 2|P ∩ G| / (|P| + |G|)`` per image; 1 when both P and G are empty."""
    preds, target = format_inputs(preds, target)
    pred_fg = preds > threshold
    inter = (pred_fg & target).sum(dim=(1, 2)).to(preds.dtype)
    total = (pred_fg.sum(dim=(1, 2)) + target.sum(dim=(1, 2))).to(preds.dtype)
    return ratio_or(2 * inter, total, 1.0)


def mean_absolute_error(preds: Tensor, target: Tensor, normalize: bool = False) -> Tensor:
    """``MAE = mean_{H,W} |p - g|`` per image, on the raw probabilities.

    With ``normalize=True`` each prediction is first min-max stretched to [0, 1] (the SOD benchmark /
    PySODMetrics convention, see ``minmax_normalize``).
    """
    preds, target = format_inputs(preds, target)
    if normalize:
        preds = minmax_normalize(preds)
    return (preds - target.to(preds.dtype)).abs().mean(dim=(1, 2))
