"""How mask and image files are read: ``read_mask`` (bool (H, W)) and ``read_image`` ((3, H, W) in [0, 1]).

The rules (palette masks, grey levels cut at half the range, alpha masks; 8-bit, 16-bit and float
images; EXIF orientation; files of several frames) and which values are unusual (a
``ValueRangeWarning``) are in ``samflow.data.folder``'s module docstring; the README says the same.
``read_mask_with_note`` / ``read_image_with_note`` also return the note a warning is made of and the
orientation applied, so that ``MaskFolderDataset`` can warn once per root; ``header_size`` reads an
image's size without its pixels.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from samflow.data.errors import DataError

# EXIF orientation -> what a viewer does to the stored pixels to show them upright
TURNS = {
    2: "mirrored left-right",
    3: "turned 180 degrees",
    4: "mirrored top-bottom",
    5: "mirrored about its main diagonal",
    6: "turned 90 degrees clockwise",
    7: "mirrored about its other diagonal",
    8: "turned 90 degrees counter-clockwise",
}


def orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 to 8, that ``img``'s header declares; 1 when it declares none.

    Read without decoding the pixels (Pillow's own ``PngImageFile.getexif`` decodes the file to look for
    an ``eXIf`` chunk after the pixel data, which viewers ignore too).
    """
    value = Image.Image.getexif(img).get(0x0112, 1)
    return value if value in TURNS else 1


def upright(values: Tensor, turn: int) -> Tensor:
    """``values`` (..., H, W) as a viewer shows a file of EXIF orientation ``turn`` (Pillow's
    ``ImageOps.exif_transpose``): mirrored, turned, or both; ``values`` itself for 1."""
    if turn not in TURNS:
        return values
    if turn in (5, 6, 7, 8):
        values = values.transpose(-1, -2)  # 5: the transpose; 6, 7, 8 are it mirrored
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(turn, ())
    return (values.flip(flips) if flips else values).contiguous()


def several_frames(img: Image.Image) -> str | None:
    """Why a file of several frames cannot be read as one image, None when it is one.

    An animated GIF, PNG or WebP, or a TIFF with several pages of one size (a stack: which page is the
    image?) is refused. A JPEG's further frames (MPO: a phone's preview or depth map) and TIFF pages of
    other sizes (thumbnails, pyramid levels) are not: the first frame is the image, as viewers show it.
    """
    if not getattr(img, "is_animated", False) or img.format == "MPO":
        return None
    count = int(getattr(img, "n_frames", 2))
    if img.format == "TIFF":
        first = img.size
        sizes = []
        for page in range(1, count):
            img.seek(page)
            sizes.append(img.size)
        img.seek(0)
        if first not in sizes:
            return None
    return (
        f"{count} frames (an animated or multi-page file), and samflow reads one image per file; "
        "save the frame that is the image or mask as a file of its own"
    )


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """The image at ``path``, open; a failure to read it, here or in the block, is one ``DataError``, and so
    is a file of several frames (``several_frames``)."""
    try:
        with Image.open(path) as img:
            refused = several_frames(img)
            if refused:
                raise DataError(f"{path}: {refused}.")
            yield img
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        empty = path.is_file() and path.stat().st_size == 0
        reason = "it is empty, 0 bytes" if empty else exc
        raise DataError(f"{path}: cannot read the file ({reason}). Replace it or remove the pair.") from exc


def header_size(path: Path) -> tuple[int, int]:
    """(H, W) of the image at ``path`` upright (its EXIF orientation applied), without decoding the pixels."""
    with _opened(path) as img:
        turned = orientation(img) in (5, 6, 7, 8)
        return (img.width, img.height) if turned else (img.height, img.width)


