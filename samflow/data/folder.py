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

And when a sample is read: an unreadable file, or an image and mask of different sizes, is a
``DataError`` naming the file(s). A mask pixel is foreground when its grayscale value is > 127.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from samflow.data.prompts import NoPrompt, PromptSampler, build_prompt
from samflow.data.transforms import ResizeMode, scale_boxes, scale_coords, to_input_frame

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".gif")
_MAX_LISTED = 10

FolderSpec = Union[str, Path, Mapping[str, Any], Sequence[str | Path | Mapping[str, Any]]]


class DataError(ValueError):
    """A dataset folder or file is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class Sample:
    """One image, its mask (None when the dataset has no masks) and its id (the file stem)."""

    image: Path
    mask: Path | None
    id: str


def _listing(paths: Sequence[Any]) -> str:
    shown = ", ".join(str(p) for p in list(paths)[:_MAX_LISTED])
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
    if same_folder and not set(s.lower() for s in image_suffixes) - set(s.lower() for s in mask_suffixes):
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


def _open(path: Path, mode: str | None) -> Image.Image:
    """The image at ``path`` converted to ``mode`` (None: as stored)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img if mode is None else img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc}). Replace it or remove the pair.") from exc


def _floating(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from itself or its name (``"float64"``, ``"torch.float64"``)."""
    found = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype such as torch.float64 or 'float64', got {dtype!r}."
        )
    return found


def read_image(path: Path, dtype: torch.dtype | str = torch.float32) -> Tensor:
    """Read an image file as (3, H, W) in [0, 1], of the floating ``dtype`` (float32 by default)."""
    array = np.asarray(_open(path, "RGB"))  # (H, W, 3) uint8
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(_floating(dtype)) / 255


def read_mask(path: Path) -> Tensor:
    """Read a mask file as bool (H, W).

    Grayscale, RGB and 1-bit masks: foreground where the grayscale value is > 127. Palette masks
    (PNG mode ``P``, as in VOC or DAVIS): foreground where the palette index is not 0, whatever
    colour the palette gives it (a dark red index 1 would be background by brightness).
    """
    img = _open(path, None)
    if img.mode == "P":
        return torch.from_numpy(np.asarray(img) > 0)
    return torch.from_numpy(np.asarray(img.convert("L")) > 127)


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
        prompt_seed: int | None = None,
        require_masks: bool = True,
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        if resize_mode not in ("longest", "stretch"):
            raise ValueError(f"resize_mode must be 'longest' or 'stretch', got {resize_mode!r}.")
        if img_size <= 0 or img_size % 4:
            raise ValueError(
                f"img_size must be a positive multiple of 4 (mask prompts are S/4); got {img_size}."
            )
        defaults = dict(
            images=images, masks=masks, image_suffixes=image_suffixes, mask_suffixes=mask_suffixes
        )
        self.samples: list[Sample] = []
        for entry in _root_entries(root):
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
        self.prompt_seed = prompt_seed
        self.dtype = _floating(dtype)

    def __len__(self) -> int:
        return len(self.samples)

    def _generator(self, index: int) -> torch.Generator:
        if self.prompt_seed is None:
            seed = int(torch.randint(2**62, ()))  # follows the global / worker RNG
        else:
            seed = (self.prompt_seed * 1_000_003 + index) % 2**62
        return torch.Generator().manual_seed(seed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        size = self.img_size
        image = read_image(sample.image, self.dtype)  # (3, H, W)
        original = tuple(image.shape[-2:])
        item: dict[str, Any] = {"id": sample.id, "path": str(sample.image)}
        item["image"], input_size = to_input_frame(image, size, self.resize_mode, "bilinear")
        item["input_size"] = torch.tensor(input_size, dtype=torch.long)
        item["original_size"] = torch.tensor(original, dtype=torch.long)
        if sample.mask is None:
            return item
        gt = read_mask(sample.mask)  # (H, W) bool
        if tuple(gt.shape) != original:
            raise DataError(
                f"{sample.mask} is {gt.shape[1]}x{gt.shape[0]} (WxH) but its image {sample.image} is "
                f"{original[1]}x{original[0]}; masks must have the image's size."
            )
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
