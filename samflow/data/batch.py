"""The batch contract between ``samflow.data`` and the model, and ``collate``, which builds it.

A batch is a dict; B is the batch size, S the model's input side (``img_size``):

===================  ==========================  =============================================================
key                  type, shape                 meaning
===================  ==========================  =============================================================
``image``            float32 (B, 3, S, S)        RGB in [0, 1], not normalised (the model normalises); resized
                                                 and zero-padded at the bottom / right (or stretched)
``mask``             float32 (B, 1, S, S)        ground truth in {0, 1}, same geometry (nearest); absent
                                                 without masks (predict)
``input_size``       long (B, 2)                 (h, w) of the resized image before padding; (S, S) when
                                                 stretched
``original_size``    long (B, 2)                 (H, W) of the original image
``gt_original``      list of B bool (H_i, W_i)   ground truth at the original resolution (metrics); absent
                                                 without masks
``id``               list[str]                   file stems
``path``             list[str]                   image paths
``points``           float32 (B, K, 2)           x, y in the S x S frame, pixel units
``point_labels``     long (B, K)                 1 positive, 0 negative, -1 padding (up to the batch's max K)
``boxes``            float32 (B, 4)              xyxy in the S x S frame, inclusive corners
``has_box``          bool (B,)                   rows without a box hold zeros and False
``mask_prompt``      float32 (B, 1, S/4, S/4)    a mask prompt in {0, 1} (SAM's low-resolution mask input)
``has_mask_prompt``  bool (B,)                   rows without one hold zeros and False
===================  ==========================  =============================================================

Prompt keys are present only if at least one item of the batch has that prompt type. Coordinates
follow segment-anything's ``ResizeLongestSide.apply_coords``: a pixel (x, y) of the original image
becomes ``(x * w / W, y * h / H)`` with ``(h, w) = input_size`` (see ``samflow.data.transforms``).
After ``GpuAugment``'s geometric steps, ``input_size`` and ``original_size`` are (S, S) and
``gt_original`` holds the augmented S x S masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def _pad_points(items: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    """Stack per-item points (K_i, 2) into (B, K, 2) and labels into (B, K), padding with label -1."""
    k = max(len(item.get("point_labels", ())) for item in items)
    points = torch.zeros(len(items), k, 2)
    labels = torch.full((len(items), k), -1, dtype=torch.long)
    for i, item in enumerate(items):
        if "points" in item:
            n = len(item["point_labels"])
            points[i, :n] = item["points"]
            labels[i, :n] = item["point_labels"]
    return points, labels


def _stack_optional(items: Sequence[dict[str, Any]], key: str, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Stack ``key`` over items, zeros where absent; also return the bool (B,) presence flags."""
    values = torch.zeros(len(items), *shape)
    present = torch.zeros(len(items), dtype=torch.bool)
    for i, item in enumerate(items):
        if key in item:
            values[i] = item[key]
            present[i] = True
    return values, present


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Build a batch (see the module docstring) from ``MaskFolderDataset`` items.

    Args:
        items: dataset items, all with the same S.

    Returns:
        The batch dict.
    """
    if not items:
        raise ValueError("collate: empty list of items.")
    sizes = {tuple(item["image"].shape) for item in items}
    if len(sizes) > 1:
        raise ValueError(f"collate: items have different image shapes {sorted(sizes)}; use one img_size.")
    with_mask = [("mask" in item) for item in items]
    if any(with_mask) and not all(with_mask):
        no_mask = [item["id"] for item, has in zip(items, with_mask) if not has]
        raise ValueError(f"collate: items {no_mask[:10]} have no mask while others do; mix no such datasets.")
    size = items[0]["image"].shape[-1]
    batch: dict[str, Any] = {
        "image": torch.stack([item["image"] for item in items]).float(),
        "input_size": torch.stack([item["input_size"] for item in items]).long(),
        "original_size": torch.stack([item["original_size"] for item in items]).long(),
        "id": [item["id"] for item in items],
        "path": [item["path"] for item in items],
    }
    if all(with_mask):
        batch["mask"] = torch.stack([item["mask"] for item in items]).float()
        batch["gt_original"] = [item["gt_original"].bool() for item in items]
    if any("points" in item for item in items):
        batch["points"], batch["point_labels"] = _pad_points(items)
    if any("box" in item for item in items):
        batch["boxes"], batch["has_box"] = _stack_optional(items, "box", (4,))
    if any("mask_prompt" in item for item in items):
        low = (1, size // 4, size // 4)
        batch["mask_prompt"], batch["has_mask_prompt"] = _stack_optional(items, "mask_prompt", low)
    return batch