def file_orientation(path: str | Path) -> int:
    """The EXIF orientation (1 to 8) of the file at ``path`` from its header; 1 for a file Pillow cannot
    open (its reader reports that)."""
    try:
        with Image.open(path) as img:
            return orientation(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return 1


def _open(path: Path) -> tuple[Image.Image, int]:
    """The image at ``path`` as stored, decoded, and its EXIF orientation."""
    with _opened(path) as img:
        turn = orientation(img)  # before decoding: what the header says, as for ``header_size``
        img.load()
        return img, turn


class Read(NamedTuple):
    """A file's pixels upright, the note a warning is made of when its values are unusual, and the EXIF
    orientation that was applied (1: none)."""

    values: Tensor
    note: str | None
    orientation: int


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


class OrientationWarning(UserWarning):
    """Images (or masks) of a dataset root carry an EXIF orientation, which samflow applies (once per root)."""


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


def read_image_with_note(path: Path, dtype: torch.dtype, codes: bool = False) -> Read:
    """The image upright as (3, H, W) in [0, 1] of ``dtype``, the note when its values are unusual, and
    its EXIF orientation.

    With ``codes``, an 8-bit file comes back as its uint8 values k instead (the image is k / 255).
    """
    img, turn = _open(path)
    values, note = _image_values(img, path, dtype, codes)
    return Read(upright(values, turn), note, turn)


def _image_values(img: Image.Image, path: Path, dtype: torch.dtype, codes: bool) -> tuple[Tensor, str | None]:
    """The decoded ``img`` as stored, (3, H, W) (see ``read_image``), and a note when its values are unusual."""
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

    8-bit files (RGB, grey, RGBA, palette, 1-bit, CMYK) are RGB / 255 (alpha is dropped); 16-bit files
    value / 65535 (the type's range, as scikit-image's ``img_as_float``); float files in [0, 1] as they
    are, other float files (and 32-bit integer files outside 0..65535) mapped from their own [min, max]
    to [0, 1]. Grey images are repeated on the three channels. A file with an EXIF orientation is turned
    upright, as viewers, OpenCV's ``imread`` and annotation tools show it; a file of several frames is
    refused (``several_frames``). Unusual values (see the module docstring) give a ``ValueRangeWarning``
    naming the file; ``MaskFolderDataset`` gives one per root instead.
    """
    image, note, _ = read_image_with_note(path, floating_dtype(dtype))
    if note:
        warnings.warn(f"{path}: {note}.", ValueRangeWarning, stacklevel=2)
    return image


def read_mask_with_note(path: Path) -> Read:
    """The mask upright as bool (H, W), the note when its values are unusual (see ``read_mask``), and its
    EXIF orientation."""
    img, turn = _open(path)
    values, note = _mask_values(img, path)
    return Read(upright(values, turn), note, turn)


def _alpha_mask(img: Image.Image) -> np.ndarray | None:
    """The alpha channel of ``img`` when it has one that varies (a cut-out: transparent is background)."""
    if "A" not in img.getbands():
        return None
    alpha = np.asarray(img.getchannel("A"))
    return alpha if alpha.size and alpha.min() != alpha.max() else None


def _mask_values(img: Image.Image, path: Path) -> tuple[Tensor, str | None]:
    """The decoded ``img`` as stored, a bool (H, W) mask (see ``read_mask``), and a note on unusual values."""
    notes = []
    alpha = _alpha_mask(img)
    if alpha is not None:
        values = alpha
        notes.append(
            "an alpha channel that varies, so the mask is the alpha channel (transparent: background)"
        )
    elif img.mode in ("P", "PA"):
        return torch.from_numpy(np.asarray(img.getchannel(0)) > 0), None
    else:
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
    if values.dtype.kind == "f":
        notes.append(f"float values (range taken as [0, {full:g}])")
    if low < 0:
        notes.append(f"negative values (down to {low})")
    if ((values != 0) & (values != top)).any():
        colour = alpha is None and len(img.getbands()) >= 3  # read by grey level: say so
        how = ", colours read by their grey level 0.299 R + 0.587 G + 0.114 B" if colour else ""
        notes.append(
            f"more than one non-zero value (from {low} to {top}{how}: a soft, JPEG, label or colour mask?)"
        )
    elif top not in (0, 1, full):
        notes.append(f"values in {{0, {top}}}")
    note = None
    if notes:
        rule = f"value > {threshold:g}" if threshold else "value > 0 (no value above half the range)"
        note = f"{'; '.join(notes)}; foreground is read as {rule}"
    return torch.from_numpy(values > threshold), note


def read_mask(path: Path) -> Tensor:
    """Read a mask file as bool (H, W).

    A mask with an alpha channel that varies (a cut-out, RGBA or grey + alpha) is that channel, read as
    a grey mask below. Palette masks (PNG mode ``P``, as in VOC or DAVIS): foreground where the palette
    index is not 0, whatever colour the palette gives it (a dark red index 1 would be background by
    brightness). Other masks are grey levels (RGB by grey level, 1-bit as 0 / 255): foreground where the value is
    above half the range (127 for 8-bit, 32767 for 16-bit, 0.5 for float masks in [0, 1], else 127.5),
    or, when no value is above half the range, where it is not 0. So any {0, v} mask ({0, 1}, {0, 255},
    {0, 7}) is foreground at v, soft or JPEG masks are cut at half the range and label masks
    {0, 1, 2, ...} are foreground at every label. Unusual values (not {0, 1} or {0, full range}, float,
    negative, alpha) give a ``ValueRangeWarning`` naming the file; ``MaskFolderDataset`` gives one per
    root. EXIF orientation and files of several frames: as ``read_image``.
    """
    mask, note, _ = read_mask_with_note(path)
    if note:
        warnings.warn(f"{path}: {note}.", ValueRangeWarning, stacklevel=2)
    return mask
