"""Pyramidal slides read at a physical resolution (microns per pixel), with tiffslide.

tiffslide (pure Python on tifffile + zarr, OpenSlide's API) reads pyramidal TIFF, SVS and the other
formats tifffile knows, installs from a wheel everywhere, and needs no system library; it is the
optional extra ``samflow[wsi]``. Coordinates are level-0 pixels, continuous: pixel i spans [i, i + 1).

``Slide.read(centre, mpp, size)`` returns the ``size`` x ``size`` patch centred on ``centre`` whose
pixels are ``mpp`` microns wide. It reads the coarsest level at least as fine as ``mpp``; when that
level's mpp is ``mpp`` and the field falls on whole pixels the patch is a plain crop, otherwise the
field is resampled by exact area averaging (each patch pixel is the mean of the level's pixels over
its footprint, partial pixels weighted by their covered fraction), so the patch covers exactly
``size * mpp`` microns. Outside the slide the patch is white.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from samflow.paths import where_looked

MPP_KEYS = ("tiffslide.mpp-x", "openslide.mpp-x")
TOLERANCE = 1e-3  # relative: a level within 0.1% of the wanted mpp counts as that mpp


class SlideError(ValueError):
    """A slide cannot be read as asked (no mpp metadata, unreadable file); the message says what to do."""


def _tiffslide() -> Any:
    try:
        import tiffslide
    except ImportError:
        raise SlideError("reading whole-slide images needs tiffslide: pip install 'samflow[wsi]'.") from None
    return tiffslide


class Slide:
    """A pyramidal slide with its level-0 microns per pixel.

    Args:
        path: the slide file (pyramidal TIFF, SVS, ...).
        mpp: level-0 microns per pixel; required when the file has no mpp metadata (``slide_mpp`` of the
            slide data, ``--slide-mpp`` of ``samflow predict-slide``), and
            it overrides the metadata when given.
    """

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise SlideError(f"{self.path}: no such slide file{where_looked(self.path)}.")
        tiffslide = _tiffslide()
        try:
            self._slide = tiffslide.TiffSlide(str(self.path))
        except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as err:
            raise SlideError(f"{self.path}: not a readable slide ({type(err).__name__}: {err}).") from None
        if mpp is None:
            props = self._slide.properties
            found = next((props[k] for k in MPP_KEYS if props.get(k) not in (None, "", 0)), None)
            if found is None:
                raise SlideError(
                    f"{self.path}: the slide has no microns-per-pixel metadata; give its level-0 mpp, e.g. "
                    "0.25 for 40x (data.init_args.slide_mpp, or --slide-mpp of samflow predict-slide)."
                )
            mpp = float(found)
        if not mpp > 0:
            raise SlideError(f"{self.path}: mpp must be > 0, got {mpp}.")
        self.mpp = float(mpp)
        self.dimensions: tuple[int, int] = tuple(self._slide.dimensions)
        self.downsamples: list[float] = [float(d) for d in self._slide.level_downsamples]
        self.level_dimensions: list[tuple[int, int]] = [tuple(d) for d in self._slide.level_dimensions]
        self.scales = [level_scale(self.dimensions, d) for d in self.level_dimensions]

    def close(self) -> None:
        self._slide.close()

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of ``level``, the wider axis's (the level's exact scale, ``level_scale``)."""
        return self.mpp * max(self.scales[level])

    def level_for(self, mpp: float) -> int:
        """The coarsest level whose pixels are at most ``mpp`` wide (level 0 if none is)."""
        fine = [i for i in range(len(self.downsamples)) if self.level_mpp(i) <= mpp * (1 + TOLERANCE)]
        return max(fine, key=self.level_mpp) if fine else 0

    def read_level(self, level: int, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Pixels [x0, x0 + width) x [y0, y0 + height) of ``level`` (its own coordinates) as RGB uint8
        (height, width, 3); white outside the slide."""
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        w, h = self.level_dimensions[level]
        ax0, ay0, ax1, ay1 = max(x0, 0), max(y0, 0), min(x0 + width, w), min(y0 + height, h)
        if ax1 > ax0 and ay1 > ay0:
            ds = self.downsamples[level]
            location = (_level0_location(ax0, ds), _level0_location(ay0, ds))
            region = self._slide.read_region(location, level, (ax1 - ax0, ay1 - ay0), as_array=True)
            region = np.asarray(region)
            if region.ndim == 2:
                region = np.repeat(region[..., None], 3, -1)
            out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = region[..., :3]
        return out

    def read(self, centre: tuple[float, float], mpp: float, size: int) -> np.ndarray:
        """The ``size`` x ``size`` RGB uint8 patch of ``mpp`` microns per pixel centred on ``centre``
        (level-0 coordinates)."""
        level = self.level_for(mpp)
        sx, sy = self.scales[level]
        # the field in level coordinates, per axis: a level's x and y scales differ at odd sizes
        side_x, side_y = size * mpp / (self.mpp * sx), size * mpp / (self.mpp * sy)  # level pixels
        fx0, fy0 = centre[0] / sx - side_x / 2, centre[1] / sy - side_y / 2
        whole = all(abs(v - round(v)) < 1e-6 for v in (fx0, fy0))
        if whole and abs(side_x - size) <= TOLERANCE * size and abs(side_y - size) <= TOLERANCE * size:
            return self.read_level(level, round(fx0), round(fy0), size, size)
        x0, y0 = int(np.floor(fx0)), int(np.floor(fy0))
        x1, y1 = int(np.ceil(fx0 + side_x)), int(np.ceil(fy0 + side_y))
        region = self.read_level(level, x0, y0, x1 - x0, y1 - y0).astype(np.float64)
        wy = _area_weights(fy0 - y0, side_y, size, y1 - y0)
        wx = _area_weights(fx0 - x0, side_x, size, x1 - x0)
        # two matrix products (rows, then columns): one einsum of all three loops over every (patch
        # pixel, field pixel) pair, seconds for a 64 px patch and hours for a 1024 px one
        rows = (wy @ region.reshape(y1 - y0, -1)).reshape(size, x1 - x0, 3)  # (i, x, c)
        patch = (wx @ rows.transpose(1, 0, 2).reshape(x1 - x0, -1)).reshape(size, size, 3).transpose(1, 0, 2)
        return np.clip(np.round(patch), 0, 255).astype(np.uint8)

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at about ``mpp`` (the coarsest level at least as fine, not resampled):
        (RGB uint8, its level-0 downsample)."""
        level = self.level_for(mpp)
        w, h = self.level_dimensions[level]
        return self.read_level(level, 0, 0, w, h), sum(self.scales[level]) / 2


def level_scale(base: tuple[int, int], level: tuple[int, int]) -> tuple[float, float]:
    """(x, y) level-0 pixels per pixel of a level of size ``level`` of a slide of size ``base``.

    Pyramid levels are whole downsamples k of level 0 (tifffile takes a TIFF page as a level only when
    each side is floor or ceil of the level above's over 2, 3 or 4, and scanners write 2, 4, 16, ...),
    so a level's pixels are exactly k level-0 pixels wide on both axes. Neither base / level (771 / 385
    = 2.0026 for k = 2) nor tiffslide's mean of the two axes' ratios (2.0033 for 771 x 511 -> 385 x 255)
    is: they put the far edge up to about a level pixel off. A level that is no whole downsample
    (another reader) is taken to span the whole slide on each axis: base / level per axis."""
    ratios = [b / max(n, 1) for b, n in zip(base, level)]
    k = max(round(sum(ratios) / 2), 1)
    if all(n in (b // k, -(-b // k)) for b, n in zip(base, level)):
        return float(k), float(k)
    return ratios[0], ratios[1]


def _level0_location(index: int, downsample: float) -> int:
    """The level-0 coordinate that tiffslide's ``read_region`` maps to pixel ``index`` of a level of
    ``downsample``: it truncates ``location / downsample``, so ``round(index * downsample)`` would land a
    pixel early whenever the downsample is not whole (levels of odd-sized slides, 2.0033 for 771 -> 385)."""
    location = math.ceil(index * downsample)
    while int(location / downsample) > index:  # float rounding either way
        location -= 1
    while int(location / downsample) < index:
        location += 1
    return location


def _area_weights(start: float, side: float, size: int, count: int) -> np.ndarray:
    """(size, count) weights: patch pixel i covers [start + i * side/size, start + (i + 1) * side/size)
    of source pixels [j, j + 1); weight = covered length / footprint length (rows sum to 1)."""
    step = side / size
    lo = start + np.arange(size)[:, None] * step
    j = np.arange(count)[None, :]
    overlap = np.clip(np.minimum(lo + step, j + 1) - np.maximum(lo, j), 0, None)
    return overlap / step
