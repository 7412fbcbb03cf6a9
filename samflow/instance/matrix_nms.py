"""Matrix NMS (SOLOv2, Wang et al. 2020): every mask's score decays by its overlap with higher-scored
masks of the same class, in one matrix computation (no sequential suppression).

For masks sorted by score, IoU_ij (i scored above j, same class) and comp_i = max_{k above i} IoU_ki
(how much i was itself suppressed), the decay of j is min_i f(IoU_ij) / f(comp_i) with
f(x) = exp(-sigma x^2) (``gaussian``) or f(x) = 1 - x (``linear``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def matrix_nms(
    masks: Tensor,
    labels: Tensor,
    scores: Tensor,
    *,
    kernel: Literal["gaussian", "linear"] = "gaussian",
    sigma: float = 2.0,
    mask_area: Tensor | None = None,
) -> Tensor:
    """Decayed scores of ``masks`` (N, H, W) binary, ``labels`` (N,), ``scores`` (N,) sorted descending.

    Returns (N,) scores in the input order. ``mask_area`` (N,) may be passed when already known.
    """
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"matrix_nms: kernel must be 'gaussian' or 'linear', not {kernel!r}")
    n = labels.numel()
    if n == 0:
        return scores.clone()
    flat = masks.reshape(n, -1).float()
    area = flat.sum(1) if mask_area is None else mask_area.float()
    inter = flat @ flat.t()
    union = area[:, None] + area[None, :] - inter
    iou = (inter / union.clamp(min=1e-6)).triu(diagonal=1)
    same = (labels[:, None] == labels[None, :]).float().triu(diagonal=1)
    decay_iou = iou * same  # [i, j]: IoU of j with a higher-scored i of its class
    comp = decay_iou.max(dim=0).values  # [i]: how much i itself is overlapped from above
    comp = comp[:, None].expand(n, n)
    if kernel == "gaussian":
        decay = torch.exp(-sigma * decay_iou**2) / torch.exp(-sigma * comp**2)
    else:
        decay = (1 - decay_iou) / (1 - comp).clamp(min=1e-6)
    coeff = decay.min(dim=0).values
    return scores * coeff
