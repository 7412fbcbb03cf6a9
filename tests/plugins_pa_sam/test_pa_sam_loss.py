"""Auxiliary losses: boundary band against a brute-force reference, masked BCE / Dice by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from samflow_plugins.pa_sam.loss import band_width, boundary_band, masked_bce, masked_dice, pa_sam_losses


def _band_brute_force(mask: torch.Tensor, d: int) -> torch.Tensor:
    """Foreground within Chebyshev distance d of background or outside; background within d of foreground."""
    h, w = mask.shape
    out = torch.zeros(h, w)
    for i in range(h):
        for j in range(w):
            window = [(y, x) for y in range(i - d, i + d + 1) for x in range(j - d, j + d + 1)]
            inside = [(y, x) for y, x in window if 0 <= y < h and 0 <= x < w]
            if mask[i, j]:
                out[i, j] = float(len(inside) < len(window) or any(not mask[y, x] for y, x in inside))
            else:
                out[i, j] = float(any(mask[y, x] for y, x in inside))
    return out


def test_band_width_is_half_a_percent_of_the_diagonal():
    assert band_width((1024, 1024)) == 7  # round(7.24), the reference's 7 px
    assert band_width((128, 128)) == 1
    assert band_width((16, 16)) == 1  # at least 1
    assert band_width((1024, 1024), 0.02) == round(0.02 * math.hypot(1024, 1024)) == 29


@pytest.mark.parametrize("d", [1, 2])
def test_boundary_band_matches_brute_force(d):
    gen = torch.Generator().manual_seed(d)
    mask = F.max_pool2d((torch.rand(1, 1, 14, 14, generator=gen) > 0.8).float(), 3, 1, 1)  # blobs
    mask[..., :3, :4] = 1  # a blob on the corner: the image border is foreground boundary
    band = boundary_band(mask, d)
    assert torch.equal(band[0, 0], _band_brute_force(mask[0, 0] > 0.5, d))


def test_boundary_band_by_hand():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    expected = torch.zeros(8, 8)
    expected[1:7, 1:7] = 1
    expected[3:5, 3:5] = 0  # the 2x2 core is more than 1 px from the background
    assert torch.equal(boundary_band(mask, 1)[0, 0], expected)


def test_masked_bce_and_dice_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    region = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    # BCE(0, 1) = log 2, BCE(2, 0) = log(1 + e^2); mean over the 2 region pixels
    expected_bce = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert masked_bce(logits, target, region).item() == pytest.approx(expected_bce, rel=1e-6)
    # p = (0.5, σ(2)), y = (1, 0): Dice = 1 - (2·0.5 + 1) / (0.5 + σ(2) + 1 + 1)
    sig2 = 1 / (1 + math.exp(-2))
    assert masked_dice(logits, target, region).item() == pytest.approx(1 - 2 / (2.5 + sig2), rel=1e-6)
    # an empty region: BCE 0, Dice 0
    assert masked_bce(logits, target, torch.zeros_like(region)).item() == 0
    assert masked_dice(logits, target, torch.zeros_like(region)).item() == 0


def test_losses_split_pixels_by_uncertainty():
    """M_U >= 0.5 everywhere: the refined map takes the plain BCE/Dice, the coarse map nothing."""
    gen = torch.Generator().manual_seed(0)
    coarse, refined = torch.randn(2, 1, 8, 8, generator=gen), torch.randn(2, 1, 8, 8, generator=gen)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 5:20, 9:30] = 1
    target = F.avg_pool2d(mask, 4)  # area-averaged to the map resolution
    terms = pa_sam_losses(coarse, refined, torch.full((2, 1, 8, 8), 3.0), mask)
    assert terms["coarse_bce"].item() == 0 and terms["coarse_dice"].item() == 0
    torch.testing.assert_close(terms["refined_bce"], F.binary_cross_entropy_with_logits(refined, target))
    torch.testing.assert_close(terms["refined_dice"], masked_dice(refined, target, torch.ones_like(target)))
    # M_U < 0.5 everywhere: the roles swap
    swapped = pa_sam_losses(coarse, refined, torch.full((2, 1, 8, 8), -3.0), mask)
    torch.testing.assert_close(swapped["coarse_bce"], F.binary_cross_entropy_with_logits(coarse, target))
    assert swapped["refined_bce"].item() == 0
    # the uncertainty target is the band (d = 1 at 32 px), area-averaged
    band = F.avg_pool2d(boundary_band(mask, 1), 4)
    torch.testing.assert_close(
        terms["uncertainty_bce"], F.binary_cross_entropy_with_logits(torch.full((2, 1, 8, 8), 3.0), band)
    )


def test_region_split_gets_no_gradient_from_the_uncertainty():
    uncertainty = torch.randn(1, 1, 8, 8, requires_grad=True)
    coarse, refined = torch.randn(1, 1, 8, 8, requires_grad=True), torch.randn(1, 1, 8, 8, requires_grad=True)
    terms = pa_sam_losses(coarse, refined, uncertainty, torch.ones(1, 1, 32, 32))
    split = terms["coarse_bce"] + terms["coarse_dice"] + terms["refined_bce"] + terms["refined_dice"]
    grads = torch.autograd.grad(split, (coarse, refined, uncertainty), allow_unused=True)
    assert grads[0] is not None and grads[1] is not None and grads[2] is None
