"""Annotations in other units than the slide's level-0 pixels are caught against the slide's bounds.

An annotation wholly outside the slide (768 x 512 px here) is refused in one line naming the file,
the annotation, its bounds, the slide's and the units expected; one reaching far (more than 10% of
the slide's side) past an edge is warned about; a small overshoot and an outline around the whole
slide pass silently. The check runs where a slide's size is known: ``SlidePatches`` and
``samflow predict-slide`` (before any model is built).
"""

from __future__ import annotations

import json
import re
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("tiffslide")
pytest.importorskip("shapely")

from synthetic_slide import write_slide

from samflow.data.wsi import SlideError, SlidePatches, load_annotations
from samflow.data.wsi.annotations import check_in_slide

SIZE = (768, 512)  # the synthetic slide's level-0 width, height
SLIDE = "the slide's level-0 bounds are (0, 0, 768, 512)"
HINT = "annotations must be in level-0 pixel coordinates"


def square(x0: float, y0: float, x1: float, y1: float) -> dict:
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def geojson(tmp_path, *geometries: dict, ids: tuple = ()) -> object:
    features = []
    for i, geometry in enumerate(geometries):
        feature = {
            "type": "Feature",
            "geometry": geometry,
            "properties": {"classification": {"name": "Tumor"}},
        }
        if i < len(ids) and ids[i] is not None:
            feature["id"] = ids[i]
        features.append(feature)
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("slide"))[0]


def test_an_annotation_wholly_outside_is_refused_in_one_line(tmp_path):
    path = geojson(tmp_path, square(10, 10, 50, 50), square(1000, 600, 1100, 700), ids=(None, "t7"))
    assert load_annotations(path).area == 40 * 40 + 100 * 100  # without the slide's size: unchecked
    with pytest.raises(SlideError) as err:
        load_annotations(path, slide_size=SIZE)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: annotation 1 ('t7') lies wholly outside the slide")
    assert f"its bounds are (1000, 600, 1100, 700), {SLIDE}; {HINT}" in message


def test_an_asap_annotation_outside_is_named_by_its_name(tmp_path):
    coords = "".join(
        f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>'
        for i, (x, y) in enumerate([(0, 900), (50, 900), (50, 950)])
    )
    path = tmp_path / "slide.xml"
    path.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0">'
        f"<Coordinates>{coords}</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    with pytest.raises(SlideError, match=re.escape("annotation 0 ('Annotation 0') lies wholly outside")):
        load_annotations(path, slide_size=SIZE)


def test_an_outline_touching_the_slide_only_along_an_edge_is_outside(tmp_path):
    path = geojson(tmp_path, square(768, 0, 900, 100))  # shares the edge x = 768, no area inside
    with pytest.raises(SlideError, match=re.escape("annotation 0 lies wholly outside the slide")):
        load_annotations(path, slide_size=SIZE)


def test_an_annotation_far_beyond_the_slide_is_warned_about_and_kept(tmp_path):
    # x1 = 900 is 132 px past the edge, more than 10% of 768 (76.8); the other is inside
    path = geojson(tmp_path, square(10, 10, 50, 50), square(700, 400, 900, 480), square(700, 0, 1000, 100))
    with pytest.warns(UserWarning) as record:
        region = load_annotations(path, slide_size=SIZE)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(f"{path}: annotation 1 (and 1 more) reaches far beyond the slide")
    assert f"its bounds are (700, 400, 900, 480), {SLIDE}; only the part inside is used; {HINT}" in message
    assert region.area == 40 * 40 + 200 * 80 + 300 * 100


@pytest.mark.parametrize(
    "geometry",
    [
        square(700, 400, 840, 500),  # 72 px past the right edge: under 10% of 768
        square(-10, -10, 800, 600),  # around the whole slide: "all of it"
        square(0, 0, 768, 512),
    ],
)
def test_small_overshoots_and_whole_slide_outlines_pass_silently(tmp_path, geometry):
    path = geojson(tmp_path, geometry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_annotations(path, slide_size=SIZE)


def test_a_label_image_outside_the_slide_is_refused(tmp_path):
    from PIL import Image

    label = np.zeros((100, 100), dtype=np.uint8)
    label[60:70, 60:70] = 1  # at label_downsample 16: level-0 (960, 960) - (1120, 1120)
    path = tmp_path / "labels.png"
    Image.fromarray(label).save(path)
    with pytest.raises(
        SlideError,
        match=re.escape(
            "the label image lies wholly outside the slide: its bounds are (960, 960, 1120, 1120)"
        ),
    ):
        load_annotations(path, label_downsample=16, slide_size=SIZE)
    assert load_annotations(path, label_downsample=4, slide_size=SIZE).bounds == (240, 240, 280, 280)


def test_check_in_slide_warns_once_per_file(tmp_path):
    import shapely

    named = [(f"annotation {i}", shapely.box(0, 0, 1000 + i, 100)) for i in range(5)]
    with pytest.warns(UserWarning, match=r"annotation 0 \(and 4 more\) reaches far beyond") as record:
        check_in_slide(tmp_path / "a.geojson", named, SIZE)
    assert len(record) == 1


def test_slide_patches_refuse_annotations_outside_their_slide(slide, tmp_path):
    # coordinates of a scan at 4 times the resolution: the second object lands outside
    path = geojson(tmp_path, square(160 * 4, 120 * 4, 300 * 4, 260 * 4), square(1320, 1200, 1840, 1760))
    with pytest.raises(SlideError, match=re.escape(f"{path}: annotation 1 lies wholly outside the slide")):
        SlidePatches([slide], [path], patch_size=32, img_size=32)


def test_predict_slide_refuses_them_before_building_a_model(slide, tmp_path, monkeypatch, capsys):
    from samflow.cli import main

    monkeypatch.setattr(sys, "argv", ["samflow"])
    path = geojson(tmp_path, square(2000, 2000, 2100, 2100))
    args = ["predict-slide", str(slide), "--experiment", "no_such_experiment", "--out", str(tmp_path / "out")]
    assert main([*args, "--annotations", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        f"{path}: annotation 0 lies wholly outside the slide: its bounds are (2000, 2000, 2100, 2100)" in err
    )
