"""WSI-SAM's loss on each resolution: squared Dice + BCE on full-resolution logits.

With p = sigmoid(logit) and g the target of one mask, sums over its pixels (MONAI's
``DiceLoss(sigmoid=True, squared_pred=True)``, smooth 1e-5 in numerator and denominator):

    Dice = 1 - (2 Σ p g + 1e-5) / (Σ p^2 + Σ g^2 + 1e-5)

averaged over masks; BCE is the mean binary cross-entropy on the logits.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from samflow.sam import upcast

SMOOTH = 1e-5


def squared_dice(logits: Tensor, target: Tensor, smooth: float = SMOOTH) -> Tensor:
    """Mean over masks of ``1 - (2Σpg + s) / (Σp² + Σg² + s)``; logits and target (N, 1, H, W)."""
    prob = upcast(logits).sigmoid().flatten(1)
    target = upcast(target).flatten(1)
    numerator = 2 * (prob * target).sum(1) + smooth
    denominator = (prob * prob).sum(1) + (target * target).sum(1) + smooth
    return (1 - numerator / denominator).mean()


def dice_bce(logits: Tensor, target: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(squared Dice, BCE) of low-resolution ``logits`` (N, 1, h, w) upsampled (bilinear) to ``size``."""
    full = F.interpolate(upcast(logits), size=(size, size), mode="bilinear", align_corners=False)
    target = upcast(target)
    return squared_dice(full, target), F.binary_cross_entropy_with_logits(full, target)
