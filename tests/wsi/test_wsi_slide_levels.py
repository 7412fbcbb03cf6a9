"""Reading levels whose downsample is not whole: a slide of odd size (771 x 511 px) has level 1 of
385 x 255 px, downsample 2.0033 (tiffslide: the mean of the width and height ratios)."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_slide import level0, write_pyramid

pytest.importorskip("tiffslide")

from samflow.data.wsi import Slide


@pytest.fixture(scope="module")
def odd_slide(tmp_path_factory):
    base = level0()[:-1]  # 511 x 768
    base = np.concatenate([base, base[:, :3]], 1)  # 511 x 771
    path = tmp_path_factory.mktemp("odd") / "odd.tif"
    return path, write_pyramid(path, base)


def test_downsamples_are_not_whole(odd_slide):
    slide = Slide(odd_slide[0])
    assert slide.level_dimensions == [(771, 511), (385, 255), (192, 127)]
    assert 2 < slide.downsamples[1] < 2.01


@pytest.mark.parametrize("level", [1, 2])
def test_read_level_gives_the_asked_pixels_of_the_level(odd_slide, level):
    path, levels = odd_slide
    slide = Slide(path)
    w, h = slide.level_dimensions[level]
    for x0 in range(0, w - 8, 5):  # every offset modulo the downsample's fraction
        y0 = (x0 * 3) % (h - 8)
        got = slide.read_level(level, x0, y0, 8, 6)
        assert np.array_equal(got, levels[level][y0 : y0 + 6, x0 : x0 + 8]), (level, x0, y0)


def test_read_level_across_the_border_pads_white_around_the_right_pixels(odd_slide):
    path, levels = odd_slide
    w, h = Slide(path).level_dimensions[1]
    got = Slide(path).read_level(1, w - 5, h - 3, 8, 8)
    assert np.array_equal(got[:3, :5], levels[1][h - 3 :, w - 5 :])
    assert (got[3:] == 255).all() and (got[:, 5:] == 255).all()
