"""Listing the image / mask pairs of dataset roots, sorted by stem; no image is opened.

``find_samples`` pairs the files of one root's image and mask folders by stem (``Sample``);
``root_entries`` reads a folder spec (``FolderSpec``: a root, a dict overriding the folder names and
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
from samflow.paths import broken_link, where_looked

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


def short_listing(paths: Sequence[Any], sep: str = ", ") -> str:
    """The first ten of ``paths`` joined by ``sep``, then "and N more": file lists in one-line errors."""
    shown = sep.join(str(p) for p in list(paths)[:_MAX_LISTED])
    more = len(paths) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Map stem -> file for the files of ``folder`` with one of ``suffixes`` (case-insensitive), by stem."""
    wanted = {s.lower() for s in suffixes}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in wanted:
            continue
        if not path.is_file() and not broken_link(path):  # a broken link is listed: the file check names it
            continue
        if path.stem in found:
            raise DataError(
                f"{folder}: two files share the stem {path.stem!r}: {found[path.stem].name} and {path.name}. "
                "Remove one, or narrow the suffixes (image_suffixes / mask_suffixes)."
            )
        found[path.stem] = path
    return dict(sorted(found.items()))


def _subfolders_with(folder: Path, suffixes: Sequence[str], skip: Path | None) -> list[Path]:
    """The subfolders of ``folder`` (but the one holding ``skip``) with a file of ``suffixes`` at any depth."""
    wanted = {s.lower() for s in suffixes}
    subfolders = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if skip is not None:
        subfolders = [p for p in subfolders if not skip.resolve().is_relative_to(p.resolve())]
    return [
        sub for sub in subfolders if any(p.suffix.lower() in wanted and p.is_file() for p in sub.rglob("*"))
    ]


def _check_folder(root: Path, folder: Path, key: str, image_suffixes: Sequence[str] = ()) -> None:
    """A DataError saying what to give instead when ``root`` or its ``key`` folder (``images`` /
    ``masks``) is not a folder: a file given as the root (a list of names such as ``train.txt``), or
    the images folder itself given as the root."""
    if root.is_file():
        raise DataError(
            f"Dataset root {root} is a file, not a folder. A split is a folder holding images/ and masks/, "
            "a dict {root: FOLDER, images: NAME, masks: NAME} or a list of those; a file listing the "
            "split's names is not read: put each split's files (or links to them) in folders of its own."
        )
    if not root.is_dir():
        raise DataError(
            f"Dataset root {root} does not exist or is not a folder{where_looked(root)}; check the path."
        )
    if broken_link(folder):
        raise DataError(
            f"{folder} does not exist{where_looked(folder)}; fix the link or give another folder."
        )
    if not folder.is_dir():
        wanted = {s.lower() for s in image_suffixes}
        own_images = sum(1 for p in root.iterdir() if p.is_file() and p.suffix.lower() in wanted)
        if key == "images" and own_images:
            raise DataError(
                f"{folder} does not exist, and {root} holds {own_images} image file(s) itself: if it is "
                f"the images folder, give its parent as the root ({{root: {root.parent}, images: "
                f"{root.name}, masks: NAME}}); images and masks in one folder are {{root: FOLDER, images: ., "
                "masks: ., image_suffixes: [...], mask_suffixes: [...]}."
            )
        subfolders = sorted(p.name for p in root.iterdir() if p.is_dir())
        held = f"contains the folders {subfolders}" if subfolders else "contains no folders"
        raise DataError(
            f"{folder} does not exist. {root} {held}; set {key}= to the right one "
            f"({{root: {root}, images: NAME, masks: NAME}})."
        )


