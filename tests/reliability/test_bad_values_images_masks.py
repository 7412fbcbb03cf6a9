"""Bad-input matrix, values: masks that are not {0, 255} and images that are not 8-bit.

Rules under test (``samflow.data.folder``; README, "how masks and images are read"):

- mask: palette index != 0; otherwise foreground = value > half the range (127 for 8-bit, 32767 for
  16-bit, 0.5 for float in [0, 1]), or value > 0 when no value is above half the range;
- image: 8-bit / 255 as before, 16-bit / 65535 (scikit-image's img_as_float), float in [0, 1] as is,
  other float files mapped from their own [min, max] to [0, 1];
- a ``ValueRangeWarning`` once per dataset root for masks, and once for images, with unusual values.

Every expected number below is worked out by hand in the comment beside it.
"""

from __future__ import annotations

import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samflow.data import DataError, MaskFolderDataset, read_image, read_mask
from samflow.data.reading import ValueRangeWarning


def grey_image(path: Path, width: int, value: int = 100) -> Path:
    """A 1 x width 8-bit RGB image (constant ``value``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((1, width, 3), value, dtype=np.uint8)).save(path)
    return path


def mask_file(path: Path, values: list, dtype=np.uint8) -> Path:
    """A 1 x len(values) mask holding ``values`` as stored (uint8 -> L, uint16 -> I;16, float32 -> F)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array([values], dtype=dtype)).save(path)
    return path


def pair(root: Path, stem: str, values: list, dtype=np.uint8) -> None:
    grey_image(root / "images" / f"{stem}.png", len(values))
    mask_file(root / "masks" / f"{stem}.png", values, dtype)


def range_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ValueRangeWarning)]


