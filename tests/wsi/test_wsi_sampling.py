"""Patch centres on slides whose tumour leaves no background: a clear error, never an endless draw."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager

import pytest
from synthetic_slide import write_slide

pytest.importorskip("tiffslide")
pytest.importorskip("shapely")

from samflow.data.wsi import SlideError, SlidePatches


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging (the sampler used to draw forever)."""

    def stop(signum, frame):
        raise TimeoutError(f"still drawing after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def all_tumour(tmp_path_factory):
    folder = tmp_path_factory.mktemp("all_tumour")
    slide, _ = write_slide(folder)
    outline = [[-10, -10], [800, -10], [800, 600], [-10, 600], [-10, -10]]  # covers the whole slide
    path = folder / "all.geojson"
    path.write_text(
        json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outline]}})
    )
    return slide, path


def patches(files, tumour_fraction: float) -> SlidePatches:
    slide, annotations = files
    return SlidePatches(
        [slide],
        [annotations],
        patch_size=32,
        img_size=32,
        patches_per_slide=4,
        tumour_fraction=tumour_fraction,
        tissue_mpp=2.0,
    )


def test_no_background_to_draw_is_refused_with_what_to_do(all_tumour):
    with (
        time_limit(60),
        pytest.raises(
            SlideError, match=r"slide.tif: no tissue outside its annotated tumour.*tumour_fraction: 1"
        ),
    ):
        patches(all_tumour, tumour_fraction=0.5)


def test_all_tumour_slide_draws_with_tumour_fraction_one(all_tumour):
    with time_limit(60):
        dataset = patches(all_tumour, tumour_fraction=1.0)
    assert len(dataset) == 4 and all(c.tumour for c in dataset.centres)
