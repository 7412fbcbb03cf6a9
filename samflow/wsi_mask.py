"""The slide's mask from its tiles' probabilities, and its files (``samflow predict-slide``).

- ``stitch_bands``: the tiles' probabilities averaged where they overlap, as finished bands of rows
  (top to bottom), so the stitched map is never held whole;
- ``halve``: the next pyramid level, a 2 x 2 max, band by band;
- ``write_pyramid``: the levels as a tiled pyramidal TIFF (level 0 with SubIFDs, as slide readers expect);
- ``feature_collection``: the mask's polygons as GeoJSON (QuPath reads them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samflow.wsi_tiles import Chunk

__all__ = ["feature_collection", "halve", "stitch_bands", "write_pyramid"]


def stitch_bands(
    probabilities: Iterator[tuple[Chunk, np.ndarray]],
    xs: Sequence[int],
    ys: Sequence[int],
    *,
    width: int,
    height: int,
    tile: int,
    overlap: int,
) -> Iterator[tuple[int, np.ndarray]]:
    """Finished rows of the stitched probability map, (first row, (rows, W) float32), top to bottom,
    from the tiles' probabilities in tile-row order."""
    stride = tile - overlap
    total = np.zeros((tile, xs[-1] + tile), dtype=np.float32)  # the band starting at row ys[k]
    count = np.zeros(total.shape, dtype=np.uint8)  # at most 4 tiles cover a pixel (overlap <= tile/2)
    pending = next(probabilities, None)
    for k, y0 in enumerate(ys):
        while pending is not None and pending[0][0] == k:
            (_, chunk), probs = pending
            for (x0, _), p in zip(chunk, probs):
                total[:, x0 : x0 + tile] += p
                count[:, x0 : x0 + tile] += 1
            pending = next(probabilities, None)
        last = k == len(ys) - 1
        done = min(height - y0, tile) if last else stride  # rows no later tile touches
        yield y0, (total[:done, :width] / np.maximum(count[:done, :width], 1))  # 0 where no tile (total 0)
        if not last:  # keep the overlap rows, move the band down by stride
            total[:overlap], total[overlap:] = total[stride:], 0
            count[:overlap], count[overlap:] = count[stride:], 0


def halve(mask: np.ndarray, out: np.ndarray, rows: int = 256) -> None:
    """``out`` (ceil(H/2), ceil(W/2)) = 2 x 2 max of ``mask`` (H, W), band by band."""
    for r in range(0, out.shape[0], rows // 2):
        part = mask[2 * r : 2 * (r + rows // 2)]
        h, w = math.ceil(part.shape[0] / 2) * 2, math.ceil(part.shape[1] / 2) * 2
        padded = np.zeros((h, w), np.uint8)
        padded[: part.shape[0], : part.shape[1]] = part
        out[r : r + h // 2] = padded.reshape(h // 2, 2, w // 2, 2).max((1, 3))


def write_pyramid(levels: Sequence[np.ndarray], path: Path, mpp: float) -> None:
    """A tiled pyramidal TIFF (level 0 with SubIFDs, as slide readers expect); resolution in pixels / cm."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=levels[0].size > 2**31) as tif:
        for i, level in enumerate(levels):
            res = 1e4 / (mpp * 2**i)
            options: dict[str, Any] = {
                "tile": (256, 256),
                "compression": "zlib",
                "resolution": (res, res),
                "resolutionunit": "CENTIMETER",
            }
            if i == 0:
                tif.write(level, subifds=len(levels) - 1, **options)
            else:
                tif.write(level, subfiletype=1, **options)


def feature_collection(region: Any) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of ``region``'s polygons (shapely, level-0 slide coordinates), each a
    QuPath annotation classified ``Tumor``."""
    import shapely

    polygons = [] if region.is_empty else list(getattr(region, "geoms", [region]))
    features = [
        {
            "type": "Feature",
            "geometry": shapely.geometry.mapping(polygon),
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        }
        for polygon in polygons
    ]
    return {"type": "FeatureCollection", "features": features}
