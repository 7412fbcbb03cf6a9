"""A file that cannot be read is one ``DataError`` naming it, whether its pixels or only its header are read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from samflow.data import DataError, MaskFolderDataset, read_image, read_mask
from samflow.data.reading import header_size

READERS: dict[str, Callable[[Path], object]] = {
    "header": header_size,
    "image": read_image,
    "mask": read_mask,
}


def _expect(path: Path, reader: Callable[[Path], object], cause: type[Exception]) -> None:
    with pytest.raises(DataError) as info:
        reader(path)
    assert isinstance(info.value.__cause__, cause)
    sentence = f"{path}: cannot read the file ({info.value.__cause__}). Replace it or remove the pair."
    assert str(info.value) == sentence


@pytest.mark.parametrize("reader", READERS)
def test_a_file_that_is_not_an_image(tmp_path: Path, reader: str) -> None:
    path = tmp_path / "c.png"
    path.write_bytes(b"this is not a png")
    _expect(path, READERS[reader], OSError)  # PIL.UnidentifiedImageError


@pytest.mark.parametrize("reader", READERS)
def test_a_decompression_bomb(
    tmp_path: Path, pngs: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    path = pngs.image(tmp_path / "big.png", 12, 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # 192 pixels > 2 x 16: an error, not a warning
    _expect(path, READERS[reader], Image.DecompressionBombError)


def test_a_truncated_file_fails_when_decoded_not_when_its_header_is_read(
    tmp_path: Path, pngs: SimpleNamespace
) -> None:
    path = pngs.image(tmp_path / "cut.png", 12, 16)
    path.write_bytes(path.read_bytes()[:-30])  # the header is whole, the pixel data is cut
    assert header_size(path) == (12, 16)
    _expect(path, READERS["image"], OSError)


def test_the_dataset_without_pixels_names_the_file(pair_root: Path) -> None:
    (pair_root / "images" / "c.png").write_bytes(b"this is not a png")
    dataset = MaskFolderDataset(pair_root, img_size=16)
    dataset.pixels = False  # as when an embedding store replaces the encoder: headers only
    assert dataset[0]["original_size"].tolist() == [12, 16]
    with pytest.raises(DataError, match="images/c.png: cannot read the file"):
        dataset[2]
