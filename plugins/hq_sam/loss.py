"""Point-sampled BCE + Dice on mask logits, as HQ-SAM trains its HQ mask (after PointRend / Mask2Former).

Instead of every pixel, the loss reads P points per mask (HQ-SAM: P = 112^2 = 12,544):

1. draw ``oversample_ratio * P`` uniform candidate points in [0, 1]^2 and read the logits there;
2. keep the ``importance_sample_ratio * P`` candidates with the highest uncertainty ``u = -|logit|``
   (closest to the decision boundary), read at the interpolated point, not at the coarse pixels;
3. add ``(1 - importance_sample_ratio) * P`` fresh uniform points.

Logits and target are read at the same points with bilinear interpolation (``grid_sample``,
``align_corners=False``), so a low-resolution logit map and a full-resolution target need no resizing.
With p = sigmoid(logit) and t the sampled target of mask n over its points i:

    BCE  = mean_n mean_i  BCE(logit_ni, t_ni)
    Dice = mean_n [ 1 - (2 Σ_i p_ni t_ni + 1) / (Σ_i p_ni + Σ_i t_ni + 1) ]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from samflow.sam import upcast


def point_sample(values: Tensor, coords: Tensor) -> Tensor:
    """Bilinear read of ``values`` (N, C, H, W) at ``coords`` (N, P, 2) -> (N, C, P).

    ``coords`` are (x, y) in [0, 1]^2 over the whole map (pixel j's centre is at (j + 0.5) / W).
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(values.dtype)  # (N, P, 1, 2) in [-1, 1]
    return F.grid_sample(values, grid, mode="bilinear", align_corners=False).squeeze(3)


def uncertainty(logits: Tensor) -> Tensor:
    """``u = -|logit|``: highest at the decision boundary."""
    return -logits.abs()


def point_counts(
    num_points: int, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75
) -> tuple[int, int]:
    """How many uniform points ``sample_points`` draws per mask: the candidates and the fresh ones."""
    return int(num_points * oversample_ratio), num_points - int(importance_sample_ratio * num_points)


def sample_points(
    logits: Tensor,
    num_points: int = 112 * 112,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
    uniforms: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Uncertainty-weighted points of each mask: logits (N, 1, H, W) -> coords (N, P, 2) in [0, 1]^2.

    The first ``int(importance_sample_ratio * P)`` points are the most uncertain of the
    ``int(oversample_ratio * P)`` candidates (the first draw from ``generator``); the rest are uniform
    (the second draw). ``uniforms`` gives both draws instead, (N, candidates, 2) and (N, fresh, 2)
    (``point_counts``; the plugin's come from ``ctx.rand``, one generator per row). No gradient flows
    through the choice.
    """
    if logits.shape[1] != 1:
        raise ValueError(
            f"sample_points expects class-agnostic logits (N, 1, H, W), got {tuple(logits.shape)}."
        )
    rows, device = logits.shape[0], logits.device
    num_candidates, num_fresh = point_counts(num_points, oversample_ratio, importance_sample_ratio)
    with torch.no_grad():
        if uniforms is None:
            candidates = torch.rand(rows, num_candidates, 2, generator=generator, device=device)
            uniform = torch.rand(rows, num_fresh, 2, generator=generator, device=device)
        else:
            candidates, uniform = uniforms
        scores = uncertainty(point_sample(upcast(logits.detach()), candidates))[:, 0]  # (N, 3P)
        top = scores.topk(num_points - num_fresh, dim=1).indices  # (N, 0.75P)
        uncertain = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    return torch.cat([uncertain, uniform], dim=1)


def point_bce_dice(logits: Tensor, target: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
    """BCE and Dice (smooth 1) of ``logits`` (N, 1, h, w) against ``target`` (N, 1, H, W) at ``coords``.

    Both are averaged over the N masks, as HQ-SAM divides their sums by the number of masks.
    """
    point_logits = point_sample(upcast(logits), coords)[:, 0]  # (N, P)
    with torch.no_grad():
        point_target = point_sample(upcast(target), coords)[:, 0]  # (N, P), soft at target edges
    bce = F.binary_cross_entropy_with_logits(point_logits, point_target, reduction="none").mean(1).mean()
    prob = point_logits.sigmoid()
    dice = 1 - (2 * (prob * point_target).sum(1) + 1) / (prob.sum(1) + point_target.sum(1) + 1)
    return bce, dice.mean()
