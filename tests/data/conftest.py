"""Helpers for the data tests: tiny PNG image / mask folders written into tmp_path."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, height: int, width: int, value: int = 100) -> Path:
    """Write a constant RGB image (height, width) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, height: int, width: int, box: tuple[int, int, int, int] | None = None) -> Path:
    """Write a grayscale mask, 255 inside the inclusive box (x1, y1, x2, y2), 0 elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((height, width), dtype=np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        array[y1 : y2 + 1, x1 : x2 + 1] = 255
    Image.fromarray(array).save(path)
    return path


def write_pairs(
    root: Path,
    stems: list[str],
    height: int = 12,
    width: int = 16,
    box: tuple[int, int, int, int] = (2, 3, 6, 7),
) -> Path:
    """Write root/images/<stem>.png and root/masks/<stem>.png for every stem."""
    for stem in stems:
        write_image(root / "images" / f"{stem}.png", height, width)
        write_mask(root / "masks" / f"{stem}.png", height, width, box)
    return root


@pytest.fixture
def pair_root(tmp_path: Path) -> Path:
    """A root with three 12x16 pairs whose mask is the box (2, 3, 6, 7)."""
    return write_pairs(tmp_path / "ds", ["a", "b", "c"])


@pytest.fixture
def pngs() -> SimpleNamespace:
    """The writers above, as ``pngs.image``, ``pngs.mask`` and ``pngs.pairs``."""
    return SimpleNamespace(image=write_image, mask=write_mask, pairs=write_pairs)
