"""PA-SAM's auxiliary losses on the adapter's maps.

With the maps upsampled (bilinear) to the decoder's mask resolution and U = 1[M_U ≥ 0.5] (no gradient):

    L_PA = BCE_{1−U}(M_C, y) + Dice_{1−U}(M_C, y) + BCE_U(M_R, y) + Dice_U(M_R, y)
    L_U  = BCE(M_U, B_gt)

- BCE_R is the mean binary cross-entropy over the pixels of region R, per image, then averaged over
  images (1e-8 guards an empty region);
- Dice_R = 1 − (2 Σ p y + 1) / (Σ p + Σ y + 1) with p = σ(logits) and both p and y zeroed outside R;
- B_gt is the boundary band of the ground truth: foreground pixels within d of the background or the
  image border, plus background pixels within d of the foreground (d = round(0.005 · diagonal),
  at least 1 px; Chebyshev distance, i.e. d erosions with a 3 x 3 square as the reference does).

Resolution: the reference upsamples the 64 x 64 maps to the 1024 x 1024 label. Here the losses run at
the decoder's mask resolution (4h x 4w, 256 x 256 for SAM): the maps are upsampled bilinearly, the
ground truth (S x S) is area-averaged to it (a soft target: the fraction of foreground in each cell)
and the band is computed at S x S, where d is defined, and area-averaged the same way. M_U is
upsampled as logits and its threshold taken as logit ≥ 0 (the reference upsamples the probability),
and L_U is the BCE on those logits.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from samflow.sam import upcast


def band_width(size: tuple[int, int], ratio: float = 0.005) -> int:
    """d = round(ratio · diagonal), at least 1 (7 px at 1024 x 1024)."""
    return max(1, round(ratio * math.hypot(*size)))


def boundary_band(mask: Tensor, width: int) -> Tensor:
    """The boundary band of a binary mask (N, 1, H, W) -> (N, 1, H, W) in {0, 1}.

    fg − erode(fg) with the outside counted as background (so the image border is foreground
    boundary) plus bg − erode(bg) with the outside ignored, eroding with a (2d+1) x (2d+1) square.
    """
    fg = (mask > 0.5).to(upcast(mask).dtype)
    bg = 1.0 - fg
    kernel = 2 * width + 1
    fg_eroded = -F.max_pool2d(-F.pad(fg, [width] * 4, value=0.0), kernel, stride=1)
    bg_eroded = -F.max_pool2d(-bg, kernel, stride=1, padding=width)
    return (fg - fg_eroded) + (bg - bg_eroded)


def masked_bce(logits: Tensor, target: Tensor, region: Tensor) -> Tensor:
    """Mean BCE over ``region`` per image, averaged over images; all (N, 1, H, W)."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    per_image = (loss * region).sum(dim=(1, 2, 3)) / (region.sum(dim=(1, 2, 3)) + 1e-8)
    return per_image.mean()


def masked_dice(logits: Tensor, target: Tensor, region: Tensor) -> Tensor:
    """Dice loss (smooth 1) with prediction and target zeroed outside ``region``, averaged over images."""
    prob = (logits.sigmoid() * region).flatten(1)
    target = (target * region).flatten(1)
    dice = (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    return (1 - dice).mean()


def pa_sam_losses(
    coarse: Tensor, refined: Tensor, uncertainty: Tensor, mask: Tensor, ratio: float = 0.005
) -> dict[str, Tensor]:
    """PA-SAM's auxiliary loss terms.

    Args:
        coarse: M_C logits (N, 1, h', w') at the loss resolution.
        refined: M_R logits (N, 1, h', w').
        uncertainty: logits of M_U (N, 1, h', w').
        mask: the ground truth (N, 1, S, S) in {0, 1}.
        ratio: band width as a fraction of the ground truth's diagonal.

    Returns:
        ``coarse_bce``, ``coarse_dice``, ``refined_bce``, ``refined_dice``, ``uncertainty_bce``.
    """
    # float32: the sums run over many pixels
    coarse, refined, uncertainty = upcast(coarse), upcast(refined), upcast(uncertainty)
    size = coarse.shape[-2:]
    mask = upcast(mask)
    target = F.interpolate(mask, size=size, mode="area")
    width = band_width((mask.shape[-2], mask.shape[-1]), ratio)
    band = F.interpolate(boundary_band(mask, width), size=size, mode="area")
    certain_refined = (uncertainty.detach() >= 0).to(uncertainty.dtype)  # M_U >= 0.5
    certain_coarse = 1.0 - certain_refined
    return {
        "coarse_bce": masked_bce(coarse, target, certain_coarse),
        "coarse_dice": masked_dice(coarse, target, certain_coarse),
        "refined_bce": masked_bce(refined, target, certain_refined),
        "refined_dice": masked_dice(refined, target, certain_refined),
        "uncertainty_bce": F.binary_cross_entropy_with_logits(uncertainty, band),
    }
