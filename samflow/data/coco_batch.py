"""``CocoBatch``: a ``SamBatch`` with one prompt row per COCO instance, and ``collate_coco``, which
batches ``CocoInstances`` items into one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from samflow.batch import SamBatch
from samflow.data.transforms import scale_boxes, scale_coords, to_input_frame

__all__ = ["CocoBatch", "collate_coco"]


@dataclass
class CocoBatch(SamBatch):
    """A ``SamBatch`` with one prompt row per instance, and per-row targets.

    ``mask`` / ``gt_original`` hold the union of each image's instances; ``row_mask`` gives each row
    its own instance. Extra fields (N rows, P points per row):
    ``instance_mask`` float (N, 1, S, S), ``classes`` long (N,) contiguous indices 0..C-1,
    ``category_ids`` long (N,) the COCO ids, ``ann_ids`` long (N,), ``points_original`` (N, P, 2),
    ``boxes_original`` (N, 4) xyxy, ``instance_masks`` list of B bool (M_b, H_b, W_b) at the original
    resolution, ``image_ids`` list of B ints, ``iscrowd`` bool (N,) (the crowd regions ``crowd="keep"``
    makes rows), ``crowd_masks`` / ``crowd_classes`` lists of B bool (K_b, H_b, W_b) / long (K_b,) (those
    ``crowd="skip"`` leaves out of the rows, at the original resolution). With a proposal store (K
    proposals per point, of each row's first point): ``proposals`` (N, K, 4) xyxy boxes in the S x S
    frame (exclusive ends), ``proposal_scores`` (N, K) SAM's predicted IoU, ``proposal_rles`` N lists of
    K RLE dicts (the masks at the original resolution, decoded only where needed). With ``aux_masks``:
    ``aux_masks`` bool (N, R, S, S), R further masks per row in the input frame.
    """

    instance_mask: Tensor | None = None
    classes: Tensor | None = None
    category_ids: Tensor | None = None
    ann_ids: Tensor | None = None
    points_original: Tensor | None = None
    boxes_original: Tensor | None = None
    proposals: Tensor | None = None
    proposal_scores: Tensor | None = None
    proposal_rles: list[list[dict[str, Any]]] | None = None
    aux_masks: Tensor | None = None
    iscrowd: Tensor | None = None
    instance_masks: list[Tensor] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    crowd_masks: list[Tensor] = field(default_factory=list)
    crowd_classes: list[Tensor] = field(default_factory=list)

    _ROW_FIELDS = (
        "instance_mask",
        "classes",
        "category_ids",
        "ann_ids",
        "points_original",
        "boxes_original",
        "proposals",
        "proposal_scores",
        "aux_masks",
        "iscrowd",
    )

    @property
    def row_mask(self) -> Tensor:
        if self.instance_mask is None:
            return super().row_mask
        return self.instance_mask

    def select_rows(self, rows: Tensor | list[int]) -> CocoBatch:
        out = super().select_rows(rows)
        index = torch.as_tensor(rows, dtype=torch.long)
        changes: dict[str, Any] = {
            name: getattr(self, name)[index] for name in self._ROW_FIELDS if getattr(self, name) is not None
        }
        if self.proposal_rles is not None:
            changes["proposal_rles"] = [self.proposal_rles[i] for i in index.tolist()]
        return out.replace(**changes)  # type: ignore[return-value]


def collate_coco(items: list[dict[str, Any]]) -> CocoBatch:
    """``CocoInstances`` items -> a ``CocoBatch``: all instances of all images as rows, image by image."""
    if not items:
        raise ValueError("collate_coco: empty list of items.")
    s = items[0]["image"].shape[-1]
    rows_index, points, boxes, inst, props, aux = [], [], [], [], [], []
    with_proposals = "proposal_boxes" in items[0]
    with_aux = "aux_masks" in items[0]
    for b, item in enumerate(items):
        m = len(item["classes"])
        orig, size = item["original_size"].tolist(), item["input_size"].tolist()
        rows_index.append(torch.full((m,), b, dtype=torch.long))
        points.append(scale_coords(item["points"], orig, size))
        box = scale_boxes(item["boxes"], orig, size)
        boxes.append(box)
        if with_proposals:
            props.append(scale_boxes(item["proposal_boxes"], orig, size))
        if with_aux and m and item["aux_masks"].shape[1]:
            am = item["aux_masks"]
            framed, _ = to_input_frame(
                am.reshape(-1, 1, *am.shape[-2:]).float(), s, "longest", "nearest-exact"
            )
            aux.append(framed.reshape(m, -1, s, s) > 0.5)
        if m:
            resized, _ = to_input_frame(
                item["instance_masks"][:, None].float(), s, "longest", "nearest-exact"
            )
            inst.append(resized)
        else:
            inst.append(torch.zeros(0, 1, s, s))
    p = max(item["points"].shape[1] for item in items)
    pts = torch.cat(points) if points else torch.zeros(0, p, 2)
    instance_mask = torch.cat(inst)
    image_index = torch.cat(rows_index)
    union = torch.zeros(len(items), 1, s, s)
    union.index_put_((image_index,), instance_mask, accumulate=True)
    proposal_fields: dict[str, Any] = {}
    if with_proposals:
        proposal_fields = {
            "proposals": torch.cat(props),
            "proposal_scores": torch.cat([item["proposal_scores"] for item in items]),
            "proposal_rles": [rles for item in items for rles in item["proposal_rles"]],
        }
    if with_aux:
        r = max((a.shape[1] for a in aux), default=0)
        proposal_fields["aux_masks"] = torch.cat(aux) if aux else torch.zeros(0, r, s, s, dtype=torch.bool)
    return CocoBatch(
        image=torch.stack([item["image"] for item in items]),
        input_size=torch.stack([item["input_size"] for item in items]).long(),
        original_size=torch.stack([item["original_size"] for item in items]).long(),
        mask=(union > 0).float(),
        gt_original=[item["instance_masks"].any(0) for item in items],
        id=[item["id"] for item in items],
        path=[item["path"] for item in items],
        image_index=image_index,
        points=pts,
        point_labels=torch.ones(pts.shape[:2], dtype=torch.long),
        box=torch.cat(boxes),
        instance_mask=instance_mask,
        classes=torch.cat([item["classes"] for item in items]),
        category_ids=torch.cat([item["category_ids"] for item in items]),
        ann_ids=torch.cat([item["ann_ids"] for item in items]),
        points_original=torch.cat([item["points"] for item in items]),
        boxes_original=torch.cat([item["boxes"] for item in items]),
        instance_masks=[item["instance_masks"] for item in items],
        image_ids=[item["image_id"] for item in items],
        iscrowd=torch.cat([item["iscrowd"] for item in items]) if "iscrowd" in items[0] else None,
        crowd_masks=[item["crowd_masks"] for item in items if "crowd_masks" in item],
        crowd_classes=[item["crowd_classes"] for item in items if "crowd_classes" in item],
        **proposal_fields,
    )
