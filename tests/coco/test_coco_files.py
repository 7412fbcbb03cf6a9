"""COCO images with an EXIF orientation are read upright, as annotation tools show them (a JSON with the
stored size is refused saying why, a 180-degree one warns), and ``CocoDataModule`` passes every
``CocoInstances`` option on, as options of its own."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from jsonargparse import ArgumentParser
from PIL import Image, ImageOps

from samflow.data import DataError
from samflow.data.coco import INSTANCE_OPTIONS, CocoDataModule, CocoInstances
from samflow.data.reading import OrientationWarning
from tests.coco.tiny_coco import make_tiny_coco


def _tag(path: Path, orientation: int) -> np.ndarray:
    """Give the image at ``path`` an EXIF orientation (pixels as stored); return it as a viewer shows it."""
    with Image.open(path) as img:
        img.load()
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif)
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img))


def _set_size(annotations: Path, image_id: int, height: int, width: int) -> None:
    """Give image ``image_id`` another size in the JSON, keeping only its polygons (RLEs hold a size)."""
    coco = json.loads(annotations.read_text())
    for image in coco["images"]:
        if image["id"] == image_id:
            image["height"], image["width"] = height, width
    keep = [
        a for a in coco["annotations"] if a["image_id"] != image_id or isinstance(a["segmentation"], list)
    ]
    coco["annotations"] = keep
    annotations.write_text(json.dumps(coco))


def test_a_sideways_image_whose_json_has_the_stored_size_is_refused_saying_why(tmp_path: Path) -> None:
    annotations, _ = make_tiny_coco(tmp_path)
    _tag(tmp_path / "images" / "im1.png", 6)  # stored 40 x 56 (H x W), the JSON says so too
    with pytest.raises(DataError, match=r"im1\.png is \(56, 40\) as read, upright: its EXIF orientation 6"):
        CocoInstances(annotations, img_size=64)[0]


def test_images_are_read_upright_and_the_orientation_is_told_once(tmp_path: Path) -> None:
    annotations, _ = make_tiny_coco(tmp_path)
    shown = _tag(tmp_path / "images" / "im1.png", 6)
    _set_size(annotations, 1, *shown.shape[:2])  # the JSON of a tool that showed the image upright
    _tag(tmp_path / "images" / "im3.png", 3)  # 36 x 36, turned 180 degrees: same size either way
    dataset = CocoInstances(annotations, img_size=64, resize_mode="stretch")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first, _ = dataset[0], dataset[1]
    told = [str(w.message) for w in record if issubclass(w.category, OrientationWarning)]
    assert len(told) == 1 and "im1.png, is turned 90 degrees clockwise (orientation 6)" in told[0]
    assert first["original_size"].tolist() == [56, 40]


def test_the_data_module_passes_every_instance_option_to_every_split(tmp_path: Path) -> None:
    annotations, _ = make_tiny_coco(tmp_path)
    split = {"annotations": str(annotations)}
    options = {
        "img_size": 64,
        "points": "annotation",
        "points_per_instance": 1,
        "point_key": "point",
        "seed": 3,
        "crowd": "keep",
        "empty": "keep",
        "resize_mode": "stretch",
        "image_resize": "bilinear",
    }
    assert set(options) == set(INSTANCE_OPTIONS)
    dm = CocoDataModule(train=split, val=split, **options)
    for name in ("train", "val"):
        dataset = dm.dataset(name)
        assert {key: getattr(dataset, key) for key in options} == options
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['pointz'\].*'points'"):
        CocoDataModule(train=split, pointz="qc")


def test_a_config_sees_the_instance_options_with_their_defaults_and_descriptions() -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(CocoDataModule, "data")
    actions = {a.dest.removeprefix("data."): a for a in parser._actions if a.dest.startswith("data.")}
    assert set(INSTANCE_OPTIONS) <= set(actions)
    assert {key: actions[key].default for key in ("img_size", "points", "seed", "resize_mode")} == {
        "img_size": 1024,
        "points": "qc",
        "seed": 0,
        "resize_mode": "longest",
    }
    assert all(actions[key].help for key in INSTANCE_OPTIONS)
