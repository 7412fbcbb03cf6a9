"""samflow.testing: the random batch plugin authors build their tests on."""

from __future__ import annotations

import pytest
import torch

from samflow.testing import random_batch, to_device


@pytest.mark.parametrize("prompt", ["box", "points", "none"])
def test_prompts_sit_on_each_mask(prompt):
    batch = random_batch(3, size=64, prompt=prompt, seed=1)
    assert batch.image.shape == (3, 3, 64, 64) and batch.mask.shape == (3, 1, 64, 64)
    for b in range(3):
        ys, xs = torch.nonzero(batch.mask[b, 0], as_tuple=True)
        if prompt == "box":  # inclusive pixel corners of the rectangle
            assert batch.box[b].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
        elif prompt == "points":
            x, y = batch.points[b, 0].tolist()
            assert batch.mask[b, 0, int(y), int(x)] == 1 and batch.point_labels[b, 0] == 1
        else:
            assert batch.box is None and batch.points is None
        assert torch.equal(batch.gt_original[b], batch.mask[b, 0].bool())


def test_same_seed_same_batch_and_unknown_prompt_refused():
    a, b = random_batch(2, seed=3), random_batch(2, seed=3)
    assert torch.equal(a.image, b.image) and torch.equal(a.box, b.box)
    assert not torch.equal(a.image, random_batch(2, seed=4).image)
    with pytest.raises(ValueError, match="'box', 'points' or 'none'"):
        random_batch(1, prompt="mask")


def test_to_device_moves_tensors_and_lists_and_keeps_the_rest():
    batch = to_device(random_batch(2), "meta")
    assert batch.image.device.type == "meta"
    assert all(m.device.type == "meta" for m in batch.gt_original)
    assert batch.id == ["img0", "img1"]


def test_batch_to_casts_floats_and_keeps_integer_and_bool_fields():
    batch = random_batch(2, prompt="points").to(torch.float64)
    assert batch.image.dtype == torch.float64 and batch.points.dtype == torch.float64
    assert batch.point_labels.dtype == torch.long and batch.image_index.dtype == torch.long
    assert batch.input_size.dtype == torch.long and batch.gt_original[0].dtype == torch.bool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (page-locked memory)")
def test_batch_pins_memory_as_the_data_loader_asks():
    from torch.utils.data import DataLoader

    loader = DataLoader([0, 1], batch_size=2, collate_fn=lambda _: random_batch(2), pin_memory=True)
    batch = next(iter(loader))
    assert batch.image.is_pinned() and batch.box.is_pinned() and batch.gt_original[0].is_pinned()
