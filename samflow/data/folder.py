"""Image / mask pairs from folders whose files share a stem (COD10K, CAMO, Kvasir, ISTD, DIS5K, HQSeg-44K).

A root holds an image folder and a mask folder (``images/`` and ``masks/`` by default; COD10K calls them
``Imgs/`` and ``GT/``, DIS5K ``im/`` and ``gt/``). ``images/cat.jpg`` pairs with ``masks/cat.png``.
Both may be the same folder when the suffixes tell images from masks (cascade_psp: ``x.jpg`` + ``x.png``).
Several roots, each with its own folder names, make one dataset (HQSeg-44K style multi-dataset training).

Rules, checked when the dataset is built (listing only, no image is opened):

- a missing or empty folder is an error that names it and lists what the root does contain;
- an image without a mask is an error that lists up to 10 of them;
- a mask without an image is only a warning (datasets often ship extra masks), listing up to 10;
- two files with one stem in one folder (``a.jpg`` and ``a.png``) is an error naming both.

And when a sample is read: an unreadable file, an image and mask of different sizes, or a float file
with NaN or infinite values, is a ``DataError`` naming the file(s).

``MaskFolderDataset.check_files`` finds unreadable files and size mismatches of a whole dataset before
any sample is read (``SegmentationDataModule`` runs it when it builds the datasets, so a corrupt file
stops a run before training starts): every file is opened (its header parsed), PNGs are walked chunk by
chunk with their checksums (``verify``, no decompression), a JPEG must end with its end-of-image marker
(else it is decoded at 1/8 scale to tell a truncated file from trailing bytes), other formats are
decoded in full; a failed check is confirmed by reading the file as a sample read would, so only files
that cannot be read are reported. Each mask's size is compared with its image's. It reports every bad
file (``error``: one ``DataError`` line listing them) or drops the samples that have one (``skip``).

How values are read (``read_mask``, ``read_image``; the README says the same):

- masks: palette PNGs (VOC, DAVIS) are foreground where the palette index is not 0. Other masks are
  taken as grey levels (RGB masks by their grey level, 1-bit masks as 0 / 255) and a pixel is
  foreground when its value is above half the range (> 127 for 8-bit, > 32767 for 16-bit, > 0.5 for a
  float mask in [0, 1], > 127.5 for any other float mask); a mask with no value above half the range
  is foreground where it is not 0. So {0, 1}, {0, 255}, {0, 7} and any {0, v} mask is foreground at v,
  a soft, anti-aliased or JPEG mask is cut at half the range, and a label mask {0, 1, 2, ...} is
  foreground at every label.
- images: 8-bit files (RGB, grey, RGBA, palette, 1-bit, ...) become RGB / 255. 16-bit files (grey
  ``I;16``, or ``I`` with values in 0..65535) become value / 65535, as scikit-image's ``img_as_float``
  scales by the type's range (a 12-bit image in a 16-bit file is therefore dark, and warned about);
  16-bit RGB TIFFs are read at full precision when ``tifffile`` is installed, else at Pillow's 8 bits.
  Float files (``F``) already in [0, 1] are read as they are; others are mapped from their own
  [min, max] to [0, 1]; so are ``I`` files with values outside 0..65535. A grey image is repeated
  on the three channels.

``MaskFolderDataset`` warns once per dataset root (and once per data-loader worker process, which
has its own copy of the dataset) about the first mask, and the first image, whose values are unusual:
a mask that is not {0, 1} or {0, full range}, a float mask, negative values; a 16-bit image with
nothing above 4095, a float or 32-bit image mapped by its own range. ``ValueRangeWarning`` is its class.
"""

from __future__ import annotations

import importlib
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from samflow.batch import image_placeholder
from samflow.data.prompts import NoPrompt, PromptSampler, build_prompt
from samflow.data.transforms import (
    IMAGE_RESIZES,
    ImageResize,
    ResizeMode,
    input_shape,
    scale_boxes,
    scale_coords,
    to_input_frame,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".gif")
_MAX_LISTED = 10

FolderSpec = str | Path | Mapping[str, Any] | Sequence[str | Path | Mapping[str, Any]]


