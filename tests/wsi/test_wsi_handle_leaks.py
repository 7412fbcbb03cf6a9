"""File descriptors over long runs: slide reads, training epochs over many slides and repeated
``predict_slide`` calls hold a bounded number of files, counted in /proc/self/fd.

The first slide read of a process opens a few descriptors once (an event loop of tiffslide's
storage layer); every count here starts after such a warm-up, and the descriptors that point at
slide files are counted by their target.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("tiffslide")

if not Path("/proc/self/fd").is_dir():
    pytest.skip("counting descriptors needs /proc/self/fd", allow_module_level=True)

from synthetic_slide import write_geojson, write_slide

import samflow.data.wsi.patches as patches_module
from samflow import wsi_predict
from samflow.data.wsi import Slide, SlidePatches


def descriptors() -> list[str]:
    """Targets of this process's open file descriptors on files (sockets, pipes and event polls that
    libraries' background threads open, e.g. an earlier test's W&B or loader, are not this code's)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target.startswith("/"):
            out.append(target)
    return out


def open_on(folder: Path) -> int:
    """Descriptors open on files in ``folder``."""
    return sum(target.startswith(str(folder)) for target in descriptors())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    slide, _ = write_slide(folder)
    warm = Slide(slide)
    warm.read((300.0, 200.0), 1.0, 16)  # warm-up: the once-per-process descriptors
    warm.close()
    return {"slide": slide, "geojson": write_geojson(folder), "dir": folder}


@pytest.mark.parametrize("reads", [1, 25])
def test_slides_opened_read_and_closed_leave_no_descriptor(files, reads):
    before = len(descriptors())
    for _ in range(reads):
        slide = Slide(files["slide"])
        slide.read((300.0, 200.0), 1.0, 32)
        slide.close()
    assert len(descriptors()) <= before  # no growth (garbage of earlier tests may close meanwhile)
    assert open_on(files["dir"]) == 0


def test_an_epoch_over_many_slides_keeps_a_bounded_number_open(files, monkeypatch):
    """Five slides, at most two open at a time; the patches equal those read with every slide open."""
    monkeypatch.setattr(patches_module, "MAX_OPEN_SLIDES", 2, raising=False)
    options = {"patch_size": 32, "img_size": 32, "patches_per_slide": 3}
    before = len(descriptors())
    dataset = SlidePatches([files["slide"]] * 5, [files["geojson"]] * 5, **options)
    assert open_on(files["dir"]) <= 2
    items = [dataset[i] for i in range(len(dataset))] + [dataset[i] for i in reversed(range(len(dataset)))]
    assert open_on(files["dir"]) <= 2
    assert len(descriptors()) <= before + 2
    monkeypatch.setattr(patches_module, "MAX_OPEN_SLIDES", 64, raising=False)
    reference = SlidePatches([files["slide"]] * 5, [files["geojson"]] * 5, **options)
    for i in range(len(dataset)):
        assert torch.equal(items[i]["image"], reference[i]["image"])
        assert torch.equal(items[-1 - i]["context_image"], reference[i]["context_image"])
    del dataset, reference
    gc.collect()
    assert open_on(files["dir"]) == 0


@pytest.fixture(scope="module")
def module():
    from samflow.module import SamflowModule, SamSpec
    from samflow_plugins.wsi_sam import WSISam

    torch.manual_seed(0)
    return SamflowModule(sam=SamSpec(variant="tiny"), plugins={"wsi": WSISam()}, losses={}).eval()


def test_repeated_predict_slide_leaves_no_descriptor(files, module, tmp_path):
    options = {"mpp": 4.0, "tile": 64, "overlap": 0, "annotations": files["geojson"], "progress": False}
    wsi_predict.predict_slide(module, files["slide"], tmp_path / "0", **options)
    before = len(descriptors())
    for run in range(1, 3):
        wsi_predict.predict_slide(module, files["slide"], tmp_path / str(run), **options)
    assert len(descriptors()) <= before  # no growth (garbage of earlier tests may close meanwhile)
    assert open_on(files["dir"]) == 0 and open_on(tmp_path) == 0


def test_a_predict_slide_that_fails_closes_its_slide(files, module, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("tiling failed")

    monkeypatch.setattr(wsi_predict, "tile_chunks", fail)
    with pytest.raises(RuntimeError, match="tiling failed") as caught:
        wsi_predict.predict_slide(module, files["slide"], tmp_path, progress=False)
    assert caught.traceback  # the traceback (and its frames) are alive: only an explicit close frees the file
    assert open_on(files["dir"]) == 0
