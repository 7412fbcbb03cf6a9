"""Resize, pad and stretch geometry, and coordinate mapping into the S x S frame, checked by hand."""

from __future__ import annotations

import pytest
import torch

from samflow.data import (
    input_shape,
    longest_side_shape,
    pad_to_square,
    resize_longest_side,
    scale_boxes,
    scale_coords,
    stretch,
    to_input_frame,
)


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [
        (100, 200, 64, (32, 64)),  # scale 0.32
        (200, 100, 64, (64, 32)),
        (101, 200, 1024, (517, 1024)),  # 101 * 5.12 = 517.12 -> 517
        (3, 5, 4, (2, 4)),  # 3 * 0.8 = 2.4 -> 2
        (7, 8, 4, (4, 4)),  # 7 * 0.5 = 3.5 -> int(4.0) = 4, segment-anything's rounding
        (64, 64, 64, (64, 64)),
    ],
)
def test_longest_side_shape_follows_sam_rounding(height: int, width: int, size: int, expected: tuple) -> None:
    assert longest_side_shape(height, width, size) == expected
    assert input_shape(height, width, size, "longest") == expected
    assert input_shape(height, width, size, "stretch") == (size, size)


def test_resize_longest_side_and_pad_on_a_constant_image() -> None:
    image = torch.full((3, 2, 4), 0.5)  # (C, H, W)
    resized = resize_longest_side(image, 8)
    assert resized.shape == (3, 4, 8)
    torch.testing.assert_close(resized, torch.full((3, 4, 8), 0.5))
    padded = pad_to_square(resized, 8)
    assert padded.shape == (3, 8, 8)
    assert (padded[:, :4] == 0.5).all() and (padded[:, 4:] == 0).all()


def test_nearest_mask_resize_duplicates_pixels_exactly() -> None:
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])[None]  # (1, 2, 4)
    up, shape = to_input_frame(mask, 8, "longest", "nearest-exact")
    assert shape == (4, 8)
    expected = mask.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # (1, 4, 8)
    torch.testing.assert_close(up[:, :4], expected)
    assert (up[:, 4:] == 0).all()
    down = resize_longest_side(up[:, :4], 4, "nearest-exact")
    torch.testing.assert_close(down, mask)


def test_bool_masks_keep_their_dtype() -> None:
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    assert resize_longest_side(mask, 10, "nearest-exact").dtype == torch.bool


def test_stretch_ignores_aspect_ratio() -> None:
    image = torch.rand(3, 10, 30)
    framed, shape = to_input_frame(image, 16, "stretch")
    assert shape == (16, 16) and framed.shape == (3, 16, 16)
    torch.testing.assert_close(framed, stretch(image, 16))


def test_pad_refuses_larger_input() -> None:
    with pytest.raises(ValueError, match="larger"):
        pad_to_square(torch.zeros(1, 9, 4), 8)


def test_box_around_a_square_lands_where_computed_by_hand() -> None:
    # A 100 x 200 (H x W) image with a square at columns 50..69, rows 20..39 -> S = 64, scale 0.32.
    box = torch.tensor([50.0, 20.0, 69.0, 39.0])
    mapped = scale_boxes(box, (100, 200), longest_side_shape(100, 200, 64))
    torch.testing.assert_close(mapped, torch.tensor([16.0, 6.4, 22.08, 12.48]))
    # Stretch: x scales by 64 / 200, y by 64 / 100.
    stretched = scale_boxes(box, (100, 200), (64, 64))
    torch.testing.assert_close(stretched, torch.tensor([16.0, 12.8, 22.08, 24.96]))


def test_points_scale_per_axis_and_keep_batch_shape() -> None:
    points = torch.tensor([[[10.0, 5.0], [0.0, 99.0]]])  # (1, 2, 2) x, y
    mapped = scale_coords(points, (100, 50), (64, 32))  # w / W = 0.64, h / H = 0.64
    torch.testing.assert_close(mapped, points * 0.64)