class DataError(ValueError):
    """A dataset folder or file is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class Sample:
    """One image, its mask (None when the dataset has no masks) and its id (the file stem)."""

    image: Path
    mask: Path | None
    id: str


def _listing(paths: Sequence[Any], sep: str = ", ") -> str:
    shown = sep.join(str(p) for p in list(paths)[:_MAX_LISTED])
    more = len(paths) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _files_by_stem(folder: Path, suffixes: Sequence[str], exclude: Sequence[str] = ()) -> dict[str, Path]:
    """Map stem -> file for the files of ``folder`` with one of ``suffixes`` (case-insensitive)."""
    wanted = {s.lower() for s in suffixes} - {s.lower() for s in exclude}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in wanted:
            continue
        if path.stem in found:
            raise DataError(
                f"{folder}: two files share the stem {path.stem!r}: {found[path.stem].name} and {path.name}. "
                "Remove one, or narrow the suffixes (image_suffixes / mask_suffixes)."
            )
        found[path.stem] = path
    return found


def _check_folder(root: Path, folder: Path, key: str) -> None:
    if not root.is_dir():
        raise DataError(f"Dataset root {root} does not exist or is not a folder; check the path.")
    if not folder.is_dir():
        subfolders = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"{folder} does not exist. {root} contains the folders {subfolders or 'none'}; "
            f"set {key}= to the right one."
        )


def find_samples(
    root: str | Path,
    images: str = "images",
    masks: str | None = "masks",
    image_suffixes: Sequence[str] = IMAGE_SUFFIXES,
    mask_suffixes: Sequence[str] = MASK_SUFFIXES,
    require_masks: bool = True,
) -> list[Sample]:
    """List the image / mask pairs of one root, sorted by stem (see the module docstring for the rules).

    Args:
        root: the dataset folder.
        images: image folder, relative to ``root`` (``"."`` or ``""`` for the root itself).
        masks: mask folder, relative to ``root``; ``None`` for images only.
        image_suffixes: file suffixes of images.
        mask_suffixes: file suffixes of masks.
        require_masks: when False and the mask folder does not exist, return images only; and when the
            image folder does not exist either, read images from ``root`` itself (predict on a plain folder).

    Returns:
        The samples.
    """
    root = Path(root).expanduser()
    image_dir, mask_dir = root / images, (root / masks if masks is not None else None)
    if mask_dir is not None and not mask_dir.is_dir() and not require_masks:
        mask_dir = None
        if root.is_dir() and not image_dir.is_dir():
            image_dir = root
    _check_folder(root, image_dir, "images")
    same_folder = mask_dir is not None and mask_dir.resolve() == image_dir.resolve()
    if same_folder and not {s.lower() for s in image_suffixes} - {s.lower() for s in mask_suffixes}:
        raise DataError(
            f"{image_dir} holds both images and masks, so image_suffixes and mask_suffixes must differ "
            f"(e.g. image_suffixes=['.jpg'], mask_suffixes=['.png']); "
            f"got {image_suffixes} and {mask_suffixes}."
        )
    image_files = _files_by_stem(image_dir, image_suffixes, exclude=mask_suffixes if same_folder else ())
    if not image_files:
        raise DataError(f"{image_dir} has no image files with suffixes {tuple(image_suffixes)}.")
    if mask_dir is None:
        return [Sample(path, None, stem) for stem, path in image_files.items()]
    _check_folder(root, mask_dir, "masks")
    mask_files = _files_by_stem(mask_dir, mask_suffixes, exclude=image_suffixes if same_folder else ())
    missing = sorted(set(image_files) - set(mask_files))
    if missing:
        raise DataError(
            f"{len(missing)} image(s) in {image_dir} have no mask in {mask_dir} "
            f"(suffixes {tuple(mask_suffixes)}): {_listing(missing)}. Add the masks or remove those images."
        )
    orphans = sorted(set(mask_files) - set(image_files))
    if orphans:
        warnings.warn(
            f"{len(orphans)} mask(s) in {mask_dir} have no image in {image_dir}; they are ignored: "
            f"{_listing(orphans)}.",
            stacklevel=2,
        )
    return [Sample(path, mask_files[stem], stem) for stem, path in image_files.items()]


def _root_entries(root: FolderSpec) -> list[dict[str, Any]]:
    """Normalise a folder spec to a list of ``{"root": ..., overrides...}`` dicts."""
    if isinstance(root, (str, Path, Mapping)):
        root = [root]
    entries = []
    for entry in root:
        if isinstance(entry, Mapping):
            if "root" not in entry:
                raise DataError(f"Folder spec {dict(entry)} has no 'root' key.")
            entries.append(dict(entry))
        else:
            entries.append({"root": entry})
    if not entries:
        raise DataError("Empty list of dataset roots.")
    return entries


def _header_size(path: Path) -> tuple[int, int]:
    """(H, W) of the image at ``path`` from its header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc}). Replace it or remove the pair.") from exc


