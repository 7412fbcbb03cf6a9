"""Slide annotations as one shapely geometry in level-0 pixels, rasterised per patch.

Readers: GeoJSON (QuPath's export: a FeatureCollection, a list of features or one feature; Polygon,
MultiPolygon and the polygons of GeometryCollection geometries) and ASAP XML
(``<Annotation Type="Polygon" PartOfGroup=...>`` with ``<Coordinate X= Y=>``, as CAMELYON16 ships
them). Polygons of the ``exclude`` groups (CAMELYON16's ``_2``, QuPath's classification
``Exclusion``) are cut out of the union of the others; annotations without area are left out with a
warning.
"""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samflow.data.wsi.slide import SlideError
from samflow.paths import where_looked

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


LABEL_SUFFIXES = (".png", ".tif", ".tiff")


def load_label_mask(path: str | Path, downsample: float, labels: Sequence[int] | None = None) -> Any:
    """A label image (``.png`` / ``.tif``) of a slide at any level -> a shapely geometry (level 0).

    Pixel (r, c) of the image covers level-0 [c d, (c+1) d) x [r d, (r+1) d) for ``downsample`` d (the
    level's downsample: 1 for a level-0 mask); a pixel belongs to the region when its label is in
    ``labels`` (default: any non-zero label). Horizontal runs of such pixels become boxes, unioned."""
    _shapely()
    from PIL import Image

    path = Path(path).expanduser()
    try:
        with Image.open(path) as img:
            label = np.asarray(img)
    except (OSError, ValueError) as err:
        raise SlideError(f"{path}: not a readable label image ({err}).") from None
    if label.ndim == 3:
        label = label[..., 0]
    return mask_to_region(label != 0 if labels is None else np.isin(label, list(labels)), downsample)


def mask_to_region(inside: np.ndarray, downsample: float) -> Any:
    """Boolean (H, W) mask whose pixels are ``downsample`` level-0 pixels wide -> the shapely geometry
    (level 0) of its pixels, exactly: horizontal runs become boxes, unioned."""
    shapely = _shapely()
    padded = np.pad(inside, ((0, 0), (1, 1))).astype(np.int8)
    rows, starts = np.nonzero(np.diff(padded, axis=1) == 1)
    _, ends = np.nonzero(np.diff(padded, axis=1) == -1)  # same row order: runs alternate start / end
    boxes = shapely.box(starts * downsample, rows * downsample, ends * downsample, (rows + 1) * downsample)
    return shapely.union_all(boxes) if len(boxes) else shapely.Polygon()


def load_annotations(
    path: str | Path,
    exclude: Sequence[str] = EXCLUDE,
    label_downsample: float = 1.0,
    slide_size: tuple[int, int] | None = None,
) -> Any:
    """Read a GeoJSON (``.geojson`` / ``.json``), ASAP ``.xml`` or label-image (``.png`` / ``.tif``, at
    ``label_downsample`` of level 0, see :func:`load_label_mask`) file -> a shapely geometry (level 0).

    Polygons, multipolygons and the polygons of geometry collections count; annotations without area
    (points, lines, null geometries, polygons of fewer than 3 points or of no area) are left out
    with a warning that names the file and how many. With ``slide_size`` (the slide's level-0 width,
    height) each annotation is checked against the slide (:func:`check_in_slide`): one wholly outside
    it is refused, one reaching far beyond it warned about (both mean other units than level-0 pixels)."""
    shapely = _shapely()
    from shapely.geometry import Polygon, shape

    path = Path(path).expanduser()
    if not path.is_file():
        raise SlideError(f"{path}: no such annotation file{where_looked(path)}.")
    if path.suffix.lower() in LABEL_SUFFIXES:
        region = load_label_mask(path, label_downsample)
        if slide_size is not None and not region.is_empty:
            check_in_slide(path, [("the label image", region)], slide_size)
        return region
    keep: list[Any] = []
    cut: list[Any] = []
    named: list[tuple[str, Any]] = []  # (which annotation, its geometry) for the slide-bounds check
    skipped: list[str] = []  # what had no area, by kind
    try:
        if path.suffix.lower() == ".xml":
            for i, ann in enumerate(ET.parse(path).getroot().iter("Annotation")):
                coords = sorted(ann.iter("Coordinate"), key=lambda c: int(c.get("Order", 0)))
                points = [(float(c.get("X", "nan")), float(c.get("Y", "nan"))) for c in coords]
                area = _area_of(Polygon(points)) if len(points) >= 3 else None
                if area is None:
                    skipped.append(f"{ann.get('Type', 'annotation')} of {len(points)} points")
                else:
                    (cut if ann.get("PartOfGroup", "") in exclude else keep).append(area)
                    named.append((_which(i, ann.get("Name")), area))
        else:
            for i, feature in enumerate(_geojson_features(json.loads(path.read_text()))):
                geometry = feature["geometry"]
                area = None if geometry is None else _area_of(shape(geometry))
                if area is None:
                    skipped.append("null geometry" if geometry is None else str(geometry.get("type")))
                else:
                    (cut if _group_of(feature) in exclude else keep).append(area)
                    named.append((_which(i, feature.get("id")), area))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ET.ParseError) as err:
        raise SlideError(f"{path}: not a readable GeoJSON or ASAP XML annotation ({err}).") from None
    if slide_size is not None:
        check_in_slide(path, named, slide_size)
    if skipped:
        kinds = ", ".join(f"{skipped.count(k)} {k}" for k in dict.fromkeys(skipped))
        warnings.warn(f"{path}: {len(skipped)} annotation(s) without area left out ({kinds}).", stacklevel=2)
    region = shapely.union_all(keep)
    if cut:
        region = region.difference(shapely.union_all(cut))
    return region


