"""HQ-SAM's point-sampled BCE + Dice: the sampler's counts and choice; the loss against a hand-made one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samflow_plugins.hq_sam.loss import point_bce_dice, point_sample, sample_points


def bilinear(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Independent bilinear read: (N, 1, H, W) at (N, P, 2) -> (N, P).

    Zero outside the map; pixel j's centre is at (j + 0.5) / W, as grid_sample with align_corners=False.
    """
    _, _, h, w = values.shape
    u = coords[..., 0] * w - 0.5  # continuous column
    v = coords[..., 1] * h - 0.5  # continuous row
    u0, v0 = u.floor().long(), v.floor().long()
    out = torch.zeros(coords.shape[:2], dtype=values.dtype)
    for du in (0, 1):
        for dv in (0, 1):
            col, row = u0 + du, v0 + dv
            weight = (1 - (u - col).abs()) * (1 - (v - row).abs())
            inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
            flat = row.clamp(0, h - 1) * w + col.clamp(0, w - 1)
            pixel = values[:, 0].flatten(1).gather(1, flat)
            out = out + torch.where(inside, weight * pixel, 0.0)
    return out


def dense_bce_dice(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE (mean per mask, then over masks) and Dice with smooth 1 of (N, P) values, written out."""
    p = logits.sigmoid()
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    dice = 1 - (2 * (p * target).sum(1) + 1) / (p.sum(1) + target.sum(1) + 1)
    return bce.mean(1).mean(), dice.mean()


def test_default_counts_are_hq_sams_12544_points():
    coords = sample_points(torch.randn(3, 1, 32, 32))
    assert coords.shape == (3, 112 * 112, 2) == (3, 12_544, 2)
    assert coords.min() >= 0 and coords.max() <= 1


def test_three_quarters_are_the_most_uncertain_candidates_and_a_quarter_uniform():
    logits = torch.randn(2, 1, 16, 16) * 4
    num_points = 200  # 600 candidates, 150 uncertain + 50 uniform
    coords = sample_points(logits, num_points, 3.0, 0.75, generator=torch.Generator().manual_seed(3))
    assert coords.shape == (2, 200, 2)
    gen = torch.Generator().manual_seed(3)  # candidates are the first draw, uniform points the second
    candidates = torch.rand(2, 600, 2, generator=gen)
    uniform = torch.rand(2, 50, 2, generator=gen)
    assert torch.equal(coords[:, 150:], uniform)
    certainty = bilinear(logits, candidates).abs()  # -uncertainty, at the interpolated point
    for n in range(2):
        chosen = (coords[n, :150, None, :] == candidates[n, None]).all(-1)  # (150, 600)
        assert torch.equal(chosen.sum(1), torch.ones(150, dtype=torch.long))  # each is one distinct candidate
        picked = chosen.any(0)
        assert picked.sum() == 150
        # every kept candidate is at least as uncertain as every dropped one
        assert certainty[n, picked].max() <= certainty[n, ~picked].min()


def test_all_points_uniform_or_all_uncertain_at_the_extremes():
    logits = torch.randn(1, 1, 8, 8)
    assert sample_points(logits, 40, 2.0, 0.0, generator=torch.Generator().manual_seed(0)).shape == (1, 40, 2)
    gen = torch.Generator().manual_seed(1)
    coords = sample_points(logits, 40, 1.0, 1.0, generator=gen)  # 40 candidates, all kept: a permutation
    candidates = torch.rand(1, 40, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(coords.sort(1).values, candidates.sort(1).values)


def test_point_sample_is_bilinear_interpolation():
    values = torch.randn(2, 1, 5, 7)
    coords = torch.rand(2, 300, 2)
    expected = bilinear(values, coords)
    torch.testing.assert_close(point_sample(values, coords)[:, 0], expected, atol=1e-6, rtol=0)
    # at pixel centres it reads the pixels themselves
    centres = torch.tensor([[[(3 + 0.5) / 7, (1 + 0.5) / 5], [0.5 / 7, 4.5 / 5]]]).expand(2, -1, -1)
    pixels = values[:, 0, [1, 4], [3, 0]]
    torch.testing.assert_close(point_sample(values, centres)[:, 0], pixels, atol=1e-6, rtol=0)


def test_loss_equals_dense_bce_dice_on_the_same_points():
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    target = (torch.rand(3, 1, 32, 32) > 0.5).float()  # 4x the logits' resolution, as SAM's 256 vs 1024
    coords = torch.rand(3, 400, 2)
    bce, dice = point_bce_dice(logits, target, coords)
    ref_bce, ref_dice = dense_bce_dice(bilinear(logits, coords), bilinear(target, coords))
    torch.testing.assert_close(bce, ref_bce, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dice, ref_dice, atol=1e-6, rtol=1e-6)
    (bce + dice).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_loss_at_every_pixel_centre_is_the_dense_loss():
    logits = torch.randn(2, 1, 6, 6)
    target = (torch.rand(2, 1, 6, 6) > 0.5).float()
    axis = (torch.arange(6) + 0.5) / 6
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    coords = torch.stack([cols, rows], -1).reshape(1, 36, 2).expand(2, -1, -1)
    bce, dice = point_bce_dice(logits, target, coords)
    torch.testing.assert_close(bce, F.binary_cross_entropy_with_logits(logits, target), atol=1e-6, rtol=0)
    p, t = logits.sigmoid().flatten(1), target.flatten(1)
    expected_dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()
    torch.testing.assert_close(dice, expected_dice, atol=1e-6, rtol=0)


def test_worked_example_by_hand():
    """One mask, two points: logits 0 (p = 1/2) on target 1 and logit 0 on target 0."""
    logits = torch.zeros(1, 1, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]]]])
    coords = torch.tensor([[[0.25, 0.5], [0.75, 0.5]]])  # the two pixel centres
    bce, dice = point_bce_dice(logits, target, coords)
    assert bce.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # -log(1/2) at both points
    assert dice.item() == pytest.approx(1 - (2 * 0.5 + 1) / (1.0 + 1.0 + 1))  # 1 - 2/3


def test_sampler_refuses_multi_channel_logits():
    with pytest.raises(ValueError, match="class-agnostic"):
        sample_points(torch.randn(1, 2, 4, 4))
