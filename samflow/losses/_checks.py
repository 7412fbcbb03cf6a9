"""Input checks shared by the losses."""

from __future__ import annotations

import torch
from torch import Tensor


def prepare_logits_target(logits: Tensor, target: Tensor, loss_name: str) -> tuple[Tensor, Tensor]:
    """Check two (N, 1, H, W) tensors of one shape; return both in float32 or wider.

    Half-precision logits are upcast: per-image sums over 1024² pixels overflow float16.
    """
    if logits.shape != target.shape:
        raise ValueError(
            f"{loss_name}: logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same "
            "shape (N, 1, H, W); resize the target to the logits' resolution first."
        )
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"{loss_name}: expected (N, 1, H, W) mask logits, got {tuple(logits.shape)}.")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(dtype), target.to(dtype)
