"""Region-overlap losses on sigmoid probabilities: soft IoU (SAM-Adapter) and Dice (HQ-SAM)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from samflow.losses._checks import prepare_logits_target


def _ratio_or_one(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, and 1 where the denominator is 0 (then the numerator is 0 too).

    The division is done on a denominator of 1 at those places so no ``nan`` reaches the gradient.
    """
    empty = denominator == 0
    safe = torch.where(empty, torch.ones_like(denominator), denominator)
    return torch.where(empty, torch.ones_like(numerator), numerator / safe)


class SoftIoULoss(nn.Module):
    """Soft IoU loss (SAM-Adapter ``loss: iou``), mean over images.

    With ``p = σ(logits)`` and sums over (H, W) of each image:

        ``L = mean_images [ 1 - (Σpg + eps) / (Σp + Σg - Σpg + eps) ]``

    SAM-Adapter uses no smoothing term, so ``eps`` defaults to 0. An image whose union is 0
    (empty target and a prediction that underflows to exactly 0) counts as a perfect match
    (loss 0) rather than ``0/0 = nan``.

    Args:
        eps: smoothing term added to the intersection and to the union (SAM-Adapter: 0).
    """

    def __init__(self, *, eps: float = 0.0) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError(f"SoftIoULoss: eps must be >= 0, got {eps}.")
        self.eps = eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = prepare_logits_target(logits, target, "SoftIoULoss")
        prob = torch.sigmoid(logits).flatten(1)  # (N, H*W)
        target = target.flatten(1)
        inter = (prob * target).sum(dim=1)
        union = prob.sum(dim=1) + target.sum(dim=1) - inter
        iou = _ratio_or_one(inter + self.eps, union + self.eps)
        return (1 - iou).mean()


class DiceLoss(nn.Module):
    """Soft Dice loss (HQ-SAM, with ``smooth = 1``), mean over images.

    With ``p = σ(logits)`` and sums over (H, W) of each image:

        ``L = mean_images [ 1 - (2Σpg + s) / (Σp + Σg + s) ]``

    With ``smooth = 0`` an image whose denominator is 0 counts as a perfect match (loss 0).

    Args:
        smooth: s, added to the numerator and the denominator (HQ-SAM: 1).
    """

    def __init__(self, *, smooth: float = 1.0) -> None:
        super().__init__()
        if smooth < 0:
            raise ValueError(f"DiceLoss: smooth must be >= 0, got {smooth}.")
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = prepare_logits_target(logits, target, "DiceLoss")
        prob = torch.sigmoid(logits).flatten(1)  # (N, H*W)
        target = target.flatten(1)
        numerator = 2 * (prob * target).sum(dim=1) + self.smooth
        denominator = prob.sum(dim=1) + target.sum(dim=1) + self.smooth
        return (1 - _ratio_or_one(numerator, denominator)).mean()
