"""A small synthetic pyramidal slide for the WSI tests, written with tifffile.

Level 0: 768 x 512 px at 0.5 um/px; levels 1 and 2 are 2 x 2 means (1.0 and 2.0 um/px). The left
512 px are tissue (a textured pink), the rest is blank glass (white). The object (tumour) is a
rectangle and a triangle drawn into level 0 by the pixel-centre rule, and outlined in GeoJSON and
ASAP XML with the same vertices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MPP = 0.5
WIDTH, HEIGHT = 768, 512
TISSUE_WIDTH = 512
RECT = [(160.0, 120.0), (300.0, 120.0), (300.0, 260.0), (160.0, 260.0)]
TRIANGLE = [(330.0, 300.0), (460.0, 300.0), (330.0, 440.0)]
OBJECT_RGB = (90, 30, 120)


def object_mask(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Whether level-0 points (x, y) are inside the object, by half-planes (independent of shapely)."""
    rect = (xs > 160) & (xs < 300) & (ys > 120) & (ys < 260)
    # triangle: x > 330, y > 300, and below the hypotenuse from (460, 300) to (330, 440)
    tri = (xs > 330) & (ys > 300) & ((xs - 330) / 130 + (ys - 300) / 140 < 1)
    return rect | tri


def level0() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
    tissue = np.stack(
        [
            rng.integers(200, 240, (HEIGHT, TISSUE_WIDTH)),
            rng.integers(120, 170, (HEIGHT, TISSUE_WIDTH)),
            rng.integers(170, 210, (HEIGHT, TISSUE_WIDTH)),
        ],
        -1,
    )
    img[:, :TISSUE_WIDTH] = tissue
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    inside = object_mask(xx, yy)
    img[inside] = np.array(OBJECT_RGB) + rng.integers(0, 20, (int(inside.sum()), 3))
    return img


def halve(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2, img.shape[1] // 2
    return img[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean((1, 3)).round().astype(np.uint8)


def write_slide(folder: Path, with_mpp: bool = True) -> tuple[Path, list[np.ndarray]]:
    path = folder / ("slide.tif" if with_mpp else "slide_no_mpp.tif")
    return path, write_pyramid(path, level0(), MPP if with_mpp else None)


def write_pyramid(path: Path, base: np.ndarray, mpp: float | None = MPP, count: int = 3) -> list[np.ndarray]:
    """A tiled pyramidal TIFF of ``base`` (level 0 at ``mpp``; None: no resolution tags) and ``count - 1``
    levels of 2 x 2 means (an odd last row or column dropped, as slide scanners do) -> the levels."""
    import tifffile

    levels = [base]
    while len(levels) < count:
        levels.append(halve(levels[-1]))
    options = {"tile": (128, 128), "photometric": "rgb", "compression": None}
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            extra = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2**i)  # pixels per centimetre
                extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            if i == 0:
                tif.write(level, subifds=len(levels) - 1, **options, **extra)
            else:
                tif.write(level, subfiletype=1, **options, **extra)
    return levels


def write_geojson(folder: Path) -> Path:
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [RECT + [RECT[0]]]},
            "properties": {"classification": {"name": "Tumor"}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [TRIANGLE + [TRIANGLE[0]]]},
            "properties": {"classification": {"name": "Tumor"}},
        },
    ]
    path = folder / "slide.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_asap(folder: Path) -> Path:
    def annotation(name: str, points: list[tuple[float, float]], group: str) -> str:
        coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(points))
        return f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}"><Coordinates>{coords}</Coordinates></Annotation>'

    body = annotation("a", RECT, "_0") + annotation("b", TRIANGLE, "_0")
    body += annotation("hole", [(200.0, 160.0), (220.0, 160.0), (220.0, 180.0), (200.0, 180.0)], "_2")
    path = folder / "slide.xml"
    path.write_text(f"<ASAP_Annotations><Annotations>{body}</Annotations></ASAP_Annotations>")
    return path
