"""SAPNet as a samflow plugin: the selection network trains on SAM's frozen image embedding.

SAM itself only makes the proposals (offline, ``samflow proposals``, 6 per point). The plugin adds
no tokens and changes nothing in SAM's forward; its ``losses`` hook runs ``SelectionNet`` on
``ctx.encoded.embeddings`` and returns the PSM, PRM and negative terms. Its decisions per prompt
row (pseudo box, pseudo-mask proposal index, MPS indices, scores) go to ``out.extras["sapnet"]``.

Inputs per prompt row, read from the batch when present:
- ``batch.proposals`` (N, P, 4): the row's proposal boxes in input pixels (P = 6 from
  ``samflow proposals``). Without it the bag is the boxes of SAM's own multimask outputs for the
  row (online mode: 3 proposals), which keeps the plugin usable on any point or box data set.
- ``batch.classes`` (N,) (``CocoBatch``): the row's class index in [0, num_classes) (COCO category
  ids must be mapped to contiguous indices first); without it every row is class 0.
- ``batch.points`` first point (the annotated point); without points, the centre of ``batch.box``,
  else of the first proposal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from samflow.batch import SamBatch
from samflow.plugins import DecoderContext, SamPlugin
from samflow.sam import SamOutput

from .net import SelectionNet

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = ["SAPNet", "masks_to_boxes"]


def masks_to_boxes(logits: Tensor, size: int) -> Tensor:
    """Boxes (..., 4) in an S × S frame of mask logits (..., h, w) > 0; an empty mask gives the whole frame."""
    h, w = logits.shape[-2:]
    fg = logits > 0
    ys = torch.arange(h, device=logits.device, dtype=logits.dtype)
    xs = torch.arange(w, device=logits.device, dtype=logits.dtype)
    col, row = fg.any(-2), fg.any(-1)  # (..., w), (..., h)
    big = torch.tensor(1e9, dtype=logits.dtype, device=logits.device)
    x1 = torch.where(col, xs, big).amin(-1)
    x2 = torch.where(col, xs + 1, -big).amax(-1)
    y1 = torch.where(row, ys, big).amin(-1)
    y2 = torch.where(row, ys + 1, -big).amax(-1)
    box = torch.stack([x1 * size / w, y1 * size / h, x2 * size / w, y2 * size / h], -1)
    full = box.new_tensor([0, 0, size, size]).expand_as(box)
    return torch.where(col.any(-1)[..., None], box, full)


class SAPNet(SamPlugin):
    """SAPNet (Wei et al., CVPR 2024): point-supervised selection among SAM's proposals.

    Args:
        num_classes: object classes C (COCO: 80).
        hidden: width of the RoI head's two shared FCs (reference: 1024).
        num_negatives: random negative boxes per image (reference: 500).
        pdg_box_centres: reference quirk, off: PDG reads the centres of ``batch.box`` (the
            reference's ground-truth boxes), not the annotated points.
        fallback_last_proposal: reference quirk, off: PNPG grows from the proposal equal to the
            pseudo box within ±1 px, else from the last proposal (index 5); default: the stage-0 top-1.
        plus_one: reference quirk, off: x2, y2 of the final pseudo box + 1 (after the mask matching).
        lr, weight_decay: as every plugin.
    """

    def __init__(
        self,
        num_classes: int = 80,
        hidden: int = 1024,
        num_negatives: int = 500,
        pdg_box_centres: bool = False,
        fallback_last_proposal: bool = False,
        plus_one: bool = False,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        self.options = {
            "num_classes": num_classes,
            "hidden": hidden,
            "num_negatives": num_negatives,
            "pdg_box_centres": pdg_box_centres,
            "fallback_last_proposal": fallback_last_proposal,
            "plus_one": plus_one,
        }
        self.net: SelectionNet | None = None

    def setup(self, sam: Sam) -> None:
        """Build the selection head for SAM's embedding width."""
        self.net = SelectionNet(sam.prompt_encoder.embed_dim, **self.options)  # type: ignore[arg-type]

    def losses(self, out: SamOutput, batch: SamBatch, ctx: DecoderContext) -> dict[str, Tensor]:
        """PSM, PRM and negative MIL terms (weights 0.25, 0.25, 0.75 as the reference)."""
        assert self.net is not None, "sapnet: setup() was not called"
        s = batch.size
        proposals = getattr(batch, "proposals", None)
        if proposals is None:
            proposals = masks_to_boxes(out.masks["sam"][:, 1:].detach(), s)
        labels = getattr(batch, "classes", None)
        if labels is None:
            labels = torch.zeros(batch.num_rows, dtype=torch.long, device=proposals.device)
        elif len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.net.num_classes:
            raise ValueError(
                f"sapnet ({self.key}): batch.classes holds {int(labels.min())}..{int(labels.max())}, outside "
                f"[0, {self.net.num_classes}); map category ids to contiguous indices or raise "
                f"model.plugins.{self.key}.init_args.num_classes."
            )
        if batch.points is not None:
            points = batch.points[:, 0].to(proposals.dtype)
        elif batch.box is not None:
            points = (batch.box[:, :2] + batch.box[:, 2:]) / 2
        else:
            points = (proposals[:, 0, :2] + proposals[:, 0, 2:]) / 2
        result = self.net(
            ctx.encoded.embeddings, s, proposals, labels, points, batch.image_index, centre_boxes=batch.box
        )
        out.extras["sapnet"] = result
        return result.losses
