"""How mask and image files are read: ``read_mask`` (bool (H, W)) and ``read_image`` ((3, H, W) in [0, 1]).

The rules (palette masks, grey levels cut at half the range; 8-bit, 16-bit and float images) and which
values are unusual (a ``ValueRangeWarning``) are in ``samflow.data.folder``'s module docstring; the
README says the same. ``read_mask_with_note`` / ``read_image_with_note`` return the note a warning is
made of, so that ``MaskFolderDataset`` can warn once per root; ``header_size`` reads an image's size
without its pixels.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from samflow.data.errors import DataError


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """The image at ``path``, open; a failure to read it, here or in the block, is one ``DataError``."""
    try:
        with Image.open(path) as img:
            yield img
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc}). Replace it or remove the pair.") from exc


def header_size(path: Path) -> tuple[int, int]:
    """(H, W) of the image at ``path`` from its header, without decoding the pixels."""
    with _opened(path) as img:
        return img.height, img.width


def _open(path: Path, mode: str | None) -> Image.Image:
    """The image at ``path`` converted to ``mode`` (None: as stored)."""
    with _opened(path) as img:
        img.load()
        return img if mode is None else img.convert(mode)


def floating_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from itself or its name (``"float64"``, ``"torch.float64"``)."""
    found = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype such as torch.float64 or 'float64', got {dtype!r}."
        )
    return found


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_GREY_MASK_MODES = ("L", "I", "F", *_SIXTEEN_BIT_MODES)  # read as stored; other modes via grey level


class ValueRangeWarning(UserWarning):
    """A mask or image has values that samflow reads by a rule the user may not expect (once per root)."""


def _finite(values: np.ndarray, path: Path) -> None:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise DataError(f"{path}: {bad} pixel(s) are NaN or infinite. Replace the file or remove the pair.")


def _tiff_rgb16(img: Image.Image, path: Path) -> np.ndarray | None:
    """A 16-bit RGB(A) TIFF as uint16 (H, W, 3) through ``tifffile`` when it is installed, else None."""
    bits = getattr(img, "tag_v2", {}).get(258) if img.format == "TIFF" else None
    if img.mode not in ("RGB", "RGBA") or not isinstance(bits, tuple) or 16 not in bits:
        return None
    try:
        tifffile = importlib.import_module("tifffile")
    except ImportError:
        return None  # Pillow's 8-bit reading: value // 256, the same scale at 8-bit precision
    try:
        array = np.asarray(tifffile.imread(path))
    except Exception:  # noqa: BLE001 - any tifffile failure falls back to Pillow, which read the file
        return None
    if array.dtype != np.uint16 or array.shape[:2] != (img.height, img.width) or array.ndim != 3:
        return None
    return array[..., :3] if array.shape[-1] >= 3 else None


def read_image_with_note(path: Path, dtype: torch.dtype, codes: bool = False) -> tuple[Tensor, str | None]:
    """The image as (3, H, W) in [0, 1] of ``dtype``, and a note when its values are unusual.

    With ``codes``, an 8-bit file comes back as its uint8 values k instead (the image is k / 255).
    """
    img = _open(path, None)
    note = None
    rgb16 = _tiff_rgb16(img, path)
    if rgb16 is not None:
        return torch.from_numpy(rgb16.astype(np.int32)).permute(2, 0, 1).to(dtype) / 65535, None
    if img.mode not in ("F", "I", *_SIXTEEN_BIT_MODES):
        array = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        return (array, None) if codes else (array.to(dtype) / 255, None)
    values = np.asarray(img)  # (H, W): uint16, int32 or float32
    _finite(values, path)
    low, top = (values.min(), values.max()) if values.size else (0, 0)
    if values.dtype.kind != "f" and 0 <= low and top <= 65535:  # 16-bit data (Pillow keeps some as I)
        grey = torch.from_numpy(values.astype(np.int32)).to(dtype) / 65535
        if top <= 4095:
            note = (
                f"16-bit values only up to {top} (12 bits or fewer); they are read as value / 65535, as "
                f"scikit-image's img_as_float does, so the image is dark (brightest {top / 65535:.4f})"
            )
    elif values.dtype.kind == "f" and 0 <= low and top <= 1:
        grey = torch.from_numpy(values.copy()).to(dtype)
    else:
        kind = "float" if values.dtype.kind == "f" else "32-bit integer"
        wide = torch.from_numpy(values.astype(np.float64))
        if top > low:
            grey = ((wide - low) / (top - low)).to(dtype)
            note = (
                f"{kind} values from {low} to {top}, outside [0, 1]; "
                f"they are mapped from [{low}, {top}] to [0, 1]"
            )
        else:
            grey = wide.clamp(0, 1).to(dtype)
            note = f"{kind} values all {low}, outside [0, 1]; they are clipped to [0, 1]"
    return grey.expand(3, *grey.shape).clone(), note


