"""What ``Predictor`` and its helpers share: its error, an encoded image and the input transform.

``PredictorError`` (a run, checkpoint or image that cannot be used), ``ImageEncoding`` (one image after
the image encoder, what ``Predictor.decode`` needs), ``InputTransform`` (original pixels -> the
model's frame, with ``ResizeLongestSide``'s interface) and the checks of prompts' shapes and point
labels (``one_prompt``, ``prompt_rows``): a prompt that cannot be used is refused naming the argument,
never misread or partly dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from samflow.batch import POINT_LABEL_WORDS, bad_point_labels
from samflow.data.transforms import ResizeMode, input_shape, scale_boxes, scale_coords
from samflow.sam import EncodedImages

__all__ = ["ImageEncoding", "InputTransform", "PredictorError", "one_prompt", "prompt_rows"]


class PredictorError(ValueError):
    """A run folder, checkpoint or image cannot be used for prediction; the message names it."""


@dataclass
class ImageEncoding:
    """One image after the image encoder: everything ``Predictor.decode`` needs.

    Attributes:
        image: the image in the model's frame (1, 3, S, S), in [0, 1].
        input_size: (h, w) of the resized image before padding.
        original_size: (H, W) of the image given.
        encoded: the encoder's results (embeddings, block features plugins read, dense PE).
        state: what encoder-side hooks left in ``ForwardContext.state``; each decode starts from a copy.
    """

    image: Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    encoded: EncodedImages
    state: dict[str, dict[str, Any]]


class InputTransform:
    """Original-image pixels -> the model's S x S frame, as ``ResizeLongestSide`` (or a stretch).

    ``apply_coords`` / ``apply_boxes`` (numpy) and ``apply_coords_torch`` / ``apply_boxes_torch`` have
    ``ResizeLongestSide``'s signatures, so code written for ``SamPredictor.transform`` runs unchanged.
    """

    def __init__(self, size: int, resize_mode: ResizeMode = "longest") -> None:
        self.size = size
        self.resize_mode = resize_mode

    def input_size(self, original_size: tuple[int, ...]) -> tuple[int, int]:
        """(h, w) of an (H, W) image after resizing, before padding."""
        return input_shape(int(original_size[0]), int(original_size[1]), self.size, self.resize_mode)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 2) xy in original pixels -> the resized frame (float64, as segment-anything)."""
        (height, width), (h, w) = original_size[:2], self.input_size(original_size)
        return np.asarray(coords, dtype=np.float64) * np.array([w / width, h / height])

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 4) xyxy boxes in original pixels -> (N, 4) in the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: Tensor, original_size: tuple[int, ...]) -> Tensor:
        return scale_coords(coords.float(), original_size[:2], self.input_size(original_size))

    def apply_boxes_torch(self, boxes: Tensor, original_size: tuple[int, ...]) -> Tensor:
        return scale_boxes(boxes.float(), original_size[:2], self.input_size(original_size)).reshape(-1, 4)


def _check_labels(labels: np.ndarray | Tensor) -> None:
    """Refuse point labels other than -1, 0, 1 (SAM would give them no label embedding); tensors on an
    accelerator are not read back (``bad_point_labels``)."""
    bad = bad_point_labels(labels)
    if bad:
        raise PredictorError(
            f"point_labels must hold {POINT_LABEL_WORDS}, got {bad}; pass a box as box / boxes, not as "
            "corner points labelled 2 and 3."
        )


def one_prompt(
    point_coords: Any, point_labels: Any, box: Any, mask_input: Any, mask_size: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """One prompt as ``Predictor.predict`` takes it -> arrays (K, 2), (K,), (4,), (1, h, w).

    SamPredictor's shapes, a box also as (1, 4); ``mask_size`` is the model's (h, w) of ``mask_input``.
    Several boxes, labels without points or a mask of another size are refused, naming the argument.
    """
    coords = labels = boxes = masks = None
    if point_coords is not None or point_labels is not None:
        if point_coords is None or point_labels is None:
            given, missing = (
                ("point_coords", "point_labels") if point_labels is None else ("point_labels", "point_coords")
            )
            raise PredictorError(
                f"{given} was given without {missing}; pass both (K points, K labels) or neither."
            )
        coords, labels = np.asarray(point_coords), np.asarray(point_labels)
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise PredictorError(f"point_coords must be (K, 2) xy, got shape {coords.shape}.")
        if labels.shape != (len(coords),):
            raise PredictorError(
                f"point_labels must be (K,) = ({len(coords)},), one per point, got shape {labels.shape}."
            )
        _check_labels(labels)
    if box is not None:
        boxes = np.asarray(box)
        if boxes.size != 4 or boxes.ndim > 2:
            raise PredictorError(
                f"box must be one box (4,) x0, y0, x1, y1, got shape {boxes.shape}; predict takes one prompt "
                "(several boxes: predict_torch with transform.apply_boxes_torch)."
            )
        boxes = boxes.reshape(4)
    if mask_input is not None:
        masks = np.asarray(mask_input)
        if masks.shape != (1, *mask_size):
            raise PredictorError(
                f"mask_input must be (1, {mask_size[0]}, {mask_size[1]}), one earlier low-resolution "
                f"logit map (low_res_logits[k:k + 1]), got shape {masks.shape}."
            )
    return coords, labels, boxes, masks


def prompt_rows(
    point_coords: Tensor | None,
    point_labels: Tensor | None,
    boxes: Tensor | None,
    mask_input: Tensor | None,
    mask_size: tuple[int, int],
) -> int:
    """B, the prompt rows of ``Predictor.predict_torch``'s (B, K, 2), (B, K), (B, 4), (B, 1, h, w).

    Refuses, naming them, tensors of other shapes or whose rows disagree (1 when none is given).
    """
    if (point_coords is None) != (point_labels is None):
        raise PredictorError("point_coords (B, K, 2) and point_labels (B, K) are given together, or neither.")
    h, w = mask_size
    wanted = {  # name: (tensor, its shape with None for B and K, that shape in words)
        "point_coords": (point_coords, (None, None, 2), "(B, K, 2)"),
        "point_labels": (point_labels, (None, None), "(B, K)"),
        "boxes": (boxes, (None, 4), "(B, 4)"),
        "mask_input": (mask_input, (None, 1, h, w), f"(B, 1, {h}, {w})"),
    }
    rows: dict[str, int] = {}
    for name, (value, pattern, words) in wanted.items():
        if value is None:
            continue
        if value.dim() != len(pattern) or any(p not in (None, n) for p, n in zip(pattern, value.shape)):
            raise PredictorError(f"{name} must be {words}, got shape {tuple(value.shape)}.")
        rows[name] = int(value.shape[0])
    if (
        point_coords is not None
        and point_labels is not None
        and point_labels.shape[1] != point_coords.shape[1]
    ):
        raise PredictorError(
            f"point_labels must hold one label per point: (B, {point_coords.shape[1]}), got {tuple(point_labels.shape)}."
        )
    if point_labels is not None:
        _check_labels(point_labels)
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{name} {count}" for name, count in rows.items())
        raise PredictorError(f"The prompt tensors must have one row per prompt, got rows: {counts}.")
    return next(iter(rows.values()), 1)
