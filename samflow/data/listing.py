"""Listing the image / mask pairs of dataset roots, sorted by stem; no image is opened.

``find_samples`` pairs the files of one root's image and mask folders by stem (``Sample``);
``_root_entries`` reads a folder spec (``FolderSpec``: a root, a dict overriding the folder names and
suffixes for that root, or a list of those). The rules (folder names, what is an error and what a
warning) are in ``samflow.data.folder``'s module docstring.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samflow.data.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".gif")
_MAX_LISTED = 10

FolderSpec = str | Path | Mapping[str, Any] | Sequence[str | Path | Mapping[str, Any]]


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
