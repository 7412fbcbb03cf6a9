"""The procedural quickstart dataset: deterministic, idempotent, readable by the folder reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from samflow.data import DataError, MaskFolderDataset, make_quickstart_data

SMALL = {"n_train": 6, "n_val": 3}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = _files(make_quickstart_data(tmp_path / "a", **SMALL, seed=1))
    b = _files(make_quickstart_data(tmp_path / "b", **SMALL, seed=1))
    c = _files(make_quickstart_data(tmp_path / "c", **SMALL, seed=2))
    assert len(a) == 2 * (6 + 3) and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if "/images/" in k)


def test_layout_sizes_and_objects(tmp_path: Path) -> None:
    root = make_quickstart_data(tmp_path, **SMALL, size=(96, 160))
    dataset = MaskFolderDataset(root / "train", img_size=128)
    assert len(dataset) == 6 and len(MaskFolderDataset(root / "val", img_size=128)) == 3
    shapes = set()
    for i in range(len(dataset)):
        item = dataset[i]
        h, w = item["original_size"].tolist()
        assert 96 <= h <= 160 and 96 <= w <= 160
        shapes.add((h, w))
        fraction = item["gt_original"].float().mean()
        assert 0.01 < fraction < 0.5  # one or two objects, neither empty nor the whole image
    assert len(shapes) > 1  # sizes vary, so original-size handling is exercised


def test_idempotent_and_regenerated_when_parameters_change(tmp_path: Path) -> None:
    make_quickstart_data(tmp_path, **SMALL)
    image = tmp_path / "train" / "images" / "train_0000.png"
    stamp = image.stat().st_mtime_ns
    make_quickstart_data(tmp_path, **SMALL)
    assert image.stat().st_mtime_ns == stamp
    make_quickstart_data(tmp_path, n_train=2, n_val=1)
    assert len(list((tmp_path / "train" / "images").iterdir())) == 2
    assert json.loads((tmp_path / "quickstart.json").read_text())["n_train"] == 2


def test_refuses_to_overwrite_folders_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="not quickstart data"):
        make_quickstart_data(tmp_path, **SMALL)
