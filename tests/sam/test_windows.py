"""samflow's one-pass window partition equals segment-anything's, values and gradients, bit for bit."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import image_encoder as sam_encoder

from samflow.sam.ops import window_partition, window_slots, window_unpartition

# (batch, h, w, window): no padding, padding at the bottom and right, a non-square grid, a grid smaller
# than one window, vit_b's 64 x 64 grid in 14 x 14 windows
SHAPES = [(1, 8, 8, 4), (2, 6, 6, 4), (2, 5, 9, 4), (3, 3, 2, 4), (1, 64, 64, 14)]


@pytest.mark.parametrize(("batch", "h", "w", "window"), SHAPES)
def test_partition_and_unpartition_equal_segment_anythings(batch, h, w, window):
    x = torch.randn(batch, h, w, 5, dtype=torch.float64, requires_grad=True)
    ours = window_partition(x, window)
    theirs, padded = sam_encoder.window_partition(x, window)
    assert torch.equal(ours, theirs)
    grid = window_unpartition(ours * 2, window, (h, w))
    assert torch.equal(grid, sam_encoder.window_unpartition(theirs * 2, window, padded, (h, w)))
    assert torch.equal(grid, x * 2)  # the round trip: every token back in its place, padding dropped
    weights = torch.randn_like(ours)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    (g_theirs,) = torch.autograd.grad((theirs * weights).sum(), x)
    assert torch.equal(g_ours, g_theirs)


def test_partition_of_a_non_contiguous_input():
    x = torch.randn(2, 5, 6, 7).permute(0, 2, 1, 3)  # (2, 6, 5, 7), channels not innermost in memory
    assert torch.equal(window_partition(x, 4), sam_encoder.window_partition(x, 4)[0])


def test_slots_by_hand():
    """A 3 x 5 grid in windows of 2: padded to 4 x 6, three windows a row; token (r, c) goes to window
    (r // 2) * 3 + c // 2, place (r % 2) * 2 + c % 2 of its 4."""
    expected = [
        [0, 1, 4, 5, 8],
        [2, 3, 6, 7, 10],
        [12, 13, 16, 17, 20],
    ]
    assert window_slots((3, 5), 2).tolist() == [s for row in expected for s in row]
