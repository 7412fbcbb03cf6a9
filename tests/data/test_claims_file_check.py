"""README, "A real dataset": the file check's numbers, as the README states them.

- ``on_bad_sample: error`` stops with one line listing up to 10 bad files (path and reason) and their
  count: 12 bad files name 10, and the count says 12;
- a progress bar (and the time log) on process 0 above 500 files: none at exactly 500 files;
- other formats than PNG and JPEG (BMP, TIFF, WebP, GIF) are decoded in full: a truncated one is found.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from samflow.data import DataError, SegmentationDataModule, bad_files


def test_a_bad_file_list_names_10_files_and_counts_them_all(tmp_path: Path, pngs: SimpleNamespace) -> None:
    root = pngs.pairs(tmp_path / "train", [f"good{i}" for i in range(3)])
    bad = [root / "images" / f"bad{i:02d}.png" for i in range(12)]
    for path in bad:
        path.write_bytes(b"")  # an empty image
        pngs.mask(root / "masks" / path.name, 12, 16)
    with pytest.raises(DataError) as info:
        SegmentationDataModule(train=str(root), img_size=32).setup("fit")
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith("data.train: 12 of 30 files cannot be used (12 of 15 samples;"), message
    named = [path for path in bad if re.search(rf"{re.escape(str(path))} \(", message)]
    assert len(named) == 10, message  # up to 10 listed ...
    assert "2 more" in message, message  # ... and the rest counted


@pytest.mark.parametrize(("pairs", "logged"), [(250, False), (251, True)])
def test_the_check_is_logged_with_its_time_above_500_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pngs: SimpleNamespace, pairs: int, logged: bool
) -> None:
    root = pngs.pairs(tmp_path / "train", [f"{i:04d}" for i in range(pairs)], height=4, width=4)
    infos: list[str] = []
    monkeypatch.setattr(bad_files, "rank_zero_info", infos.append)
    SegmentationDataModule(train=str(root), img_size=32).setup("fit")
    checked = [line for line in infos if "checked" in line]
    assert bool(checked) is logged, (pairs, infos)
    if logged:
        assert checked[0].startswith(f"data.train: checked {2 * pairs} files in"), checked


@pytest.mark.parametrize(
    ("fmt", "folder"), [("BMP", "images"), ("TIFF", "images"), ("WEBP", "images"), ("GIF", "masks")]
)
def test_a_truncated_file_of_the_other_formats_is_found_by_the_check(
    tmp_path: Path, pngs: SimpleNamespace, fmt: str, folder: str
) -> None:
    """BMP, TIFF, WebP and GIF (a mask format only) are decoded in full by the check: a truncated one
    stops ``setup``, named."""
    root = pngs.pairs(tmp_path / "train", ["a", "b"])
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture if folder == "images" else picture[..., 0]).save(buffer, fmt)
    data = buffer.getvalue()
    bad = root / folder / f"cut.{fmt.lower()}"
    bad.write_bytes(data[: len(data) // 2])
    if folder == "images":
        pngs.mask(root / "masks" / "cut.png", 48, 64)
    else:
        pngs.image(root / "images" / "cut.png", 48, 64)
    with pytest.raises(DataError) as info:
        SegmentationDataModule(train=str(root), img_size=32).setup("fit")
    assert str(info.value).startswith("data.train: 1 of 6 files cannot be used"), info.value
    assert f"{bad} (" in str(info.value)
