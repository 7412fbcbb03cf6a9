"""Boundary IoU (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation", CVPR 2021), as HQ-SAM reports it (mBIoU)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from samflow.metrics.functional._inputs import format_inputs, ratio_or


def boundary_width(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """``d = max(1, round(ratio · √(H² + W²)))`` pixels, Python rounding as the official code."""
    return max(1, round(dilation_ratio * math.hypot(height, width)))


def mask_boundary(mask: Tensor, dilation_ratio: float = 0.02) -> Tensor:
    """Inner boundary band of width d of bool masks (N, H, W): ``M ∧ ¬erode(M)``.

    The official ``mask_to_boundary`` erodes with ``cv2.erode`` (3×3 ones, d iterations) a mask
    padded with one zero pixel, so the image border counts as boundary. d 3×3 erosions with zeros
    beyond the border are one erosion by a (2d+1)×(2d+1) square with zero padding, done here as two
    1-D max-pools of the complement, on the mask's device.
    """
    d = boundary_width(mask.shape[-2], mask.shape[-1], dilation_ratio)
    background = F.pad((~mask).to(torch.float32)[:, None], (d, d, d, d), value=1.0)  # (N, 1, H+2d, W+2d)
    background = F.max_pool2d(background, kernel_size=(2 * d + 1, 1), stride=1)
    background = F.max_pool2d(background, kernel_size=(1, 2 * d + 1), stride=1)
    eroded = background[:, 0] == 0
    return mask & ~eroded


def boundary_iou(
    preds: Tensor, target: Tensor, dilation_ratio: float = 0.02, threshold: float = 0.5
) -> Tensor:
    """Boundary IoU per image, (N,).

    ``BIoU = |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|`` with ``X_d ∩ X`` the band of X within
    d pixels of its contour (:func:`mask_boundary`), ``P = preds > threshold``, ``G = target``.
    Any non-empty mask has a non-empty band, so the union is empty only when both masks are empty;
    that scores 1 (the official code and HQ-SAM give nan), one empty mask against a non-empty one 0.
    """
    preds, target = format_inputs(preds, target)
    pred_band = mask_boundary(preds > threshold, dilation_ratio)
    gt_band = mask_boundary(target, dilation_ratio)
    inter = (pred_band & gt_band).sum(dim=(1, 2)).to(preds.dtype)
    union = (pred_band | gt_band).sum(dim=(1, 2)).to(preds.dtype)
    return ratio_or(inter, union, 1.0)