def _open(path: Path, mode: str | None) -> Image.Image:
    """The image at ``path`` converted to ``mode`` (None: as stored)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img if mode is None else img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc}). Replace it or remove the pair.") from exc


OnBadSample = Literal["error", "skip"]
_JPEG_TAIL = 1024  # bytes at the end of a JPEG searched for its end-of-image marker
_CHECK_THREADS = 8  # files checked at once (I/O bound; Pillow's decoders release the GIL)


@dataclass(frozen=True)
class BadFile:
    """A file of ``sample`` that cannot be used, and why (one line)."""

    sample: Sample
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, OSError) else f"{type(exc).__name__}: {text}"


def _readable(path: Path) -> bool:
    """Whether the file decodes in full, as a sample read (``_open``) would decode it."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception:  # noqa: BLE001 - whatever a decoder raises, the file cannot be read
        return False
    return True


def _jpeg_ends(path: Path) -> bool:
    """Whether the JPEG has its end-of-image marker (FF D9) in its last bytes: a truncated file has not."""
    with open(path, "rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - _JPEG_TAIL))
        return b"\xff\xd9" in handle.read()


def check_file(path: Path) -> tuple[int, int] | str:
    """The (width, height) of an image file that reads, else why it does not (one line).

    Fast: the header is parsed; a PNG is walked chunk by chunk with its checksums (Pillow's ``verify``,
    no decompression); a JPEG must end with its end-of-image marker, and one without is decoded at 1/8
    scale (``draft``), as a JPEG with bytes after the marker reads fine; other formats are decoded. A
    failed PNG walk is confirmed by decoding (a PNG without its end chunk still reads). What this does
    not find (a PNG or JPEG whose compressed data are corrupt but complete) fails when the sample is read.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            size = img.size
            if img.format == "PNG":
                try:
                    img.verify()
                except Exception:  # confirmed (or not) by a full read below
                    if not _readable(path):
                        raise
            elif img.format in ("JPEG", "MPO"):
                if not _jpeg_ends(path):
                    img.draft(img.mode, (1, 1))  # libjpeg's 1/8 scale: every byte read, 1/64 of the pixels
                    img.load()
            else:
                img.load()
    except UnidentifiedImageError:
        return "not an image file Pillow can read"
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises, the file cannot be read
        return f"truncated or corrupt: {_one_line(exc)}"
    return size


def _size_mismatch(image: Path, mask_wh: tuple[int, int], image_wh: tuple[int, int]) -> str:
    """Why a mask does not fit its image; the words of the pre-check and of a sample read."""
    return f"{mask_wh[0]}x{mask_wh[1]} (WxH) but its image {image} is {image_wh[0]}x{image_wh[1]}"


def _floating(dtype: torch.dtype | str) -> torch.dtype:
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


def _read_image(path: Path, dtype: torch.dtype, codes: bool = False) -> tuple[Tensor, str | None]:
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
    image, note = _read_image(path, _floating(dtype))
    if note:
        warnings.warn(f"{path}: {note}.", ValueRangeWarning, stacklevel=2)
    return image


def _read_mask(path: Path) -> tuple[Tensor, str | None]:
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
    mask, note = _read_mask(path)
    if note:
        warnings.warn(f"{path}: {note}.", ValueRangeWarning, stacklevel=2)
    return mask


class MaskFolderDataset(Dataset):
    """Image / mask pairs from one or several folder roots, brought into SAM's S x S input frame.

    Args:
        root: a dataset folder, a dict ``{"root": ..., "images": ..., "masks": ..., "image_suffixes": ...,
            "mask_suffixes": ...}`` overriding the arguments below for that root, or a list of those.
        images: image folder name under each root.
        masks: mask folder name under each root; ``None`` for images only (predict).
        image_suffixes: image file suffixes.
        mask_suffixes: mask file suffixes.
        prompt: prompt sampler or ``build_prompt`` spec, applied to the original-size mask.
        img_size: S, the side of the model's square input.
        resize_mode: ``"longest"`` (SAM's: resize the longest side, pad bottom/right) or ``"stretch"``.
        image_resize: ``"sam"`` (segment-anything's own Pillow resize, exact) or ``"bilinear"`` (torch's
            antialiased interpolation: faster, within one grey level); see ``samflow.data.transforms``.
        prompt_seed: ``None`` draws fresh prompts each time (training); an int seeds the prompt of
            sample ``i`` with ``(prompt_seed, i)`` so it is the same every epoch (validation, test).
        require_masks: when False, roots without a mask folder give images only (see ``find_samples``);
            such a dataset has no prompts (they are drawn from masks), whatever ``prompt`` says.
        dtype: the floating dtype (or its name) of every float in an item: image, mask, points, box and
            mask prompt. ``torch.float64`` / ``"float64"`` keeps the pipeline in double precision.

    An item is a dict: ``image`` (3, S, S); ``mask`` (1, S, S) and ``gt_original`` bool (H, W) when there
    are masks; ``input_size`` and ``original_size`` long (2,); ``id``; ``path``; and the prompt in the
    S x S frame: ``points`` (K, 2) + ``point_labels`` long (K,), ``box`` (4,), ``mask_prompt``
    (1, S/4, S/4); floats are of ``dtype``. ``collate`` turns a list of items into a ``SamBatch``.
    """

    def __init__(
        self,
        root: FolderSpec,
        images: str = "images",
        masks: str | None = "masks",
        image_suffixes: Sequence[str] = IMAGE_SUFFIXES,
        mask_suffixes: Sequence[str] = MASK_SUFFIXES,
        prompt: PromptSampler | str | Mapping[str, Any] | None = None,
        img_size: int = 1024,
        resize_mode: ResizeMode = "longest",
        image_resize: ImageResize = "sam",
        prompt_seed: int | None = None,
        require_masks: bool = True,
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        if resize_mode not in ("longest", "stretch"):
            raise ValueError(f"resize_mode must be 'longest' or 'stretch', got {resize_mode!r}.")
        if image_resize not in IMAGE_RESIZES:
            raise ValueError(f"image_resize must be 'sam' or 'bilinear', got {image_resize!r}.")
        if img_size <= 0 or img_size % 4:
            raise ValueError(
                f"img_size must be a positive multiple of 4 (mask prompts are S/4); got {img_size}."
            )
        defaults = {
            "images": images,
            "masks": masks,
            "image_suffixes": image_suffixes,
            "mask_suffixes": mask_suffixes,
        }
        self.samples: list[Sample] = []
        entries = _root_entries(root)
        self.roots = [Path(entry["root"]).expanduser() for entry in entries]
        self._warned: set[tuple[str, str]] = set()  # (root, "mask" / "image") already warned about
        for entry in entries:
            unknown = set(entry) - set(defaults) - {"root"}
            if unknown:
                raise DataError(
                    f"Folder spec {entry} has unknown keys {sorted(unknown)}; "
                    f"use 'root' and {sorted(defaults)}."
                )
            self.samples += find_samples(**{**defaults, **entry}, require_masks=require_masks)
        with_masks = {s.mask is not None for s in self.samples}
        if len(with_masks) > 1:
            raise DataError(f"Roots {root}: some have masks and some do not; give masks for all or for none.")
        self.has_masks = with_masks == {True}
        if require_masks and not self.has_masks:
            raise DataError(f"Roots {root} are set to have no masks (masks=None), but this split needs them.")
        # Prompts are drawn from masks: without masks there are none.
        self.prompt = build_prompt(prompt) if self.has_masks else NoPrompt()
        self.img_size = img_size
        self.resize_mode = resize_mode
        self.image_resize = image_resize
        self.prompt_seed = prompt_seed
        self.dtype = _floating(dtype)
        self.check_seconds: float | None = None  # how long ``check_files`` took
        # False: items carry no pixels (``image_placeholder``) and image files are not decoded, only
        # their headers read for the size; set for a run whose encoder outputs come from an embedding
        # store when no plugin reads the image (``samflow.embed.check.skip_training_pixels``)
        self.pixels = True

    def __len__(self) -> int:
        return len(self.samples)

    def check_files(
        self,
        on_bad_sample: OnBadSample = "error",
        progress: Callable[[int], Any] | None = None,
        threads: int = _CHECK_THREADS,
    ) -> list[BadFile]:
        """Check every image and mask file before any is read (see ``check_file``), and each mask's size.

        Args:
            on_bad_sample: ``"error"``: raise one ``DataError`` line listing up to 10 bad files (path and
                reason) and their count; ``"skip"``: drop the samples with a bad file (image and mask
                together) from ``samples`` and return the bad files, for the caller to report.
            progress: called with the number of files checked since the last call (a progress bar).
            threads: files checked at once.

        Returns:
            The bad files, in sample order (empty when every file is fine).
        """
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}.")
        paths = [p for s in self.samples for p in (s.image, s.mask) if p is not None]
        start = time.perf_counter()
        results: dict[Path, tuple[int, int] | str] = {}
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for path, result in zip(paths, pool.map(check_file, paths), strict=True):
                results[path] = result
                if progress is not None:
                    progress(1)
        self.check_seconds = time.perf_counter() - start
        bad: list[BadFile] = []
        for sample in self.samples:
            image = results[sample.image]
            if isinstance(image, str):
                bad.append(BadFile(sample, sample.image, image))
            if sample.mask is None:
                continue
            mask = results[sample.mask]
            if isinstance(mask, str):
                bad.append(BadFile(sample, sample.mask, mask))
            elif not isinstance(image, str) and mask != image:
                reason = (
                    f"mask is {_size_mismatch(sample.image, mask, image)}: a mask must have its image's size"
                )
                bad.append(BadFile(sample, sample.mask, reason))
        if not bad:
            return bad
        samples = {b.sample for b in bad}
        if on_bad_sample == "error":
            raise DataError(
                f"{len(bad)} of {len(paths)} files cannot be used ({len(samples)} of {len(self.samples)} "
                f"samples; checked when the datasets were built, before any sample was read): {_listing(bad, sep='; ')}. "
                "Replace or remove these files (an image with its mask), or set data.on_bad_sample: skip "
                "to leave their samples out."
            )
        self.samples = [s for s in self.samples if s not in samples]
        return bad

    def _warn_once(self, kind: str, path: Path, note: str | None) -> None:
        """Warn about ``path``'s unusual values unless this root already had a warning for ``kind``."""
        if not note:
            return
        under = [r for r in self.roots if path.is_relative_to(r)]
        root = str(max(under, key=lambda r: len(r.parts))) if under else ", ".join(map(str, self.roots))
        if (root, kind) in self._warned:
            return
        self._warned.add((root, kind))
        warnings.warn(
            f"Dataset root {root}: unusual {kind} values, first in {path}: {note}. Other {kind}s of this "
            f"root are read by the same rules without another warning (README: how masks and images are "
            f"read).",
            ValueRangeWarning,
            stacklevel=3,
        )

    def _generator(self, index: int) -> torch.Generator:
        if self.prompt_seed is None:
            seed = int(torch.randint(2**62, ()))  # follows the global / worker RNG
        else:
            seed = (self.prompt_seed * 1_000_003 + index) % 2**62
        return torch.Generator().manual_seed(seed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        size = self.img_size
        # segment-anything's resize of an 8-bit image works on its uint8 values k (``sam_resize`` finds
        # them again in k / 255, exactly for float32 / float64): resized and padded as uint8, then
        # divided by 255, the frame is the same to the bit, without the float passes over the image
        codes = self.image_resize == "sam" and self.dtype in (torch.float32, torch.float64)
        item: dict[str, Any] = {"id": sample.id, "path": str(sample.image)}
        if self.pixels:
            image, note = _read_image(sample.image, self.dtype, codes=codes)  # (3, H, W)
            self._warn_once("image", sample.image, note)
            original: tuple[int, int] = tuple(image.shape[-2:])  # type: ignore[assignment]
            frame, input_size = to_input_frame(image, size, self.resize_mode, self.image_resize)
            item["image"] = frame.to(self.dtype).div_(255) if frame.dtype == torch.uint8 else frame
        else:
            original = _header_size(sample.image)
            input_size = input_shape(*original, size, self.resize_mode)
            item["image"] = image_placeholder((3, size, size), self.dtype)
            item["pixels"] = False
        item["input_size"] = torch.tensor(input_size, dtype=torch.long)
        item["original_size"] = torch.tensor(original, dtype=torch.long)
        if sample.mask is None:
            return item
        gt, note = _read_mask(sample.mask)  # (H, W) bool
        if tuple(gt.shape) != original:
            mismatch = _size_mismatch(sample.image, (gt.shape[1], gt.shape[0]), (original[1], original[0]))
            raise DataError(f"{sample.mask} is {mismatch}; masks must have the image's size.")
        self._warn_once("mask", sample.mask, note)
        item["gt_original"] = gt
        item["mask"] = to_input_frame(gt[None].to(self.dtype), size, self.resize_mode, "nearest-exact")[0]
        prompt = self.prompt(gt, self._generator(index))
        if "points" in prompt:
            item["points"] = scale_coords(prompt["points"].to(self.dtype), original, input_size)
            item["point_labels"] = prompt["point_labels"]
        if "box" in prompt:
            item["box"] = scale_boxes(prompt["box"].to(self.dtype), original, input_size)
        if "mask_prompt" in prompt:
            coarse = prompt["mask_prompt"][None].to(self.dtype)  # (1, H, W)
            full = to_input_frame(coarse, size, self.resize_mode, "nearest-exact")[0]  # (1, S, S)
            low = F.interpolate(full[None], size=(size // 4, size // 4), mode="area")[0]
            item["mask_prompt"] = (low > 0.5).to(self.dtype)  # (1, S/4, S/4)
        return item