def read_image(path: Path, dtype: torch.dtype | str = torch.float32) -> Tensor:
    """Read an image file as (3, H, W) in [0, 1], of the floating ``dtype`` (float32 by default).

    8-bit files (RGB, grey, RGBA, palette, 1-bit) are RGB / 255; 16-bit files value / 65535 (the type's
    range, as scikit-image's ``img_as_float``); float files in [0, 1] as they are, other float files
    (and 32-bit integer files outside 0..65535) mapped from their own [min, max] to [0, 1]. Grey images
    are repeated on the three channels. Unusual values (see the module docstring) give a
    ``ValueRangeWarning`` naming the file; ``MaskFolderDataset`` gives one per root instead.
    """
    image, note = read_image_with_note(path, floating_dtype(dtype))
    if note:
        warnings.warn(f"{path}: {note}.", ValueRangeWarning, stacklevel=2)
    return image


def read_mask_with_note(path: Path) -> tuple[Tensor, str | None]:
    """The mask as bool (H, W), and a note when its values are unusual (see ``read_mask``)."""
    img = _open(path, None)
    if img.mode in ("P", "PA"):
        return torch.from_numpy(np.asarray(img.getchannel(0)) > 0), None
    values = np.asarray(img if img.mode in _GREY_MASK_MODES else img.convert("L"))
    _finite(values, path)
    low, top = (values.min(), values.max()) if values.size else (0, 0)
    if values.dtype.kind == "f":
        full = 1.0 if top <= 1 else 255.0
    elif values.dtype == np.uint8:
        full = 255
    else:  # 16-bit, or Pillow's 32-bit I (which also holds 16-bit PNGs)
        full = 65535 if top <= 65535 else 2**31 - 1
    half = full / 2 if values.dtype.kind == "f" else full // 2  # 0.5 or 127.5; 127; 32767
    threshold = half if top > half else 0
    notes = []
    if values.dtype.kind == "f":
        notes.append(f"float values (range taken as [0, {full:g}])")
    if low < 0:
        notes.append(f"negative values (down to {low})")
    if ((values != 0) & (values != top)).any():
        notes.append(f"more than one non-zero value (from {low} to {top}: a soft, JPEG or label mask?)")
    elif top not in (0, 1, full):
        notes.append(f"values in {{0, {top}}}")
    note = None
    if notes:
        rule = f"value > {threshold:g}" if threshold else "value > 0 (no value above half the range)"
        note = f"{'; '.join(notes)}; foreground is read as {rule}"
    return torch.from_numpy(values > threshold), note


def read_mask(path: Path) -> Tensor:
    """Read a mask file as bool (H, W).

    Palette masks (PNG mode ``P``, as in VOC or DAVIS): foreground where the palette index is not 0,
    whatever colour the palette gives it (a dark red index 1 would be background by brightness).
    Other masks are grey levels (RGB by grey level, 1-bit as 0 / 255): foreground where the value is
    above half the range (127 for 8-bit, 32767 for 16-bit, 0.5 for float masks in [0, 1], else 127.5),
    or, when no value is above half the range, where it is not 0. So any {0, v} mask ({0, 1}, {0, 255},
    {0, 7}) is foreground at v, soft or JPEG masks are cut at half the range and label masks
    {0, 1, 2, ...} are foreground at every label. Unusual values (not {0, 1} or {0, full range}, float,
    negative) give a ``ValueRangeWarning`` naming the file; ``MaskFolderDataset`` gives one per root.
    """
    mask, note = read_mask_with_note(path)
    if note:
        warnings.warn(f"{path}: {note}.", ValueRangeWarning, stacklevel=2)
    return mask
