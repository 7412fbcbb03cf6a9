"""Every WSI-SAM sample has a prompt, whichever of the mix's samplers draws it, on tumour and
background patches alike (the reference crashes on patches without tumour)."""

from __future__ import annotations

import pytest
import torch
from synthetic_slide import write_geojson, write_slide

pytest.importorskip("tiffslide")

from samflow.data.batch import collate
from samflow.data.prompts import NoisyMaskPrompt, PointPrompt
from samflow.data.wsi import CentreSizeBoxPrompt, SlidePatches
from samflow.data.wsi.patches import wsi_sam_prompts


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide")
    path, _ = write_slide(folder)
    return path, write_geojson(folder)


def test_the_mix_is_box_points_noisy_mask():
    kinds = [type(s) for s in wsi_sam_prompts().samplers]
    assert kinds == [CentreSizeBoxPrompt, PointPrompt, NoisyMaskPrompt]
    assert wsi_sam_prompts().weights.tolist() == [1.0, 1.0, 1.0]  # uniformly


@pytest.mark.parametrize("sampler", wsi_sam_prompts().samplers, ids=["box", "points", "noisy_mask"])
def test_every_sample_has_a_prompt(files, sampler):
    slide, geojson = files
    patches = SlidePatches(
        [slide],
        [geojson],
        patch_size=32,
        img_size=32,
        patches_per_slide=6,
        tumour_fraction=0.5,
        prompt=sampler,
    )
    items = [patches[i] for i in range(len(patches))]
    tumour = [c.tumour for c in patches.centres]
    assert sum(tumour) == 3 and not all(bool(it["mask"].any()) for it in items)  # background patches too
    for item, centre in zip(items, patches.centres):
        empty = not item["mask"].any()
        if isinstance(sampler, NoisyMaskPrompt):
            assert set(item) >= {"mask_prompt"} and item["mask_prompt"].shape == (1, 8, 8)
            assert not empty or not item["mask_prompt"].any()  # an empty mask prompt on background
        elif isinstance(sampler, CentreSizeBoxPrompt) and not empty:
            assert "box" in item and "points" not in item
        else:  # points, or the box sampler's fallback on an empty patch: one point, negative there
            labels = item["point_labels"]
            assert "box" not in item and (labels != -1).any()
            assert bool((labels == 1).any()) == (not empty)
    batch = collate(items)
    prompted = torch.zeros(batch.num_rows, dtype=torch.bool)
    if batch.point_labels is not None:
        prompted |= (batch.point_labels != -1).any(1)
    if batch.box is not None:
        prompted |= batch.has_box if batch.has_box is not None else True
    if batch.mask_prompt is not None:
        prompted |= batch.has_mask_prompt if batch.has_mask_prompt is not None else True
    assert prompted.all()
    assert batch.with_context().num_rows == 2 * len(items)  # and every row has its LR twin
