"""``collate``: dataset items -> a ``SamBatch`` (the contract is documented in ``samflow.batch``).

An item is a dict with ``image`` (3, S, S), ``input_size``, ``original_size``, ``id``, ``path``, and,
when known, ``mask`` (1, S, S) and ``gt_original`` (H, W); its prompt keys are the batch's field
names: ``points`` (K, 2) with ``point_labels`` (K,), ``box`` (4,), ``mask_prompt`` (1, S/4, S/4).
Rows with fewer points get empty slots (label -1) that the model does not see; rows without a box or
a mask prompt get ``has_box`` / ``has_mask_prompt`` False. Dtypes are kept (no cast to float32).
Items of two-resolution data (WSI-SAM) also carry ``context_image`` (3, S, S), ``context_mask``
(1, S, S) and ``context_affine`` (3,): every item of a batch or none. An item whose pixels were not
decoded has ``pixels`` False and ``image_placeholder`` as its image; so does the batch (every item or
none). Items read through ``ResumableLoader`` carry their ``sample_seed``; the batch keeps the list when
every item has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from samflow.batch import CONTEXT_FIELDS, SamBatch, image_placeholder


def _pad_points(items: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    """Stack per-item points (K_i, 2) into (B, K, 2) and labels into (B, K), padding with label -1."""
    k = max(len(item.get("point_labels", ())) for item in items)
    dtype = next(item["points"].dtype for item in items if "points" in item)
    points = torch.zeros(len(items), k, 2, dtype=dtype)
    labels = torch.full((len(items), k), -1, dtype=torch.long)
    for i, item in enumerate(items):
        if "points" in item:
            n = len(item["point_labels"])
            points[i, :n] = item["points"]
            labels[i, :n] = item["point_labels"]
    return points, labels


def _stack_optional(items: Sequence[dict[str, Any]], key: str, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Stack ``key`` over items, zeros where absent; also return the bool (B,) presence flags."""
    dtype = next(item[key].dtype for item in items if key in item)
    values = torch.zeros(len(items), *shape, dtype=dtype)
    present = torch.zeros(len(items), dtype=torch.bool)
    for i, item in enumerate(items):
        if key in item:
            values[i] = item[key]
            present[i] = True
    return values, present


def collate(items: Sequence[dict[str, Any]]) -> SamBatch:
    """Build a ``SamBatch`` (one prompt row per item) from dataset items, all with the same S."""
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
    pixels = {bool(item.get("pixels", True)) for item in items}
    if len(pixels) > 1:
        raise ValueError(
            "collate: some items carry their image's pixels and others not; mix no such datasets."
        )
    with_pixels = pixels.pop()
    first = items[0]["image"]
    fields: dict[str, Any] = {
        "image": torch.stack([item["image"] for item in items])
        if with_pixels
        else image_placeholder((len(items), *first.shape), first.dtype),
        "pixels": with_pixels,
        "input_size": torch.stack([torch.as_tensor(item["input_size"]) for item in items]).long(),
        "original_size": torch.stack([torch.as_tensor(item["original_size"]) for item in items]).long(),
        "id": [item["id"] for item in items],
        "path": [item.get("path", "") for item in items],
        "sample_seed": [int(item["sample_seed"]) for item in items]
        if all("sample_seed" in item for item in items)
        else [],
    }
    if all(with_mask):
        fields["mask"] = torch.stack([item["mask"] for item in items])
        fields["gt_original"] = [item["gt_original"].bool() for item in items]
    if any("points" in item for item in items):
        fields["points"], fields["point_labels"] = _pad_points(items)
    if any("box" in item for item in items):
        fields["box"], fields["has_box"] = _stack_optional(items, "box", (4,))
    if any("mask_prompt" in item for item in items):
        low = (1, size // 4, size // 4)
        fields["mask_prompt"], fields["has_mask_prompt"] = _stack_optional(items, "mask_prompt", low)
    for key in CONTEXT_FIELDS:
        present = [key in item for item in items]
        if any(present) and not all(present):
            raise ValueError(f"collate: some items have {key!r} and others not; mix no such datasets.")
        if all(present):
            fields[key] = torch.stack([torch.as_tensor(item[key]) for item in items])
    return SamBatch(**fields)
