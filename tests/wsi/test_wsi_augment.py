"""GpuAugment on two-resolution batches: the context view gets the same flip and colour draw."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tiffslide")

from synthetic_slide import write_geojson, write_slide

from samflow.data import GpuAugment
from samflow.data.batch import collate
from samflow.data.wsi import SlidePatches


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide")
    slide, _ = write_slide(folder)
    patches = SlidePatches([slide], [write_geojson(folder)], patch_size=32, img_size=32, patches_per_slide=4)
    return collate([patches[i] for i in range(4)])


def test_flip_moves_both_views_and_masks(batch):
    out = GpuAugment(hflip=1.0)(batch)
    for key in ("image", "context_image", "mask", "context_mask"):
        torch.testing.assert_close(getattr(out, key), getattr(batch, key).flip(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.context_affine, batch.context_affine)  # concentric under a flip


def test_colour_jitter_is_the_same_draw_for_both_views(batch):
    same = batch.replace(context_image=batch.image.clone())
    torch.manual_seed(0)
    out = GpuAugment(hflip=0.5, color_jitter=(0.2, 0.2, 0.2, 0.1))(same)
    assert not torch.allclose(out.image, batch.image) and not torch.allclose(out.image, batch.image.flip(-1))
    torch.testing.assert_close(out.context_image, out.image, rtol=0, atol=1e-6)
    assert out.context_mask.shape == batch.mask.shape


def test_affine_steps_are_refused_for_context_batches(batch):
    with pytest.raises(ValueError, match="context_affine"):
        GpuAugment(scale=(0.5, 2.0))(batch)