def _affixed_masks(missing: Sequence[str], mask_files: Mapping[str, Path]) -> list[str]:
    """``stem -> mask name`` for the masks named like a missing image's stem plus a prefix or suffix
    after a separator (ISIC's ``x_segmentation.png``, ``x_mask.png``, ``mask_x.png``): the stems must
    be equal. Linear in the masks' name lengths (each cut at a separator is looked up)."""
    lost = set(missing)
    found: set[tuple[str, str]] = set()
    for other, path in mask_files.items():
        for i, char in enumerate(other):
            if char.isalnum():
                continue
            found.update((stem, path.name) for stem in (other[:i], other[i + 1 :]) if stem in lost)
    return [f"{stem} -> {name}" for stem, name in sorted(found)]


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
    _check_folder(root, image_dir, "images", image_suffixes)
    same_folder = mask_dir is not None and mask_dir.resolve() == image_dir.resolve()
    shared = sorted({s.lower() for s in image_suffixes} & {s.lower() for s in mask_suffixes})
    if same_folder and shared:
        raise DataError(
            f"{image_dir} holds both images and masks, so image_suffixes and mask_suffixes must differ "
            f"and share no suffix (e.g. image_suffixes=['.jpg'], mask_suffixes=['.png']); "
            f"got {image_suffixes} and {mask_suffixes}, both with {shared}."
        )
    image_files = _files_by_stem(image_dir, image_suffixes)
    nested = _subfolders_with(image_dir, image_suffixes, skip=mask_dir)  # images there are not read
    if not image_files:
        hint = (
            f"; its subfolders {short_listing([p.name for p in nested])} hold images, which are not read: "
            "give each as its own root, or as images / masks of a folder spec"
            if nested
            else ""
        )
        raise DataError(f"{image_dir} has no image files with suffixes {tuple(image_suffixes)}{hint}.")
    if nested:
        warnings.warn(
            f"{image_dir} has subfolders with images, which are not read (only the folder's own files "
            f"are): {short_listing([str(p) for p in nested])}. Give each as its own root (or as images / "
            "masks of a folder spec) to use them.",
            stacklevel=2,
        )
    if mask_dir is None:
        return [Sample(path, None, stem) for stem, path in image_files.items()]
    _check_folder(root, mask_dir, "masks")
    mask_files = _files_by_stem(mask_dir, mask_suffixes)
    missing = sorted(set(image_files) - set(mask_files))
    if missing:
        by_case = {stem.casefold(): stem for stem in mask_files}
        cased = [
            f"{stem} -> {mask_files[by_case[stem.casefold()]].name}"
            for stem in missing
            if stem.casefold() in by_case
        ]
        hint = (
            " Masks whose names differ only in case (names are case-sensitive): "
            f"{short_listing(cased)}; rename them."
            if cased
            else ""
        )
        lost = set(missing)
        other = sorted(p.name for p in mask_dir.iterdir() if p.is_file() and p.stem in lost)
        if other:
            hint += f" Mask files with other suffixes: {short_listing(other)}; add theirs to mask_suffixes."
        affixed = _affixed_masks(missing, mask_files)
        if affixed:
            hint += (
                f" Masks named like an image plus a prefix or suffix: {short_listing(affixed)}; an image "
                "and its mask must have the same stem: rename the masks."
            )
        raise DataError(
            f"{len(missing)} image(s) in {image_dir} have no mask in {mask_dir} "
            f"(suffixes {tuple(mask_suffixes)}): {short_listing(missing)}. Add the masks or remove those "
            f"images.{hint}"
        )
    orphans = sorted(set(mask_files) - set(image_files))
    if orphans:
        warnings.warn(
            f"{len(orphans)} mask(s) in {mask_dir} have no image in {image_dir}; they are ignored: "
            f"{short_listing(orphans)}.",
            stacklevel=2,
        )
    return [Sample(path, mask_files[stem], stem) for stem, path in image_files.items()]


def refuse_duplicate_ids(samples: Sequence[Sample]) -> None:
    """A DataError naming both images when two samples of one dataset (from two roots) share an id
    but are different files.

    The id is what a sample is known by: its evaluation prompt is seeded from it, so two files with
    one id would share a prompt. One root listed twice (the same files again, to weigh them more) is
    not refused.
    """
    seen: dict[str, Path] = {}
    for sample in samples:
        first = seen.setdefault(sample.id, sample.image)
        if first != sample.image and first.resolve() != sample.image.resolve():
            raise DataError(
                f"Two samples have the id {sample.id!r} (the file stem): {first} and {sample.image}. "
                "Ids must be unique within a split; rename one of them, or give the roots as separate "
                "named sets (val_sets / test_sets)."
            )


def root_entries(root: FolderSpec) -> list[dict[str, Any]]:
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
