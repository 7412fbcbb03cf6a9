"""predict-slide's memory does not grow with the slide's area: the peak of Python/NumPy allocations
(tracemalloc) on slides of 4x the area stays near that of the small slide.

What grows: the stitching band is (tile x slide width), so a slide twice as wide holds a band twice
as wide; a slide four times as tall holds the same. Everything slide-sized (the mask and every
pyramid level) is a disk-backed array. A stand-in model (a colour threshold) keeps the test fast;
the model's own memory is per batch and does not depend on the slide. Numbers with the tiny SAM:
``benchmarks/wsi_predict_memory.py``.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("tiffslide")

from samflow.testing import write_disc_slide
from samflow.wsi_predict import predict_slide

MPP = 0.5  # level 0; the HR mask is at 1.0 um/px: half the level-0 side


class ColourModel:
    """Stands in for a SamflowModule: logits +-4 where a pixel's green is dark (the discs)."""

    device = torch.device("cpu")
    model = SimpleNamespace(img_size=64)

    def __call__(self, batch):
        logits = (batch.image[:, 1:2] < 0.3).float() * 8 - 4
        return SimpleNamespace(pred=logits), None


def peak_bytes(slide: Path, out: Path, **options) -> tuple[int, np.ndarray]:
    """Peak traced allocation of one predict_slide call, and the written mask."""
    import tifffile

    gc.collect()
    tracemalloc.start()
    try:
        result = predict_slide(
            ColourModel(), slide, out, mpp=1.0, tile=64, overlap=16, batch_size=8, progress=False, **options
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, tifffile.imread(result.mask_path)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    sizes = {"small": (768, 1024), "tall": (768, 4096), "large": (1536, 2048)}  # level 0; 4x the area
    return folder, {
        name: write_disc_slide(folder / f"{name}.tif", *size, mpp=MPP) for name, size in sizes.items()
    }


def test_peak_memory_does_not_grow_with_the_slide_area(slides):
    folder, paths = slides
    peak_bytes(paths["small"], folder / "warm", polygon_side=64)  # imports and caches first
    peaks, pixels = {}, {}
    for name, path in paths.items():
        peaks[name], mask = peak_bytes(path, folder / name, polygon_side=64)
        pixels[name] = mask.size
        assert 0.1 < (mask > 0).mean() < 0.5  # the discs were found: the pipeline ran on real content
    print({k: f"{v / 1e6:.3f} MB" for k, v in peaks.items()})
    assert pixels["tall"] == pixels["large"] == 4 * pixels["small"]
    # 4x the area, the same width: less than half a byte per added mask pixel (the mask alone in RAM
    # would be 1 byte a pixel, the probabilities 4); what grows is per tile (the tile list, the
    # reader's index of the slide file's tiles), ~100 bytes per 64 x 64 tile. Measured: 1.24.
    per_pixel = (peaks["tall"] - peaks["small"]) / (pixels["tall"] - pixels["small"])
    assert per_pixel < 0.5 and peaks["tall"] < 1.35 * peaks["small"], per_pixel
    # 4x the area, 2x the width: the band doubles too. Measured: 1.67.
    assert peaks["large"] < 2.0 * peaks["small"]
    # the measurement sees area-sized arrays: tracing polygons on the full-resolution mask (the default
    # polygon_side 4096 is larger than these masks) holds the mask in memory, and the peak grows with it
    full = {name: peak_bytes(paths[name], folder / f"{name}_full")[0] for name in ("small", "tall")}
    print({k: f"{v / 1e6:.3f} MB" for k, v in full.items()})
    assert (full["tall"] - full["small"]) / (pixels["tall"] - pixels["small"]) > 1.0
