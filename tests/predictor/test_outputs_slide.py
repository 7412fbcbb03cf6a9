"""``samflow predict-slide``: its outputs never collide, never outlive the run that wrote them, and an
interrupted slide leaves no file that looks finished.

| case                                                     | result                                  |
|---|---|
| ``--out`` an existing file                               | exit 1, one line, before the model      |
| ``slide.tif`` and ``SLIDE.tif`` (case-insensitive disk)  | exit 1, one line naming both            |
| ``--overwrite`` without annotations after a run with them | the earlier ``<slide>.json`` Dice removed |
| a crash while the outputs are written                    | no ``<slide>_mask.tif``, no scratch file |
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tiffslide")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "wsi"))

from synthetic_slide import write_geojson, write_slide

import samflow.wsi_predict
from samflow.cli import main
from samflow.module import SamflowModule, SamSpec
from samflow.wsi_predict import predict_slide
from samflow_plugins.wsi_sam import WSISam

TINY = ["--experiment", "wsi_sam_camelyon16", "--model.sam.variant", "tiny", "--model.sam.checkpoint", "null"]
SMALL = ["--tile", "128", "--overlap", "32"]


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(sys, "argv", ["samflow"])
    write_slide(tmp_path)
    write_geojson(tmp_path)
    return tmp_path


def test_an_out_that_is_a_file_is_one_line(folder, capsys):
    out = folder / "taken"
    out.write_text("a file")
    assert main(["predict-slide", str(folder / "slide.tif"), *TINY, "--out", str(out), *SMALL]) == 1
    err = capsys.readouterr().err
    assert err == f"samflow: error: predict-slide: --out {out} is a file, not a folder; choose a folder.\n"
    assert out.read_text() == "a file"


def test_slide_names_that_differ_only_in_case_are_refused(folder, capsys):
    (folder / "b").mkdir()
    shutil.copy(folder / "slide.tif", folder / "b" / "SLIDE.tif")
    out = folder / "out"
    slides = [str(folder / "slide.tif"), str(folder / "b" / "SLIDE.tif")]
    assert main(["predict-slide", *slides, *TINY, "--out", str(out), *SMALL]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and slides[0] in err and slides[1] in err, err
    assert not out.exists()


def test_overwrite_without_annotations_removes_the_earlier_dice(folder):
    out = folder / "out"
    args = ["predict-slide", str(folder / "slide.tif"), *TINY, "--out", str(out), *SMALL]
    assert main([*args, "--annotations", str(folder / "slide.geojson")]) == 0
    assert (out / "slide.json").is_file()
    assert main([*args, "--overwrite"]) == 0
    # the run's record (samflow_slides.json) and this run's files, no Dice
    assert sorted(p.name for p in out.iterdir()) == ["samflow_slides.json", "slide.geojson", "slide_mask.tif"]


def test_a_crash_while_writing_leaves_no_output_that_looks_finished(folder, monkeypatch):
    torch.manual_seed(0)
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"wsi": WSISam()}, losses={}).eval()

    def broken(region):
        raise RuntimeError("killed while tracing the polygons")

    monkeypatch.setattr(samflow.wsi_predict, "feature_collection", broken)
    out = folder / "out"
    with pytest.raises(RuntimeError, match="killed"):
        predict_slide(module, folder / "slide.tif", out, mpp=1.0, tile=128, overlap=32, progress=False)
    assert list(out.iterdir()) == []
