"""Annotation files beyond the synthetic slide's two polygons: holes, multipolygons, geometry
collections, QuPath's Exclusion class, and annotations without area (warned about, never silently
dropped or mistaken for tumour)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("shapely")

from samflow.data.wsi import SlideError, load_annotations, rasterize


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry: dict | None, name: str = "Tumor") -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": {"classification": {"name": name}}}


def geojson(tmp_path, *features: dict):
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return path


def test_polygon_hole_is_not_tumour(tmp_path):
    path = geojson(
        tmp_path, feature({"type": "Polygon", "coordinates": [square(0, 0, 40, 40), square(10, 10, 20, 20)]})
    )
    mask = rasterize(load_annotations(path), (0.0, 0.0), 1.0, 40)
    expected = np.ones((40, 40), dtype=bool)
    expected[10:20, 10:20] = False  # rows are y, columns x
    assert np.array_equal(mask, expected)


def test_multipolygon_keeps_every_part_in_level_0_coordinates(tmp_path):
    parts = [[square(0, 0, 10, 10)], [square(30, 20, 40, 25)]]
    region = load_annotations(geojson(tmp_path, feature({"type": "MultiPolygon", "coordinates": parts})))
    mask = rasterize(region, (0.0, 0.0), 2.0, 20)  # 2 level-0 px per pixel
    expected = np.zeros((20, 20), dtype=bool)
    expected[0:5, 0:5] = True
    expected[10:12, 15:20] = True  # y in [20, 25): centres 21, 23 (25 on the edge is out); x 31..39
    assert np.array_equal(mask, expected)


def test_geometry_collection_polygons_are_tumour(tmp_path):
    collection = {
        "type": "GeometryCollection",
        "geometries": [
            {"type": "Polygon", "coordinates": [square(0, 0, 10, 10)]},
            {"type": "LineString", "coordinates": [[0, 20], [30, 20]]},
        ],
    }
    assert load_annotations(geojson(tmp_path, feature(collection))).area == 100


def test_exclusion_class_is_cut_out(tmp_path):
    path = geojson(
        tmp_path,
        feature({"type": "Polygon", "coordinates": [square(0, 0, 100, 100)]}),
        feature({"type": "Polygon", "coordinates": [square(0, 0, 50, 50)]}, name="Exclusion"),
    )
    assert load_annotations(path).area == 100 * 100 - 50 * 50


@pytest.mark.parametrize(
    ("geometry", "kind"),
    [
        ({"type": "Point", "coordinates": [5, 5]}, "1 Point"),
        (None, "1 null geometry"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [20, 20], [0, 0]]]}, "1 Polygon"),  # no area
    ],
)
def test_annotations_without_area_are_left_out_with_a_warning(tmp_path, geometry, kind):
    path = geojson(
        tmp_path, feature({"type": "Polygon", "coordinates": [square(0, 0, 10, 10)]}), feature(geometry)
    )
    with pytest.warns(
        UserWarning, match=rf"slide.geojson: 1 annotation\(s\) without area left out \({kind}\)"
    ):
        region = load_annotations(path)
    assert region.area == 100 and region.geom_type == "Polygon"


def test_asap_dot_is_left_out_with_a_warning(tmp_path):
    path = tmp_path / "slide.xml"
    path.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="d" Type="Dot" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="1" Y="2"/></Coordinates></Annotation></Annotations></ASAP_Annotations>'
    )
    with pytest.warns(
        UserWarning, match=r"slide.xml: 1 annotation\(s\) without area left out \(1 Dot of 1 points\)"
    ):
        assert load_annotations(path).is_empty


def test_a_feature_that_is_not_an_object_names_the_file(tmp_path):
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(["not a feature"]))
    with pytest.raises(SlideError, match=r"slide.geojson: not a readable GeoJSON"):
        load_annotations(path)
