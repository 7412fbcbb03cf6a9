"""COCO masks: a ``segmentation`` (polygons, uncompressed or compressed RLE) decoded to a bool mask, and a
bool mask encoded as compressed RLE, through pycocotools (``pip install samflow[coco]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from samflow.data.errors import DataError
from samflow.usage import require_extra

__all__ = ["decode_segmentation", "encode_mask"]


def _mask_api() -> Any:
    """pycocotools' ``mask`` module, or a one-line ``MissingExtraError`` naming the ``coco`` extra."""
    return require_extra("pycocotools.mask", "coco", "COCO data (polygons and RLE masks)")


def decode_segmentation(segmentation: Any, height: int, width: int, where: str = "") -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> bool (H, W).

    Raises:
        DataError: naming ``where`` (file and annotation) when the value is none of those forms.
    """
    mask_api = _mask_api()
    try:
        if isinstance(segmentation, list):  # polygons
            if not segmentation:
                return np.zeros((height, width), dtype=bool)
            rle = mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_api.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode()
        else:
            raise TypeError(f"type {type(segmentation).__name__}")
        mask = mask_api.decode(rle)
    except (TypeError, ValueError, KeyError, IndexError) as err:  # malformed input
        raise DataError(
            f"{where}: 'segmentation' is not a polygon list or an RLE dict ({err}); fix or remove it."
        ) from None
    if mask.shape[:2] != (height, width):
        raise DataError(
            f"{where}: the RLE 'size' {list(mask.shape[:2])} differs from the image's [{height}, {width}]."
        )
    return mask.astype(bool)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """bool (H, W) -> compressed RLE with ``counts`` as str (JSON-ready)."""
    rle = _mask_api().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}
