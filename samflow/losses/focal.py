"""Sigmoid focal loss (Lin et al. 2017), through ``torchvision.ops.sigmoid_focal_loss``."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from samflow.losses._checks import prepare_logits_target


class FocalLoss(nn.Module):
    """Focal loss, mean over every pixel of the batch.

    ``L = mean[ -α_t (1 - p_t)^γ log p_t ]`` with ``p = σ(x)``, ``p_t = p g + (1 - p)(1 - g)`` and
    ``α_t = α g + (1 - α)(1 - g)``; ``alpha < 0`` switches the α weighting off (torchvision's rule).

    Args:
        alpha: weight α of foreground pixels (1 - α for background); negative: no weighting.
        gamma: focusing exponent γ; 0 gives the (α-weighted) binary cross-entropy.
    """

    def __init__(self, *, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"FocalLoss: gamma must be >= 0, got {gamma}.")
        if alpha > 1:
            raise ValueError(f"FocalLoss: alpha must be <= 1 (or < 0 to disable it), got {alpha}.")
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = prepare_logits_target(logits, target, "FocalLoss")
        return sigmoid_focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma, reduction="mean")
