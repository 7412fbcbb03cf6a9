"""A researcher pointing samflow at their own dataset gets errors that say what to give instead.

Found walking the README as a new user with a dataset laid out as researchers have them (session 35,
helper H4): a split given as a list file (``train.txt``), the images folder itself given as the
root, and masks named like their image plus a suffix (ISIC's ``x_segmentation.png``) each stopped
the run with a line that did not say what to do ("does not exist or is not a folder" for a file
that exists, "contains the folders none", "Add the masks" for a mask that is there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samflow.data import DataError, SegmentationDataModule, find_samples


def make_split(root: Path, stems: list[str], mask_names: dict[str, str] | None = None) -> Path:
    """``root/images/<stem>.jpg`` (landscape and portrait) and ``root/masks/<stem>.png`` (0 / 255);
    ``mask_names`` renames some masks (stem -> file name)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, stem in enumerate(stems):
        h, w = (24, 32) if i % 2 == 0 else (32, 24)
        Image.fromarray(np.full((h, w, 3), 90 + i, np.uint8)).save(root / "images" / f"{stem}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[4:12, 4:12] = 255
        name = (mask_names or {}).get(stem, f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / name)
    return root


def test_a_list_file_given_as_a_split_is_named_as_a_file_with_the_forms_a_split_takes(tmp_path: Path) -> None:
    """``train: data/train.txt`` (a list of names beside one images/ + masks/ folder): the error says
    the path is a file and that a split is a folder, not that it does not exist."""
    data = make_split(tmp_path / "data", ["a", "b", "c"])
    listed = data / "train.txt"
    listed.write_text("a\nb\n")
    with pytest.raises(DataError) as info:
        SegmentationDataModule(train=str(listed), img_size=32).setup("fit")
    message = str(info.value)
    assert message.startswith(f"data.train: Dataset root {listed} is a file, not a folder.")
    assert "does not exist" not in message
    assert "{root: FOLDER, images: NAME, masks: NAME}" in message
    assert "a file listing the split's names is not read" in message


def test_links_to_a_lists_files_make_a_split_as_the_error_says(tmp_path: Path) -> None:
    """What the list-file error tells to do works: a folder of links to the listed files is a split."""
    data = make_split(tmp_path / "data", ["a", "b", "c"])
    split = tmp_path / "train"
    for sub in ("images", "masks"):
        (split / sub).mkdir(parents=True)
    for stem in ("a", "b"):
        (split / "images" / f"{stem}.jpg").symlink_to(data / "images" / f"{stem}.jpg")
        (split / "masks" / f"{stem}.png").symlink_to(data / "masks" / f"{stem}.png")
    assert [s.id for s in find_samples(split)] == ["a", "b"]


def test_the_images_folder_given_as_the_root_names_its_parent(tmp_path: Path) -> None:
    """``train: data/train/images``: the error says the folder holds the images itself and gives the
    parent as the root to write, not "contains the folders none; set images= to the right one"."""
    split = make_split(tmp_path / "data" / "train", ["a", "b"])
    with pytest.raises(DataError) as info:
        SegmentationDataModule(train=str(split / "images"), img_size=32).setup("fit")
    message = str(info.value)
    assert "none" not in message
    assert f"{split / 'images'} holds 2 image file(s) itself" in message
    assert f"{{root: {split}, images: images, masks: NAME}}" in message


def test_a_missing_subfolder_names_the_spec_to_write_and_reads_no_folders_as_such(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "notes.md").write_text("no images here")
    with pytest.raises(DataError) as info:
        find_samples(bare)
    message = str(info.value)
    assert message == (
        f"{bare / 'images'} does not exist. {bare} contains no folders; set images= to the right one "
        f"({{root: {bare}, images: NAME, masks: NAME}})."
    )


def test_masks_named_like_their_image_plus_a_suffix_are_named_in_the_error(tmp_path: Path) -> None:
    """ISIC's ``<stem>_segmentation.png`` and ``<stem>_mask.png``, and a prefix (``mask_<stem>.png``):
    the missing-mask error names those files and says the stems must be equal, rather than only
    "Add the masks"; a mask of another image that merely starts alike (``a1`` for ``a``) is not named."""
    names = {"a": "a_segmentation.png", "b": "b_mask.png", "c": "mask_c.png"}
    split = make_split(tmp_path / "isic", ["a", "b", "c", "a1"], mask_names=names)
    with pytest.raises(DataError) as info:
        find_samples(split)
    message = str(info.value)
    assert "3 image(s)" in message
    assert "a -> a_segmentation.png, b -> b_mask.png, c -> mask_c.png" in message
    assert "a -> a1.png" not in message
    assert "must have the same stem: rename the masks" in message
