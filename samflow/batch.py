"""``SamBatch``: the batch that crosses from the data to the model and to every plugin.

B images, N prompt rows (``image_index`` maps each row to its image; N == B with one row per image),
S the model's input side, K the most point slots of any row.

=====================  ==========================  ==========================================================
field                  type, shape                 meaning
=====================  ==========================  ==========================================================
``image``              float (B, 3, S, S)          RGB in [0, 1], not normalised (the model normalises);
                                                   resized and zero-padded at the bottom / right (or stretched)
``input_size``         long (B, 2)                 (h, w) of the resized image before padding
``original_size``      long (B, 2)                 (H, W) of the original image
``mask``               float (B, 1, S, S) | None   ground truth in {0, 1} in the input frame; None without
                                                   masks (predict)
``gt_original``        list of B bool (H_i, W_i)   ground truth at the original resolution (metrics); None
                                                   without masks
``id``, ``path``       list[str] of B              file stems and image paths
``image_index``        long (N,)                   the image of each prompt row
``points``             float (N, K, 2) | None      x, y in the S x S frame, pixel units
``point_labels``       long (N, K) | None          1 positive, 0 negative, -1 an empty slot (padding): empty
                                                   slots are invisible to the model
``box``                float (N, 4) | None         x0, y0, x1, y1 in the S x S frame, inclusive corners
``has_box``            bool (N,) | None            rows without a box hold zeros and False
``mask_prompt``        float (N, 1, S/4, S/4)      a low-resolution mask prompt in {0, 1} (or logits)
``has_mask_prompt``    bool (N,) | None            rows without a mask prompt hold zeros and False
=====================  ==========================  ==========================================================

A prompt field is None when no row has that prompt. ``has_box`` / ``has_mask_prompt`` may be None
when the field is set: then every row has one. A row's output never depends on the other rows:
empty point slots, absent boxes and absent mask prompts take no part in the model's attention.
Coordinates follow segment-anything's ``ResizeLongestSide.apply_coords``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["PROMPT_FIELDS", "SamBatch"]

PROMPT_FIELDS = ("points", "point_labels", "box", "has_box", "mask_prompt", "has_mask_prompt")


@dataclass
class SamBatch:
    """Images, their ground truth and prompt rows (see the module docstring for shapes)."""

    image: Tensor
    input_size: Tensor = None  # type: ignore[assignment]  # default: (S, S) for every image
    original_size: Tensor = None  # type: ignore[assignment]  # default: input_size
    mask: Tensor | None = None
    gt_original: list[Tensor] | None = None
    id: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    image_index: Tensor = None  # type: ignore[assignment]  # default: one row per image
    points: Tensor | None = None
    point_labels: Tensor | None = None
    box: Tensor | None = None
    has_box: Tensor | None = None
    mask_prompt: Tensor | None = None
    has_mask_prompt: Tensor | None = None

    def __post_init__(self) -> None:
        b, s = self.image.shape[0], self.image.shape[-1]
        device = self.image.device
        if self.input_size is None:
            self.input_size = torch.tensor([[s, s]] * b, device=device)
        if self.original_size is None:
            self.original_size = self.input_size.clone()
        if self.image_index is None:
            self.image_index = torch.arange(b, device=device)
        if (self.points is None) != (self.point_labels is None):
            raise ValueError("SamBatch: give points and point_labels together.")
        if not self.id:
            self.id = [str(i) for i in range(b)]

    # ---- sizes ----
    @property
    def num_images(self) -> int:
        return self.image.shape[0]

    @property
    def num_rows(self) -> int:
        return self.image_index.shape[0]

    @property
    def size(self) -> int:
        """S, the side of the square input."""
        return self.image.shape[-1]

    # ---- per-row targets ----
    @property
    def row_mask(self) -> Tensor:
        """The ground truth of each prompt row's image (N, 1, S, S); fails clearly without masks."""
        if self.mask is None:
            raise ValueError("This batch has no ground-truth masks (batch.mask is None); losses need them.")
        return self.mask[self.image_index]

    # ---- moving and selecting ----
    def to(self, *args: Any, **kwargs: Any) -> SamBatch:
        """A copy with every tensor moved / cast as ``Tensor.to`` does; integer and bool tensors keep their dtype."""

        def move(value: Any) -> Any:
            if isinstance(value, Tensor):
                if value.is_floating_point():
                    return value.to(*args, **kwargs)
                dev = kwargs.get("device") or next((a for a in args if not isinstance(a, torch.dtype)), None)
                return value.to(dev) if dev is not None else value
            if isinstance(value, list):
                return [move(v) for v in value]
            return value

        return dataclasses.replace(
            self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    def pin_memory(self) -> SamBatch:
        """A copy in page-locked memory (what ``DataLoader(pin_memory=True)`` calls, for faster copies to a GPU)."""

        def pin(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.pin_memory()
            if isinstance(value, list):
                return [pin(v) for v in value]
            return value

        return dataclasses.replace(
            self, **{f.name: pin(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    def select_images(self, images: Tensor | list[int]) -> SamBatch:
        """The batch of the given images (indices into B) and of their prompt rows, re-indexed."""
        keep = torch.as_tensor(images, dtype=torch.long, device=self.image.device)
        new_of_old = torch.full((self.num_images,), -1, dtype=torch.long, device=keep.device)
        new_of_old[keep] = torch.arange(keep.numel(), device=keep.device)
        rows = torch.nonzero(new_of_old[self.image_index] >= 0).flatten()
        picked = keep.tolist()
        out = self.select_rows(rows)
        return dataclasses.replace(
            out,
            image=self.image[keep],
            input_size=self.input_size[keep],
            original_size=self.original_size[keep],
            mask=None if self.mask is None else self.mask[keep],
            gt_original=None if self.gt_original is None else [self.gt_original[i] for i in picked],
            id=[self.id[i] for i in picked] if self.id else [],
            path=[self.path[i] for i in picked] if self.path else [],
            image_index=new_of_old[out.image_index],
        )

    def select_rows(self, rows: Tensor | list[int]) -> SamBatch:
        """The same images with only the given prompt rows (indices into N)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.image.device)
        changes: dict[str, Any] = {"image_index": self.image_index[index]}
        for name in PROMPT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                changes[name] = value[index]
        return dataclasses.replace(self, **changes)

    def replace(self, **changes: Any) -> SamBatch:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ---- prompt presence ----
    def point_valid(self) -> Tensor | None:
        """(N, K) True where a point slot holds a point (label != -1); None without points."""
        return None if self.point_labels is None else self.point_labels != -1

    def box_valid(self) -> Tensor | None:
        """(N,) True where a row has a box; None without boxes."""
        if self.box is None:
            return None
        if self.has_box is None:
            return torch.ones(self.box.shape[0], dtype=torch.bool, device=self.box.device)
        return self.has_box

    def mask_prompt_valid(self) -> Tensor | None:
        """(N,) True where a row has a mask prompt; None without mask prompts."""
        if self.mask_prompt is None:
            return None
        if self.has_mask_prompt is None:
            return torch.ones(self.mask_prompt.shape[0], dtype=torch.bool, device=self.mask_prompt.device)
        return self.has_mask_prompt
