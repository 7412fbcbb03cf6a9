"""Binary cross-entropy losses: plain, and class-balanced as in SAM-Adapter's shadow loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from samflow.losses._checks import prepare_logits_target


class BCELoss(nn.Module):
    """Binary cross-entropy on logits, mean over every pixel of the batch.

    ``L = -mean[g log σ(x) + (1 - g) log(1 - σ(x))]``
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = prepare_logits_target(logits, target, "BCELoss")
        return F.binary_cross_entropy_with_logits(logits, target)


class BalancedBCELoss(nn.Module):
    """Class-balanced BCE (SAM-Adapter ``loss: bbce``, used for shadow detection).

    SAM-Adapter weights positives by ``pos_weight = N_neg / N_pos`` and multiplies the mean loss by
    ``w = N_pos / (N_pos + N_neg)``, with ``N_pos = Σg`` and ``N_neg = Σ(1 - g)`` counted over the
    whole batch. With ``M = N_pos + N_neg`` pixels this is the same as

        ``L = 1/M · Σ [ (N_neg/M) · g · ℓ⁺ + (N_pos/M) · (1 - g) · ℓ⁻ ]``,
        ``ℓ⁺ = -log σ(x)``, ``ℓ⁻ = -log(1 - σ(x))``,

    which is what is computed: it needs no division by ``N_pos``, so a batch without positives
    (``N_pos = 0``) or without negatives gives a finite loss (0 for a batch that is all one class,
    the limit SAM-Adapter's ``eps = 1e-10`` approaches) instead of ``inf · 0 = nan``.
    The class weights come from the target only and carry no gradient.

    Foreground and background pixels weigh the same in total, so for a prediction that does not yet
    tell them apart (one logit ``c`` everywhere) the loss is ``(N_pos N_neg / M²)(ℓ⁺ + ℓ⁻)``, smallest
    at ``c = 0`` whatever the foreground share: unlike plain BCE it does not pull an undecided model to
    empty masks when the foreground is small (see ``experiments/quickstart.yaml``).

    Args:
        per_image: count ``N_pos``, ``N_neg`` and ``M`` per image and average the images' losses
            (each image balanced on its own; a row's loss does not depend on the rest of its batch, so
            evaluation losses reduce exactly over processes). False (SAM-Adapter's): over the batch.
            Either way a count that is all one class adds 0: with ``per_image`` an image whose mask
            is empty (or full) teaches nothing, so a false positive on an empty image costs nothing;
            with empty masks in the data, add ``dice`` / ``soft_iou`` (they score an empty mask) or
            use ``bce``.
    """

    def __init__(self, *, per_image: bool = False) -> None:
        super().__init__()
        self.per_image = per_image

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = prepare_logits_target(logits, target, "BalancedBCELoss")
        dims = (1, 2, 3) if self.per_image else (0, 1, 2, 3)
        num_pixels = target[0].numel() if self.per_image else target.numel()
        num_pos = target.sum(dim=dims, keepdim=True)
        num_neg = num_pixels - num_pos
        pos_term = target * F.softplus(-logits)  # g · -log σ(x)
        neg_term = (1 - target) * F.softplus(logits)  # (1 - g) · -log(1 - σ(x))
        weighted = (num_neg / num_pixels) * pos_term + (num_pos / num_pixels) * neg_term
        return weighted.mean()