def read_all(dataset: MaskFolderDataset) -> tuple[list[list[list[bool]]], list[str]]:
    """Every item's gt_original as lists, and the ValueRangeWarnings raised while reading them."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        masks = [dataset[i]["gt_original"].tolist() for i in range(len(dataset))]
    return masks, range_warnings(record)


# ---------------------------------------------------------------- masks


def test_zero_one_mask_is_foreground_at_one(tmp_path: Path) -> None:
    # {0, 1}: no value above 127, so foreground = value > 0 -> [F, T, T, F]. Today: all background.
    pair(tmp_path, "x", [0, 1, 1, 0])
    masks, warned = read_all(MaskFolderDataset(tmp_path, img_size=4))
    assert masks == [[[False, True, True, False]]]
    assert warned == []  # {0, 1} is a usual binary mask


def test_zero_255_and_zero_one_masks_in_one_dataset_read_alike(tmp_path: Path) -> None:
    # a: {0, 255} (> 127) and b: {0, 1} (> 0), same pattern -> both [T, F, F, T], and no warning:
    # both conventions are usual (a merged dataset often has both). Today b is all background.
    pair(tmp_path, "a", [255, 0, 0, 255])
    pair(tmp_path, "b", [1, 0, 0, 1])
    masks, warned = read_all(MaskFolderDataset(tmp_path, img_size=4))
    assert masks == [[[True, False, False, True]], [[True, False, False, True]]]
    assert warned == []


def test_zero_seven_mask_is_foreground_at_seven_and_warned(tmp_path: Path) -> None:
    # {0, 7}: 7 <= 127, so foreground = value > 0 -> [T, F, T]; a {0, v} with v not 1 or 255 is unusual.
    pair(tmp_path, "x", [7, 0, 7])
    masks, warned = read_all(MaskFolderDataset(tmp_path, img_size=4))
    assert masks == [[[True, False, True]]]
    assert len(warned) == 1 and "{0, 7}" in warned[0] and "value > 0" in warned[0]


def test_sixteen_bit_masks(tmp_path: Path) -> None:
    # I;16 {0, 1} -> value > 0: [F, T, F]  (today Pillow's L conversion clips 1 -> 1 <= 127: background);
    # I;16 {0, 65535} -> value > 32767: [T, F, T]; I;16 {0, 30000, 40000} -> > 32767: [F, F, T].
    assert read_mask(mask_file(tmp_path / "a.png", [0, 1, 0], np.uint16)).tolist() == [[False, True, False]]
    assert read_mask(mask_file(tmp_path / "b.png", [65535, 0, 65535], np.uint16)).tolist() == [
        [True, False, True]
    ]
    with pytest.warns(ValueRangeWarning, match="more than one non-zero value.*value > 32767"):
        soft = read_mask(mask_file(tmp_path / "c.png", [0, 30000, 40000], np.uint16))
    assert soft.tolist() == [[False, False, True]]


def test_soft_or_jpeg_mask_is_cut_at_127_and_warned(tmp_path: Path) -> None:
    # {0, 3, 127, 128, 250, 255}: max 255 > 127, so foreground = value > 127 -> [F, F, F, T, T, T],
    # as before; new: several non-zero values are reported (JPEG artefacts, soft edges).
    pair(tmp_path, "x", [0, 3, 127, 128, 250, 255])
    masks, warned = read_all(MaskFolderDataset(tmp_path, img_size=4))
    assert masks == [[[False, False, False, True, True, True]]]
    assert len(warned) == 1 and "more than one non-zero value" in warned[0] and "value > 127" in warned[0]


def test_label_mask_is_foreground_at_every_label(tmp_path: Path) -> None:
    # {0, 1, 2}: nothing above 127, so foreground = value > 0 -> [F, T, T, F] (like a palette mask).
    pair(tmp_path, "x", [0, 1, 2, 0])
    masks, warned = read_all(MaskFolderDataset(tmp_path, img_size=4))
    assert masks == [[[False, True, True, False]]]
    assert len(warned) == 1 and "more than one non-zero value" in warned[0]


def test_float_masks(tmp_path: Path) -> None:
    # F in [0, 1]: {0, 0.25, 0.75, 1} -> > 0.5: [F, F, T, T]; F {0, 0.3}: nothing above 0.5 -> > 0: [F, T].
    # Today Pillow converts F to L by truncation (0.75 -> 0, 1.0 -> 1): all background.
    with pytest.warns(ValueRangeWarning, match=r"float values.*value > 0\.5"):
        soft = read_mask(mask_file(tmp_path / "a.tif", [0.0, 0.25, 0.75, 1.0], np.float32))
    assert soft.tolist() == [[False, False, True, True]]
    with pytest.warns(ValueRangeWarning, match="float values"):
        assert read_mask(mask_file(tmp_path / "b.tif", [0.0, 0.3], np.float32)).tolist() == [[False, True]]
    # nothing above the half: foreground is above 0 (README), so a negative value is background
    with pytest.warns(ValueRangeWarning, match="float values"):
        negative = read_mask(mask_file(tmp_path / "c.tif", [-1.0, 0.0, 0.3], np.float32))
    assert negative.tolist() == [[False, False, True]]


def test_one_warning_per_dataset_root_for_masks(tmp_path: Path) -> None:
    # Two unusual masks ({0, 7} and {0, 3}), read twice: exactly one warning, naming the root, the first
    # file ({0, 7} in a.png; items are read in stem order) and what was unusual.
    root = tmp_path / "ds"
    pair(root, "a", [7, 0])
    pair(root, "b", [0, 3])
    pair(root, "c", [0, 255])
    dataset = MaskFolderDataset(root, img_size=4)
    masks, warned = read_all(dataset)
    assert masks == [[[True, False]], [[False, True]], [[False, True]]]
    _, again = read_all(dataset)
    assert len(warned) == 1 and again == []
    assert f"Dataset root {root}:" in warned[0] and str(root / "masks" / "a.png") in warned[0]
    assert "values in {0, 7}" in warned[0]


def test_each_root_of_a_dataset_gets_its_own_warning(tmp_path: Path) -> None:
    pair(tmp_path / "one", "a", [7, 0])
    pair(tmp_path / "one", "b", [0, 9])
    pair(tmp_path / "two", "c", [0, 1, 2])
    _, warned = read_all(MaskFolderDataset([tmp_path / "one", tmp_path / "two"], img_size=4))
    assert len(warned) == 2
    assert (
        f"Dataset root {tmp_path / 'one'}:" in warned[0] and f"Dataset root {tmp_path / 'two'}:" in warned[1]
    )


# ---------------------------------------------------------------- images


def test_sixteen_bit_grey_png_is_scaled_by_65535(tmp_path: Path) -> None:
    # I;16 [0, 16384, 32768, 49152, 65535] / 65535 = [0, 0.250004, 0.500008, 0.750011, 1] on all three
    # channels (16384 / 65535 = 0.2500038147). Today Pillow clips to 8 bits: [0, 1, 1, 1, 1].
    path = mask_file(tmp_path / "g.png", [0, 16384, 32768, 49152, 65535], np.uint16)
    assert Image.open(path).mode == "I;16"
    image = read_image(path)
    expected = torch.tensor([0.0, 0.2500038147, 0.5000076294, 0.7500114441, 1.0])
    assert image.shape == (3, 1, 5) and image.dtype == torch.float32
    for channel in image:
        torch.testing.assert_close(channel[0], expected, atol=1e-4, rtol=0)
    # Relative values kept: 49152 / 16384 = 3 and 32768 / 16384 = 2.
    assert abs(image[0, 0, 3] / image[0, 0, 1] - 3) < 1e-4 and abs(image[0, 0, 2] / image[0, 0, 1] - 2) < 1e-4
    # float64 is exact: 16384 / 65535 computed in double precision.
    assert read_image(path, torch.float64)[1, 0, 1].item() == 16384 / 65535


def test_sixteen_bit_image_in_a_dataset_and_a_twelve_bit_one_is_warned(tmp_path: Path) -> None:
    # A 12-bit image in a 16-bit file: [0, 4095] / 65535 = [0, 0.0624857], dark, as img_as_float reads it,
    # and warned once. Today: [0, 1] (4095 clipped to 255).
    mask_file(tmp_path / "images" / "x.png", [0, 4095], np.uint16)
    mask_file(tmp_path / "masks" / "x.png", [0, 255])
    with pytest.warns(ValueRangeWarning, match=r"Dataset root .*unusual image values.*up to 4095"):
        item = MaskFolderDataset(tmp_path, img_size=4, resize_mode="stretch")[0]
    assert item["original_size"].tolist() == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ValueRangeWarning)
        image = read_image(tmp_path / "images" / "x.png")
    torch.testing.assert_close(image[:, 0], torch.tensor([[0.0, 0.0624857]] * 3), atol=1e-6, rtol=0)


def test_float32_tiff_in_zero_one_is_read_as_is(tmp_path: Path) -> None:
    # F [0, 0.25, 0.5, 1] is already in [0, 1]: read as it is. Today: Pillow's F -> RGB truncates to
    # [0, 0, 0, 1] / 255.
    path = mask_file(tmp_path / "f.tif", [0.0, 0.25, 0.5, 1.0], np.float32)
    assert Image.open(path).mode == "F"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValueRangeWarning)  # nothing unusual
        image = read_image(path)
    torch.testing.assert_close(image, torch.tensor([[[0.0, 0.25, 0.5, 1.0]]] * 3))


def test_float32_tiff_outside_zero_one_is_mapped_by_its_own_range(tmp_path: Path) -> None:
    # F [-1, 0, 1, 3]: min -1, max 3 -> (v + 1) / 4 = [0, 0.25, 0.5, 1], and a warning naming the range.
    path = mask_file(tmp_path / "f.tif", [-1.0, 0.0, 1.0, 3.0], np.float32)
    with pytest.warns(ValueRangeWarning, match=r"float values from -1\.0 to 3\.0.*mapped"):
        image = read_image(path)
    torch.testing.assert_close(image, torch.tensor([[[0.0, 0.25, 0.5, 1.0]]] * 3))


def test_float_image_with_nan_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = mask_file(tmp_path / "nan.tif", [0.0, float("nan"), 1.0], np.float32)
    with pytest.raises(DataError, match=r"nan.tif: 1 pixel\(s\) are NaN or infinite"):
        read_image(path)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "1"])
def test_eight_bit_images_read_as_before(tmp_path: Path, mode: str) -> None:
    # Regression guard (passes before and after): 8-bit files are Pillow's RGB conversion / 255.
    rgb = np.array([[[0, 10, 200], [255, 128, 7], [30, 60, 90]]], dtype=np.uint8)
    path = tmp_path / f"x_{mode}.png"
    Image.fromarray(rgb).convert(mode).save(path)
    expected = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1) / 255
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValueRangeWarning)
        assert torch.equal(read_image(path), expected.float())


def write_rgb16_tiff(path: Path, array: np.ndarray) -> Path:
    """A baseline uncompressed 16-bit RGB TIFF (Pillow cannot write one)."""
    height, width, _ = array.shape
    data = array.astype("<u2").tobytes()
    ifd, n_tags = 14, 9
    start = ifd + 2 + n_tags * 12 + 4
    tags = [  # tag, type (3 short, 4 long), count, value or offset
        (256, 3, 1, width),
        (257, 3, 1, height),
        (258, 3, 3, 8),  # BitsPerSample 16, 16, 16 stored at offset 8
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, start),
        (277, 3, 1, 3),
        (278, 3, 1, height),
        (279, 4, 1, len(data)),
    ]
    out = b"II*\x00" + struct.pack("<I", ifd) + struct.pack("<3H", 16, 16, 16) + struct.pack("<H", n_tags)
    for tag, kind, count, value in tags:
        packed = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    path.write_bytes(out + struct.pack("<I", 0) + data)
    return path


RGB16 = np.array([[[0, 256, 65535], [4660, 32768, 65280]]], dtype=np.uint16)


def test_sixteen_bit_rgb_tiff_without_tifffile_keeps_its_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression guard for the fallback: without tifffile Pillow keeps the high byte, value // 256:
    # 256 -> 1, 4660 = 0x1234 -> 0x12 = 18, 32768 -> 128, 65280 = 0xFF00 -> 255; then / 255. That is the
    # 16-bit scale at 8-bit precision (18 / 255 = 0.0706 vs 4660 / 65535 = 0.0711), not a clip.
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import fails as if not installed
    image = read_image(write_rgb16_tiff(tmp_path / "rgb16.tif", RGB16))
    expected = torch.tensor([[[0, 18]], [[1, 128]], [[255, 255]]]) / 255
    assert image.shape == (3, 1, 2) and torch.equal(image, expected.float())


def test_sixteen_bit_rgb_tiff_at_full_precision_with_tifffile(tmp_path: Path) -> None:
    import tifffile  # noqa: F401  (the test extra installs it: missing fails, not skips)

    # 4660 / 65535 = 0.0711070, 256 / 65535 = 0.0039063, 65280 / 65535 = 0.9961089.
    image = read_image(write_rgb16_tiff(tmp_path / "rgb16.tif", RGB16), torch.float64)
    assert image[:, 0, 0].tolist() == [0.0, 256 / 65535, 1.0]
    torch.testing.assert_close(
        image[:, 0, 1],
        torch.tensor([0.0711070, 0.5000076, 0.9961089], dtype=torch.float64),
        atol=1e-7,
        rtol=0,
    )
