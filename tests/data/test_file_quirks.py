"""What a user's real files hold beyond plain pixels: EXIF orientation (phone photos), several frames
(animated GIF / PNG, TIFF stacks), alpha-channel and colour masks, empty files, and the files a desktop
leaves in a folder. Each is read by the rule of ``samflow.data.folder``'s module docstring, or refused
naming the file; none is read silently wrong."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from samflow.data import DataError, MaskFolderDataset, read_image, read_mask
from samflow.data.bad_files import check_file
from samflow.data.reading import OrientationWarning, ValueRangeWarning, header_size

H, W = 12, 16  # stored size of the photos below


def _stored_photo() -> np.ndarray:
    """(H, W, 3) uint8: black, with a white block in the top-left corner (rows 0-3, columns 0-5)."""
    array = np.zeros((H, W, 3), np.uint8)
    array[:4, :6] = 255
    return array


def _save(array: np.ndarray, path: Path, orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if orientation is None:
        img.save(path, quality=100) if path.suffix == ".jpg" else img.save(path)
        return path
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, **({"quality": 100} if path.suffix == ".jpg" else {}))
    return path


def _as_shown(path: Path) -> np.ndarray:
    """The file as a viewer shows it (Pillow's ``exif_transpose``): the independent reference."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


# ---- EXIF orientation ----
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_images_and_masks_are_read_as_a_viewer_shows_them(
    tmp_path: Path, orientation: int, suffix: str
) -> None:
    path = _save(_stored_photo(), tmp_path / f"photo{suffix}", orientation)
    shown = _as_shown(path)
    image = read_image(path)
    assert torch.equal((image * 255).round().byte().permute(1, 2, 0), torch.from_numpy(shown.copy()))
    assert header_size(path) == shown.shape[:2]
    header = check_file(path)
    assert not isinstance(header, str) and header.size == (shown.shape[1], shown.shape[0])
    mask_path = _save(_stored_photo()[..., 0], tmp_path / "mask.png", orientation)
    assert torch.equal(read_mask(mask_path), torch.from_numpy(_as_shown(mask_path)[..., 0] > 127))


@pytest.mark.parametrize("orientation", [3, 6])  # turned 180 degrees (same size) and 90 degrees clockwise
def test_a_phone_photo_pairs_with_the_mask_drawn_on_it_as_shown(tmp_path: Path, orientation: int) -> None:
    image = _save(_stored_photo(), tmp_path / "ds" / "images" / "photo.jpg", orientation)
    shown = _as_shown(image)  # the white block is where the annotation tool showed it
    _save((shown[..., 0] > 127).astype(np.uint8) * 255, tmp_path / "ds" / "masks" / "photo.png")
    dataset = MaskFolderDataset(tmp_path / "ds", img_size=16)
    assert dataset.check_files() == []
    with pytest.warns(
        OrientationWarning, match=rf"ds: images with an EXIF orientation.*photo\.jpg.*{orientation}"
    ):
        item = dataset[0]
    gt, pixels = item["gt_original"], read_image(image)[0]
    assert gt.shape == shown.shape[:2] and item["original_size"].tolist() == list(shown.shape[:2])
    assert pixels[gt].min() > 0.9 and pixels[~gt].max() < 0.1  # the mask covers the white block exactly


def test_a_sideways_photo_with_a_mask_of_its_stored_pixels_is_refused_saying_why(tmp_path: Path) -> None:
    image = _save(_stored_photo(), tmp_path / "ds" / "images" / "photo.jpg", 6)
    mask = _save(_stored_photo()[..., 0], tmp_path / "ds" / "masks" / "photo.png")  # stored layout, 16x12
    dataset = MaskFolderDataset(tmp_path / "ds", img_size=16)
    why = f"16x12 \\(WxH\\) but its image {image} is 12x16 as read: its EXIF orientation 6 has it turned 90"
    with pytest.raises(DataError, match=f"{mask} is {why}.*remove the orientation tag"):
        dataset[0]
    with pytest.raises(DataError, match=f"{mask} \\(mask is {why}"):
        dataset.check_files()


def test_the_orientation_warning_comes_once_per_root(tmp_path: Path) -> None:
    for stem in ("a", "b"):
        image = _save(_stored_photo(), tmp_path / "ds" / "images" / f"{stem}.jpg", 3)
        _save((_as_shown(image)[..., 0] > 127).astype(np.uint8), tmp_path / "ds" / "masks" / f"{stem}.png")
    dataset = MaskFolderDataset(tmp_path / "ds", img_size=16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset[0], dataset[1]
    assert [w.category for w in record] == [OrientationWarning]


# ---- several frames ----
def _frames(path: Path, sizes: list[int], **save: object) -> Path:
    frames = [Image.fromarray(np.full((s, s), 255 * (k % 2), np.uint8)) for k, s in enumerate(sizes)]
    frames[0].save(path, save_all=True, append_images=frames[1:], **save)
    return path


@pytest.mark.parametrize("name", ["mask.gif", "mask.png", "mask.tif"])  # animated GIF, APNG, TIFF stack
def test_a_file_of_several_frames_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    path = _frames(tmp_path / name, [8, 8, 8])
    for reader in (read_mask, read_image, header_size):
        with pytest.raises(DataError, match=f"{path}: 3 frames .*save the frame"):
            reader(path)
    assert str(check_file(path)).startswith("3 frames (an animated or multi-page file)")


def test_a_tiff_thumbnail_and_a_jpeg_preview_are_not_refused(tmp_path: Path) -> None:
    tiff = _frames(tmp_path / "scan.tif", [8, 4])  # page 0 and a thumbnail
    assert read_mask(tiff).sum() == 0 and read_mask(tiff).shape == (8, 8)
    mpo = tmp_path / "phone.jpg"  # a phone's JPEG with a preview (MPO)
    photo = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    photo.save(mpo, format="MPO", save_all=True, append_images=[Image.new("RGB", (4, 4))], quality=100)
    assert read_image(mpo).shape == (3, 8, 8) and check_file(mpo) == ((8, 8), 1)


# ---- masks: alpha and colour ----
@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_a_cut_out_mask_is_its_alpha_channel(tmp_path: Path, mode: str) -> None:
    array = np.zeros((8, 8, len(mode)), np.uint8)  # black everywhere: the grey level says nothing
    array[:3, :, -1] = 255  # opaque rows 0-2
    Image.fromarray(array, mode).save(tmp_path / "cut.png")
    with pytest.warns(ValueRangeWarning, match="the mask is the alpha channel"):
        mask = read_mask(tmp_path / "cut.png")
    assert mask[:3].all() and not mask[3:].any()


def test_an_opaque_rgba_mask_is_read_by_its_grey_level(tmp_path: Path) -> None:
    array = np.full((8, 8, 4), 255, np.uint8)
    array[4:, :, :3] = 0  # white top, black bottom, alpha 255 everywhere
    Image.fromarray(array, "RGBA").save(tmp_path / "opaque.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValueRangeWarning)  # nothing unusual
        mask = read_mask(tmp_path / "opaque.png")
    assert mask[:4].all() and not mask[4:].any()


def test_a_colour_mask_is_read_by_grey_level_and_the_warning_says_so(tmp_path: Path) -> None:
    array = np.zeros((6, 8, 3), np.uint8)
    array[:2, :, 0], array[2:4, :, 1] = 255, 255  # red rows (grey 76), green rows (grey 150)
    Image.fromarray(array).save(tmp_path / "colour.png")
    with pytest.warns(ValueRangeWarning, match=r"colours read by their grey level 0\.299 R.*value > 127"):
        mask = read_mask(tmp_path / "colour.png")
    assert mask[2:4].all() and not mask[:2].any() and not mask[4:].any()


# ---- what a desktop leaves in a folder ----
def test_an_empty_file_is_named_as_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: cannot read the file \(it is empty, 0 bytes\)"):
        read_mask(tmp_path / "empty.png")


def test_hidden_and_system_files_are_not_listed_and_suffixes_match_in_any_case(tmp_path: Path) -> None:
    _save(_stored_photo(), tmp_path / "ds" / "images" / "a.JPG")
    _save(_stored_photo()[..., 0], tmp_path / "ds" / "masks" / "a.PNG")
    for junk in ("images/.DS_Store", "images/._a.JPG", "masks/._a.PNG", "images/Thumbs.db"):
        (tmp_path / "ds" / junk).write_bytes(b"\x00\x05\x16\x07")
    dataset = MaskFolderDataset(tmp_path / "ds", img_size=16)
    assert [(s.image.name, s.mask and s.mask.name) for s in dataset.samples] == [("a.JPG", "a.PNG")]
    assert dataset.check_files() == []
