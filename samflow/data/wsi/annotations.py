"""Slide annotations as one shapely geometry in level-0 pixels, rasterised per patch.

Readers: GeoJSON (QuPath's export: a FeatureCollection, a list of features or one feature; Polygon
and MultiPolygon geometries) and ASAP XML (``<Annotation Type="Polygon" PartOfGroup=...>`` with
``<Coordinate X= Y=>``, as CAMELYON16 ships them). Polygons of the ``exclude`` groups (CAMELYON16's
``_2``, QuPath's classification ``Exclusion``) are cut out of the union of the others.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samflow.data.wsi.slide import SlideError

EXCLUDE = ("_2", "Exclusion")


def _shapely() -> Any:
    try:
        import shapely
    except ImportError:
        raise SlideError("slide annotations need shapely: pip install 'samflow[wsi]'.") from None
    return shapely


def _geojson_features(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return data
    if data.get("type") == "FeatureCollection":
        return list(data.get("features", []))
    return [data]


def _group_of(feature: dict[str, Any]) -> str:
    props = feature.get("properties") or {}
    classification = props.get("classification") or {}
    return str(classification.get("name") or props.get("name") or "")


def load_annotations(path: str | Path, exclude: Sequence[str] = EXCLUDE) -> Any:
    """Read a GeoJSON (``.geojson`` / ``.json``) or ASAP ``.xml`` file -> a shapely geometry (level 0)."""
    shapely = _shapely()
    from shapely.geometry import Polygon, shape

    path = Path(path)
    keep: list[Any] = []
    cut: list[Any] = []
    try:
        if path.suffix.lower() == ".xml":
            for ann in ET.parse(path).getroot().iter("Annotation"):
                coords = sorted(ann.iter("Coordinate"), key=lambda c: int(c.get("Order", 0)))
                points = [(float(c.get("X", "nan")), float(c.get("Y", "nan"))) for c in coords]
                if len(points) >= 3:
                    (cut if ann.get("PartOfGroup", "") in exclude else keep).append(Polygon(points))
        else:
            for feature in _geojson_features(json.loads(path.read_text())):
                geometry = shape(feature["geometry"])
                if geometry.geom_type in ("Polygon", "MultiPolygon"):
                    (cut if _group_of(feature) in exclude else keep).append(geometry)
    except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as err:
        raise SlideError(f"{path}: not a readable GeoJSON or ASAP XML annotation ({err}).") from None
    region = shapely.union_all([shapely.make_valid(g) for g in keep])
    if cut:
        region = region.difference(shapely.union_all([shapely.make_valid(g) for g in cut]))
    return region


def rasterize(region: Any, origin: tuple[float, float], pixel: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of ``region`` (level-0 geometry) on a patch whose pixel (0, 0) starts
    at ``origin`` (level 0) and whose pixels are ``pixel`` level-0 pixels wide: a pixel is in when its
    centre is."""
    shapely = _shapely()
    x0, y0 = origin
    extent = shapely.box(x0, y0, x0 + size * pixel, y0 + size * pixel)
    clipped = region.intersection(extent) if region is not None and not region.is_empty else None
    if clipped is None or clipped.is_empty:
        return np.zeros((size, size), dtype=bool)
    centres = x0 + (np.arange(size) + 0.5) * pixel
    ys = y0 + (np.arange(size) + 0.5) * pixel
    xx, yy = np.meshgrid(centres, ys)
    shapely.prepare(clipped)
    return shapely.contains_xy(clipped, xx, yy)
