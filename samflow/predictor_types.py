"""What ``Predictor`` and its helpers share: its error, an encoded image and the input transform.

``PredictorError`` (a run, checkpoint or image that cannot be used), ``ImageEncoding`` (one image after
the image encoder, what ``Predictor.decode`` needs) and ``InputTransform`` (original pixels -> the
model's frame, with ``ResizeLongestSide``'s interface).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from samflow.data.transforms import ResizeMode, input_shape, scale_boxes, scale_coords
from samflow.sam import EncodedImages

__all__ = ["ImageEncoding", "InputTransform", "PredictorError"]


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
