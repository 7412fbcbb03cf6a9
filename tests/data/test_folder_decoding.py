"""How ``MaskFolderDataset`` reads an image: as uint8 codes only for segment-anything's resize at float32 /
float64, as floats otherwise, and only its header when items carry no pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from samflow.data import MaskFolderDataset
from samflow.data import folder as folder_module


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool | None]]:
    """Every image read by the dataset: ("pixels", codes) or ("header", None)."""
    calls: list[tuple[str, bool | None]] = []
    read_image, header_size = folder_module.read_image_with_note, folder_module.header_size

    def recorded_read(path: Path, dtype: torch.dtype, codes: bool = False) -> Any:
        calls.append(("pixels", codes))
        return read_image(path, dtype, codes=codes)

    def recorded_header(path: Path) -> tuple[int, int]:
        calls.append(("header", None))
        return header_size(path)

    monkeypatch.setattr(folder_module, "read_image_with_note", recorded_read)
    monkeypatch.setattr(folder_module, "header_size", recorded_header)
    return calls


@pytest.mark.parametrize(
    ("dtype", "image_resize", "codes"),
    [
        (torch.float32, "sam", True),
        (torch.float64, "sam", True),
        (torch.bfloat16, "sam", False),  # k / 255 is not exact in bfloat16
        (torch.float32, "bilinear", False),
    ],
)
def test_pixels_are_read_as_codes_only_for_sams_resize_at_float32_or_64(
    pair_root: Path, reads: list, dtype: torch.dtype, image_resize: str, codes: bool
) -> None:
    dataset = MaskFolderDataset(pair_root, img_size=16, image_resize=image_resize, dtype=dtype)
    item = dataset[0]
    assert reads == [("pixels", codes)]
    assert item["image"].dtype == dtype and "pixels" not in item


@pytest.mark.parametrize("image_resize", ["sam", "bilinear"])
def test_without_pixels_only_the_header_is_read(pair_root: Path, reads: list, image_resize: str) -> None:
    dataset = MaskFolderDataset(pair_root, img_size=16, image_resize=image_resize)
    dataset.pixels = False
    item = dataset[0]
    assert reads == [("header", None)]
    assert item["pixels"] is False and item["original_size"].tolist() == [12, 16]
    assert item["image"].shape == (3, 16, 16) and item["input_size"].tolist() == [12, 16]
