"""Reads from pyramid levels of odd size map level pixels to level 0 by each axis's own scale.

The slide is 771 x 511 px. Its red channel is black right of x = 741, its green channel black below
y = 481 (level 0), and every level is the exact area average of that (built analytically here, not
with samflow's code). Area averaging keeps the integral of darkness, so in any patch read the dark
length along x is (sum of the red darkness of a row) x (patch pixel width): it must be the field's
right end minus 741 whatever level was read, and the same along y. A level mapped with another
scale shifts the edge: tiffslide's mean downsample (2.0033 for 771 x 511 -> 385 x 255 halved by 2)
puts it about 1.2 level-0 px off at the far edge.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tiffslide")

from samflow.data.wsi import Slide

MPP = 0.5
WIDTH, HEIGHT = 771, 511
X_EDGE, Y_EDGE = 741, 481  # red dark for x >= X_EDGE, green dark for y >= Y_EDGE (level 0)


def dark_fraction(size: int, scale: float, edge: int) -> np.ndarray:
    """Share of each of ``size`` pixels (each ``scale`` level-0 px wide) lying at or past ``edge``."""
    start = np.arange(size) * scale
    return np.clip((start + scale - edge) / scale, 0, 1)


def level(width: int, height: int, scale_x: float, scale_y: float) -> np.ndarray:
    """The slide's level of ``width`` x ``height`` px whose pixels are scale_x x scale_y level-0 px."""
    red = np.round(255 * (1 - dark_fraction(width, scale_x, X_EDGE)))
    green = np.round(255 * (1 - dark_fraction(height, scale_y, Y_EDGE)))
    img = np.full((height, width, 3), 200, dtype=np.uint8)
    img[..., 0] = red[None, :]
    img[..., 1] = green[:, None]
    return img


def write_levels(path, levels: list[np.ndarray]) -> None:
    import tifffile

    options = {"tile": (128, 128), "photometric": "rgb", "compression": None}
    res = 1e4 / MPP
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            levels[0], subifds=len(levels) - 1, resolution=(res, res), resolutionunit="CENTIMETER", **options
        )
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, **options)


PYRAMIDS = {  # (width, height, x scale, y scale) of levels 1, 2, ...
    # halved, the odd last column / row dropped (as scanners and tests/wsi/synthetic_slide do)
    "halved, floor": [(385, 255, 2.0, 2.0), (192, 127, 4.0, 4.0)],
    # halved, the last column / row partly past the slide's edge
    "halved, ceil": [(386, 256, 2.0, 2.0), (193, 128, 4.0, 4.0)],
    # thirds: 771 / 3 = 257 but 511 / 3 = 170.3
    "thirds": [(257, 170, 3.0, 3.0), (85, 56, 9.0, 9.0)],
}


@pytest.fixture(scope="module", params=sorted(PYRAMIDS))
def pyramid(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("scales") / "slide.tif"
    write_levels(path, [level(WIDTH, HEIGHT, 1.0, 1.0)] + [level(*spec) for spec in PYRAMIDS[request.param]])
    return path, PYRAMIDS[request.param]


def test_level_scales_are_the_whole_downsamples(pyramid):
    path, specs = pyramid
    slide = Slide(path)
    assert slide.level_dimensions[1:] == [(w, h) for w, h, _, _ in specs]  # tifffile took every level
    got = np.array(slide.scales[1:])
    assert got == pytest.approx(np.array([(sx, sy) for _, _, sx, sy in specs]), rel=1e-12)


@pytest.mark.parametrize("mpp", [1.6, 2.6, 5.1])
@pytest.mark.parametrize("size", [40, 23])
def test_dark_lengths_at_the_far_edge_are_exact(pyramid, mpp, size):
    slide = Slide(pyramid[0])
    pixel = mpp / MPP  # level-0 px per patch px
    side = size * pixel
    fx1, fy1 = 764.3, 503.7  # the field ends past both edges, inside every level (9 x 85 = 765, 9 x 56 = 504)
    centre = (fx1 - side / 2, fy1 - side / 2)
    assert slide.level_for(mpp) > 0  # a coarser level is read, not level 0
    patch = slide.read(centre, mpp, size).astype(np.float64)
    dark_x = ((255 - patch[..., 0]) / 255).sum(1) * pixel  # per row
    dark_y = ((255 - patch[..., 1]) / 255).sum(0) * pixel  # per column
    assert dark_x == pytest.approx(np.full(size, fx1 - X_EDGE), abs=0.05)
    assert dark_y == pytest.approx(np.full(size, fy1 - Y_EDGE), abs=0.05)


def test_a_level_of_the_asked_mpp_is_read_as_its_plain_crop(tmp_path):
    """Level 1 of the floor-halved pyramid is exactly 1.0 um/px (tiffslide's mean says 1.0016): a read
    at 1.0 um/px on its whole pixels is its crop."""
    path = tmp_path / "slide.tif"
    levels = [level(WIDTH, HEIGHT, 1.0, 1.0)] + [level(*spec) for spec in PYRAMIDS["halved, floor"]]
    write_levels(path, levels)
    slide = Slide(path)
    assert slide.level_for(1.0) == 1
    got = slide.read((2 * 370.0, 2 * 240.0), 1.0, 20)  # level-1 field [360, 380) x [230, 250)
    assert np.array_equal(got, levels[1][230:250, 360:380])


def test_a_large_resampled_read_takes_two_matrix_products_not_a_quadruple_loop(tmp_path):
    """512 px at 0.9 um/px from level 0 (0.5 um/px): a 922 px field. As two matrix products it is
    milliseconds; as one three-operand einsum (every patch pixel times every field pixel,
    512^2 x 922^2 x 3 products) it took minutes, and hours for predict-slide's 1024 px tiles."""
    import time

    path = tmp_path / "slide.tif"
    write_levels(path, [level(WIDTH, HEIGHT, 1.0, 1.0)])
    slide = Slide(path)
    start = time.perf_counter()
    patch = slide.read((WIDTH / 2, HEIGHT / 2), 0.9, 512)
    assert time.perf_counter() - start < 5.0
    assert patch.shape == (512, 512, 3)
