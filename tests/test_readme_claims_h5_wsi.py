"""README "Whole-slide images": ``samflow predict-slide``'s tiles overlap by ``--overlap``, at most half a
tile. An overlap outside [0, tile/2] is refused in one line before anything is read, built or removed
(was: a traceback after the model was built, and with ``--overwrite`` after the earlier run's outputs
were deleted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("tiffslide")

from samflow.cli import main

_spec = importlib.util.spec_from_file_location(
    "synthetic_slide_h5", Path(__file__).parent / "wsi" / "synthetic_slide.py"
)
_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synthetic)
write_slide = _synthetic.write_slide


@pytest.mark.parametrize(("tile", "overlap"), [("128", "65"), ("128", "-1"), ("64", "40")])
def test_an_overlap_beyond_half_a_tile_is_one_line_and_keeps_the_earlier_outputs(
    tmp_path, capsys, monkeypatch, tile, overlap
):
    monkeypatch.setattr(sys, "argv", ["samflow"])
    slide, _ = write_slide(tmp_path)
    out = tmp_path / "preds"
    out.mkdir()
    earlier = [out / "slide_mask.tif", out / "slide.geojson", out / "slide.json"]
    for path in earlier:
        path.write_text("an earlier run's output")
    args = ["predict-slide", str(slide), "--experiment", "wsi_sam_camelyon16", "--model.sam.variant", "tiny"]
    args += [
        "--model.sam.checkpoint",
        "null",
        "--out",
        str(out),
        "--overwrite",
        "--tile",
        tile,
        "--overlap",
        overlap,
    ]
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overlap" in err[0] and f"[0, {int(tile) // 2}]" in err[0], err
    assert all(path.read_text() == "an earlier run's output" for path in earlier)
