"""Segmentation losses on mask logits (N, 1, H, W) against {0, 1} targets, and their weighted sum."""

from samflow.losses.bce import BalancedBCELoss, BCELoss
from samflow.losses.build import LOSSES, WeightedLoss, build_loss
from samflow.losses.focal import FocalLoss
from samflow.losses.overlap import DiceLoss, SoftIoULoss

__all__ = [
    "LOSSES",
    "BCELoss",
    "BalancedBCELoss",
    "DiceLoss",
    "FocalLoss",
    "SoftIoULoss",
    "WeightedLoss",
    "build_loss",
]
