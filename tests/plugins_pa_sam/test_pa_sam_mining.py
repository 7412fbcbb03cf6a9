"""Gumbel top-k with a straight-through estimator, and plain top-k in evaluation."""

from __future__ import annotations

import pytest
import torch

from samflow_plugins.pa_sam.mining import (
    cell_centres,
    choose_cells,
    gumbel_topk,
    sampling_guidance,
    topk_cells,
)


@pytest.mark.parametrize("scores", [torch.randn(5, 64), torch.zeros(5, 64)], ids=["random", "all_tied"])
def test_gumbel_topk_returns_exactly_k_distinct_cells(scores):
    selection, cells = gumbel_topk(scores, 4)
    assert cells.shape == (5, 4)
    for row in cells:
        assert len(set(row.tolist())) == 4
    assert torch.equal(cells, cells.sort(dim=-1).values)  # raster order
    # in value the selection is the k-hot of the chosen cells: exactly 0 elsewhere, 1 (to rounding) there
    hard = torch.zeros_like(scores).scatter(-1, cells, 1.0)
    assert torch.equal(selection[hard == 0], torch.zeros(int((hard == 0).sum())))
    torch.testing.assert_close(selection[hard == 1], torch.ones(20), atol=1e-6, rtol=0)


def test_gumbel_topk_picks_cells_whose_score_dominates_the_noise():
    scores = torch.zeros(3, 100)
    top = torch.tensor([[3, 17, 50, 99], [0, 1, 2, 3], [10, 40, 41, 80]])
    scores.scatter_(1, top, 100.0)
    _, cells = gumbel_topk(scores, 4)
    assert torch.equal(cells, top)


def test_straight_through_gradient_is_the_soft_khot_gradient():
    """d/ds Σ c·ST = d/ds Σ c·khot, khot recomputed here from the same noise by the notes' recursion."""
    scores = torch.randn(2, 30, requires_grad=True)
    weights = torch.randn(2, 30)
    torch.manual_seed(7)
    selection, _ = gumbel_topk(scores, 3, tau=0.5)
    (grad,) = torch.autograd.grad((selection * weights).sum(), scores)
    assert grad.abs().sum() > 0

    torch.manual_seed(7)
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(2, 30).clamp(min=tiny, max=1 - torch.finfo(torch.float32).eps)
    g = scores - torch.log(-torch.log(u))
    h = torch.zeros(2, 30)
    khot = torch.zeros(2, 30)
    for _ in range(3):
        g = g + torch.log(torch.clamp(1 - h, min=tiny))
        h = torch.softmax(g / 0.5, dim=-1)
        khot = khot + h
    (expected,) = torch.autograd.grad((khot * weights).sum(), scores)
    torch.testing.assert_close(grad, expected)


def test_gradients_reach_the_guidance_through_the_chosen_weights():
    coarse, refined, uncertainty = (torch.randn(2, 1, 8, 8, requires_grad=True) for _ in range(3))
    guidance = sampling_guidance(coarse, refined, uncertainty.sigmoid())
    torch.testing.assert_close(
        guidance, (uncertainty.sigmoid() * (refined.sigmoid() - coarse.sigmoid())).reshape(2, 64)
    )
    _, weight = choose_cells(guidance, 4, 1.0, sample=True)
    torch.testing.assert_close(weight, torch.ones(2, 4), atol=1e-6, rtol=0)
    (weight * torch.arange(1.0, 5.0)).sum().backward()
    for tensor in (coarse, refined, uncertainty):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_evaluation_picks_the_topk_cells_deterministically():
    scores = torch.randn(4, 64)
    cells, weight = choose_cells(scores, 4, 1.0, sample=False)
    assert torch.equal(cells, torch.topk(scores, 4, dim=1).indices.sort(dim=1).values)
    assert torch.equal(weight, torch.ones(4, 4))
    again, _ = choose_cells(scores, 4, 1.0, sample=False)
    assert torch.equal(cells, again)
    assert torch.equal(topk_cells(-scores, 4), torch.topk(-scores, 4, dim=1).indices.sort(dim=1).values)


def test_cell_centres_on_a_non_square_grid():
    # grid 2 x 4: cell 5 is row 1, column 1 -> x = 1.5 / 4, y = 1.5 / 2
    centres = cell_centres(torch.tensor([[0, 5, 7]]), (2, 4))
    expected = torch.tensor([[[0.125, 0.25], [0.375, 0.75], [0.875, 0.75]]])
    torch.testing.assert_close(centres, expected)
