"""SAPNet's MIL scores and losses (``MIL_bbox_head.py`` L243-260, L326-346; ``multi_instance_learning_loss.py``).

Shapes: N points, P proposals per point, C classes; c (N, P, C(+1)) class logits, s (N, P, C(+1))
instance logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bag_score", "mps_ranks", "negative_loss", "prm_loss", "psm_loss", "qfl", "selection_score"]


def _norm_softmax(s: Tensor, valid: Tensor | None) -> Tensor:
    """softmax over proposals, zeroed where invalid and L1-normalised again (N, P, C)."""
    p = s.softmax(1)
    if valid is not None:
        p = F.normalize(p * valid[..., None], p=1, dim=1)
    return p


def selection_score(c: Tensor, s: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """d_ij = softmax_c(c_ij)[y_i] · normsoftmax_j(s_ij)[y_i] (N, P), the score that picks proposals."""
    d = c.softmax(-1) * _norm_softmax(s, valid)
    if valid is not None:
        d = d * valid[..., None]
    return d.gather(2, labels[:, None, None].expand(-1, d.shape[1], 1)).squeeze(2)


def bag_score(c: Tensor, s: Tensor, *, sigmoid: bool, valid: Tensor | None = None) -> Tensor:
    """P_i = Σ_j act(c_ij) ⊙ normsoftmax_j(s_ij) (N, C); act is softmax (stage 0) or sigmoid (stage 1)."""
    cls = c.sigmoid() if sigmoid else c.softmax(-1)
    return (cls * _norm_softmax(s, valid)).sum(1)


def qfl(p: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """QFL(p, q) = −(p − q)² · [q log(p + ε) + (1 − q) log(1 − p + ε)], elementwise."""
    return -(p - q).pow(2) * (q * (p + eps).log() + (1 - q) * (1 - p + eps).log())


def psm_loss(c: Tensor, s: Tensor, labels: Tensor, phi: Tensor, weight: float = 0.25) -> Tensor:
    """L_PSM = w · (1/N) Σ_i Σ_c BCE(P_ic, onehot(y_i)), c' = c · φ^{1/64} (PDG), softmax classes.

    BCE's log is floored at −100 (PyTorch), as the reference's ``F.binary_cross_entropy``.

    ``c`` has C + 1 outputs (the last is background); labels are in [0, C).
    """
    bag = bag_score(c * phi[..., None].pow(1.0 / 64), s, sigmoid=False).clamp(0, 1)
    target = F.one_hot(labels, c.shape[-1]).to(bag.dtype)
    return weight * F.binary_cross_entropy(bag, target, reduction="sum") / max(len(labels), 1)


def prm_loss(c: Tensor, s: Tensor, labels: Tensor, inst_weight: Tensor, weight: float = 0.25) -> Tensor:
    """L_PRM = w · (1/N) Σ_i w_i Σ_c QFL(P_ic, onehot(y_i)), sigmoid classes; w_i = Σ_j d⁰_ij."""
    bag = bag_score(c, s, sigmoid=True)
    target = F.one_hot(labels, c.shape[-1]).to(bag.dtype)
    return weight * (inst_weight[:, None] * qfl(bag, target)).sum() / max(len(labels), 1)


def negative_loss(
    c_neg: Tensor, valid: Tensor, inst_weight: Tensor, num_points: int, weight: float = 0.75
) -> Tensor:
    """L_neg = w · mean(w_i) · (1/N) Σ_n v_n Σ_c QFL(σ(c_nc), 0), c_neg (M, C), valid (M,).

    Without instances (``inst_weight`` empty) there is no mean weight: 0, still on ``c_neg``'s graph.
    """
    if inst_weight.numel() == 0:
        return c_neg.sum() * 0.0
    p = c_neg.sigmoid()
    per = qfl(p, torch.zeros_like(p)).sum(-1)
    return weight * inst_weight.mean() * (valid * per).sum() / max(num_points, 1)


def mps_ranks(score: Tensor, ranks: tuple[int, ...] = (2, 4, 6)) -> Tensor:
    """Indices (N, len(ranks)) of the proposals ranked 2nd, 4th, 6th by score (1-based ranks), for MPS."""
    order = score.argsort(1, descending=True)
    return order[:, [r - 1 for r in ranks]]
