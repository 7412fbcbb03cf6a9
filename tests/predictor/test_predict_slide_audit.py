"""``samflow predict-slide`` and its inputs: a slide or annotation file that cannot be used is one line
before any tile runs, and no output replaces an input or another slide's output."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tiffslide")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "wsi"))

from synthetic_slide import write_geojson, write_slide

from samflow.cli import main
from samflow.data.wsi.slide import SlideError
from samflow.module import SamflowModule, SamSpec
from samflow.wsi_predict import predict_slide
from samflow_plugins.wsi_sam import WSISam

OPTIONS = {"mpp": 1.0, "tile": 128, "overlap": 32, "progress": False}
TINY = ["--experiment", "wsi_sam_camelyon16", "--model.sam.variant", "tiny", "--model.sam.checkpoint", "null"]


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return SamflowModule(sam=SamSpec(variant="tiny"), plugins={"wsi": WSISam()}, losses={}).eval()


@pytest.fixture
def folder(tmp_path) -> Path:
    write_slide(tmp_path)
    write_geojson(tmp_path)  # slide.geojson, the name of predict-slide's own GeoJSON of slide.tif
    return tmp_path


def test_the_annotations_are_never_replaced_by_the_prediction(module, folder):
    """``--out`` the slide's folder: ``slide.geojson`` is the ground truth, and writing the prediction
    there would replace it before Dice reads it (Dice 1 against itself). Refused, nothing written."""
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SlideError, match=r"slide\.geojson is the input .*slide\.geojson"):
        predict_slide(module, folder / "slide.tif", folder, annotations=folder / "slide.geojson", **OPTIONS)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # a GeoJSON annotation named <slide>.json would be replaced by the Dice file
    shutil.move(folder / "slide.geojson", folder / "slide.json")
    with pytest.raises(SlideError, match=r"slide\.json is the input"):
        predict_slide(module, folder / "slide.tif", folder, annotations=folder / "slide.json", **OPTIONS)


def test_a_bad_annotation_file_stops_before_any_tile(module, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    (folder / "bad.geojson").write_text("{not json")
    calls = []
    forward = module.forward
    module.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        for bad in (folder / "bad.geojson", folder / "missing.xml"):
            with pytest.raises(SlideError, match=bad.name):
                predict_slide(module, folder / "slide.tif", out, annotations=bad, **OPTIONS)
    finally:
        del module.forward
    assert calls == [] and list(out.iterdir()) == []


def test_two_slides_with_one_stem_are_refused(folder, tmp_path, capsys, monkeypatch):
    """``a/slide.tif`` and ``b/slide.tif`` would write one ``slide_mask.tif``: refused before the model
    is built, naming both; so is a missing slide (one line, not a traceback)."""
    monkeypatch.setattr(sys, "argv", ["samflow"])
    other = tmp_path / "b"
    other.mkdir()
    shutil.copy(folder / "slide.tif", other / "slide.tif")
    out = tmp_path / "out"
    args = ["predict-slide", str(folder / "slide.tif"), str(other / "slide.tif"), *TINY, "--out", str(out)]
    assert main([*args, "--tile", "128", "--overlap", "32"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder / "slide.tif") in err and str(other / "slide.tif") in err, err
    assert not out.exists()
    bad = tmp_path / "bad.xml"
    bad.write_text("<ASAP_Annotations")
    shutil.move(other / "slide.tif", other / "slide2.tif")
    slides = [str(folder / "slide.tif"), str(other / "slide2.tif")]
    args = ["predict-slide", *slides, "--annotations", str(folder / "slide.geojson"), str(bad)]
    assert main([*args, *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: not a readable" in err, err
    assert not out.exists()
    missing = tmp_path / "nowhere.tif"
    assert main(["predict-slide", str(missing), *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"samflow: error: {missing}: no such slide file.\n"
    assert not out.exists()


def test_outputs_of_an_earlier_run_are_refused_unless_overwrite(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["samflow"])
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "slide_mask.tif"
    earlier.write_bytes(b"an earlier run's mask")
    args = [
        "predict-slide",
        str(folder / "slide.tif"),
        *TINY,
        "--out",
        str(out),
        "--tile",
        "128",
        "--overlap",
        "32",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{earlier} exist(s) already; pass --overwrite" in err, err
    assert earlier.read_bytes() == b"an earlier run's mask" and sorted(out.iterdir()) == [earlier]
    assert main([*args, "--overwrite"]) == 0
    assert earlier.read_bytes()[:2] in (b"II", b"MM")  # replaced by the TIFF mask
    assert (out / "slide.geojson").is_file()