FAR_BEYOND = (
    0.1  # an annotation reaching further past an edge than this share of the slide's side is warned about
)


def _which(index: int, name: Any) -> str:
    """How a message names annotation ``index`` (0-based, in file order) with its id or name, if any."""
    return f"annotation {index}" + ("" if name in (None, "") else f" ({name!r})")


def _bounds(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def check_in_slide(path: Path, named: Sequence[tuple[str, Any]], slide_size: tuple[int, int]) -> None:
    """Refuse an annotation of ``path`` wholly outside the slide's level-0 extent, and warn (once per
    file) about those reaching more than ``FAR_BEYOND`` of the slide's side past an edge.

    Both are what coordinates in other units look like (microns of a slide under 1 um/px, pixels of a
    finer scan, nanometres): used silently they give empty or clipped masks. A small overshoot is
    normal (a brush stroke past the tissue's edge), and so is an outline around the whole slide ("all
    of it is tumour"): both are clipped as before, without a word. Bounds are
    (x0, y0, x1, y1) in the file's coordinates."""
    shapely = _shapely()
    width, height = slide_size
    extent = shapely.box(0, 0, width, height)
    slide = f"the slide's level-0 bounds are (0, 0, {width}, {height})"
    hint = "annotations must be in level-0 pixel coordinates (not microns or another level's pixels)"
    far: list[tuple[str, Any]] = []
    for which, geometry in named:
        if geometry.intersection(extent).area == 0:
            raise SlideError(
                f"{path}: {which} lies wholly outside the slide: its bounds are {_bounds(geometry.bounds)}, "
                f"{slide}; {hint}."
            )
        x0, y0, x1, y1 = geometry.bounds
        margin_x, margin_y = FAR_BEYOND * width, FAR_BEYOND * height
        beyond = x0 < -margin_x or y0 < -margin_y or x1 > width + margin_x or y1 > height + margin_y
        if beyond and not geometry.covers(extent):  # a box around the whole slide means "all of it"
            far.append((which, geometry))
    if far:
        which, geometry = far[0]
        more = f" (and {len(far) - 1} more)" if len(far) > 1 else ""
        warnings.warn(
            f"{path}: {which}{more} reaches far beyond the slide: its bounds are {_bounds(geometry.bounds)}, "
            f"{slide}; only the part inside is used; {hint}.",
            stacklevel=3,
        )


def _area_of(geometry: Any) -> Any:
    """The polygons of ``geometry`` (made valid; also those inside a geometry collection) as one
    geometry, or None when it has no area (a point, a line, a polygon collapsed to a line)."""
    shapely = _shapely()
    parts = shapely.get_parts(shapely.make_valid(geometry))
    polygons = [p for p in parts if p.geom_type in ("Polygon", "MultiPolygon") and p.area > 0]
    return shapely.union_all(polygons) if polygons else None


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


def rasterize_grid(region: Any, pixel: float, shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``shape`` (H, W) mask of ``region`` on a grid from level-0 (0, 0) whose pixels are
    ``pixel`` level-0 pixels wide; a pixel is in when its centre is."""
    shapely = _shapely()
    if region is None or region.is_empty:
        return np.zeros(shape, dtype=bool)
    xx, yy = np.meshgrid((np.arange(shape[1]) + 0.5) * pixel, (np.arange(shape[0]) + 0.5) * pixel)
    shapely.prepare(region)
    return shapely.contains_xy(region, xx, yy)
