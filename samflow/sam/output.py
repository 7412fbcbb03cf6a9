"""What one forward pass of the hooked SAM returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class SamOutput:
    """Named mask logits and everything plugins report.

    Shapes use N for prompt rows (one row per image unless several prompts share an image) and
    (h, w) for the decoder's low resolution (4x the embedding grid, 256 x 256 for SAM at 1024).

    Attributes:
        masks: name -> mask logits (N, M, h, w). ``"sam"`` holds SAM's four mask tokens (token 0 is the
            single-mask output, 1..3 the multimask outputs); a plugin's masks are ``"<key>/<name>"``.
        iou_pred: SAM's predicted IoU for each of its four mask tokens (N, 4).
        image_index: which image of the batch each row belongs to (N,).
        pred: the selected prediction (N, 1, h, w) after ``select``; losses and metrics use it.
        extras: anything else plugins report, keyed ``"<key>/<name>"``.
    """

    masks: dict[str, Tensor]
    iou_pred: Tensor
    image_index: Tensor
    pred: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def sam_default(self, multimask_output: bool) -> Tensor:
        """SAM's own rule: token 0, or with multimask the token with the highest predicted IoU."""
        sam = self.masks["sam"]
        if not multimask_output:
            return sam[:, :1]
        best = self.iou_pred[:, 1:].argmax(dim=1) + 1
        return sam[torch.arange(sam.shape[0], device=sam.device), best].unsqueeze(1)
