"""SamBatch's context views: prompts mapped by the geometry, selection, moving and collation."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from samflow.batch import to_context_frame
from samflow.data.batch import collate


def with_context(batch_size: int = 3, prompt: str = "box"):
    batch = random_batch(batch_size, prompt=prompt)
    context = random_batch(batch_size, seed=5)
    return batch.replace(context_image=context.image, context_mask=context.mask)


def test_default_affine_is_concentric_half():
    batch = with_context()
    assert batch.context_affine.tolist() == [[0.5, 32.0, 32.0]] * 3  # S = 128
    # the view's frame [0, S) covers the context's central half [S/4, 3S/4)
    corners = to_context_frame(torch.tensor([[[-0.5, -0.5], [127.5, 127.5]]]), batch.context_affine[:1])
    assert corners.tolist() == [[[31.5, 31.5], [95.5, 95.5]]]


def test_with_context_stacks_images_and_maps_boxes_and_points_exactly():
    batch = with_context(prompt="box")
    batch.box = torch.tensor([[0.0, 10.0, 127.0, 63.0], [4.0, 4.0, 8.0, 8.0], [1.0, 2.0, 3.0, 4.0]])
    stacked = batch.with_context()
    assert stacked.num_images == 6 and stacked.num_rows == 6 and stacked.context_rows == 3
    assert stacked.image_index.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(stacked.image[3:], batch.context_image)
    # x' = (x + 0.5) / 2 + 32 - 0.5 (pixel centres), hand-worked
    assert stacked.box[3].tolist() == [31.75, 36.75, 95.25, 63.25]
    assert torch.equal(stacked.box[:3], batch.box)
    points = with_context(prompt="points")
    points.points = torch.tensor([[[10.0, 20.0]], [[0.0, 127.0]], [[64.0, 64.0]]])
    mapped = points.with_context()
    assert mapped.points[3:, 0].tolist() == [[36.75, 41.75], [31.75, 95.25], [63.75, 63.75]]
    assert mapped.point_labels[3:].tolist() == points.point_labels.tolist()


def test_with_context_uses_each_images_affine_for_its_rows():
    batch = with_context(prompt="points")
    batch.points = torch.tensor([[[10.0, 20.0]], [[10.0, 20.0]], [[10.0, 20.0]]])
    batch.context_affine = torch.tensor([[0.5, 32.0, 32.0], [1.0, 0.0, 0.0], [0.25, 0.0, 10.0]])
    batch = batch.select_rows([2, 0, 1])  # rows in another order than their images
    mapped = batch.with_context().points[3:, 0]
    assert mapped.tolist() == [[2.125, 14.625], [36.75, 41.75], [10.0, 20.0]]


def test_mask_prompt_is_the_2x2_mean_placed_in_the_central_half():
    batch = with_context(prompt="none")
    low = torch.rand(3, 1, 32, 32)  # S/4 = 32
    batch.mask_prompt = low
    warped = batch.with_context().mask_prompt[3:]
    expected = torch.zeros(3, 1, 32, 32)
    expected[..., 8:24, 8:24] = torch.nn.functional.avg_pool2d(low, 2)
    torch.testing.assert_close(warped, expected, atol=1e-6, rtol=0)


def test_select_images_to_and_replace_keep_the_context():
    batch = with_context()
    picked = batch.select_images([2, 0])
    assert torch.equal(picked.context_image, batch.context_image[[2, 0]])
    assert torch.equal(picked.context_mask, batch.context_mask[[2, 0]])
    assert picked.context_affine.shape == (2, 3)
    moved = batch.to(torch.float64)
    assert moved.context_image.dtype == torch.float64 and moved.context_affine.dtype == torch.float64
    assert batch.replace(context_image=None).context_image is None


def test_collate_context_all_or_none():
    batch = with_context(2)
    items = [
        {
            "image": batch.image[i],
            "input_size": (128, 128),
            "original_size": (128, 128),
            "id": str(i),
            "mask": batch.mask[i],
            "gt_original": batch.mask[i, 0],
            "box": batch.box[i],
            "context_image": batch.context_image[i],
            "context_mask": batch.context_mask[i],
            "context_affine": torch.tensor([0.5, 32.0, 32.0]),
        }
        for i in range(2)
    ]
    out = collate(items)
    assert torch.equal(out.context_image, batch.context_image)
    assert torch.equal(out.context_affine, batch.context_affine)
    del items[1]["context_mask"]
    with pytest.raises(ValueError, match="context_mask"):
        collate(items)
