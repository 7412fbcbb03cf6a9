"""Loader workers read slides through their own file handles.

``SlidePatches`` opens its slides in the parent (the tissue masks). A forked worker inherits those
open slides, whose file descriptors share one file offset with the parent's and every other
worker's; tifffile reads a region by a seek and then a read, so two workers reading at once could
get each other's bytes. Seen once in CI as a flaky ``test_wsi_resume_ddp`` case at 2 workers: the
same patch with another low-resolution view.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

pytest.importorskip("tiffslide")

from synthetic_slide import write_geojson, write_slide

from samflow.data.wsi import SlideDataModule


class WhoOpened(Dataset):
    """Per item: this process's pid, and the pid a tag on the slide it would read names (None: its own)."""

    def __init__(self, patches) -> None:
        self.patches = patches

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, int | None]:
        return os.getpid(), getattr(self.patches.slide(0), "opened_in", None)


@pytest.mark.skipif("fork" not in torch.multiprocessing.get_all_start_methods(), reason="needs fork")
def test_each_forked_worker_opens_its_own_slides(tmp_path):
    path, _ = write_slide(tmp_path)
    entry = {"slide": str(path), "annotations": str(write_geojson(tmp_path))}
    data = SlideDataModule(train=[entry], patch_size=32, img_size=32, patches_per_slide=4, batch_size=2)
    data.setup("fit")
    patches = data.datasets["train"]
    patches.slide(0).opened_in = os.getpid()  # the parent's open slide, which a fork copies
    loader = DataLoader(WhoOpened(patches), batch_size=None, num_workers=2, multiprocessing_context="fork")
    seen = list(loader)
    assert len(seen) == 4 and os.getpid() not in {pid for pid, _ in seen}  # read in the workers
    assert [opened for _, opened in seen] == [None] * 4  # each worker opened the slide itself
    assert patches.slide(0).opened_in == os.getpid()  # the parent keeps its own
    patch = patches[0]  # and the patches still read
    assert patch["image"].shape == (3, 32, 32)
