"""BA-SAM's terms worked by hand: ln(N)/ln(N_train), ALiBi's slopes, grid distances, the 2 x 2 bias."""

from __future__ import annotations

import math

import pytest
import torch

from samflow_plugins.ba_sam import alibi_slopes, distance_bias, grid_distance, length_scale, scale_at

R2 = math.sqrt(2.0)


def test_length_scale_by_hand():
    assert length_scale(4096, 4096) == 1.0  # exactly, not approximately
    # ln(2^14) / ln(2^12) = 14 / 12: ViT-B at 2048 px (128 x 128 tokens) against 1024 px (64 x 64)
    assert length_scale(16384, 4096) == pytest.approx(14 / 12, abs=1e-15)
    assert length_scale(1024, 4096) == pytest.approx(10 / 12, abs=1e-15)  # 512 px
    assert length_scale(256, 64) == pytest.approx(4 / 3, abs=1e-15)  # tiny at 256 px against 128 px
    assert length_scale(16, 64) == pytest.approx(2 / 3, abs=1e-15)  # tiny at 64 px
    assert length_scale(1, 64) == 0.0  # one key: the logits do not matter
    with pytest.raises(ValueError, match="N_train >= 2"):
        length_scale(16, 1)


def test_scale_at_matches_the_notes():
    # shared/reference notes, BA-SAM 3.2: d = 64 -> 0.125 at 1024 px, 0.14583 at 2048 px, x1.333 at 4096 px
    assert scale_at(1024, 1024, 64) == 0.125
    assert scale_at(2048, 1024, 64) == pytest.approx(0.125 * 14 / 12, abs=1e-15)
    assert scale_at(2048, 1024, 64) == pytest.approx(0.14583, abs=1e-5)
    assert scale_at(4096, 1024, 64) / 0.125 == pytest.approx(4 / 3, abs=1e-15)
    # below the training size the factor is below 1 (the released code crashes there: log(0))
    assert scale_at(512, 1024, 64) == pytest.approx(0.125 * 10 / 12, abs=1e-15)


def test_alibi_slopes():
    assert alibi_slopes(2) == [1 / 16, 1 / 256]
    assert alibi_slopes(8) == [2.0**-k for k in range(1, 9)]
    assert alibi_slopes(16) == pytest.approx([2.0 ** (-k / 2) for k in range(1, 17)])
    # 12 heads (ViT-B): the 8 of H = 8, then every other one of H = 16
    assert alibi_slopes(12) == pytest.approx(
        [2.0**-k for k in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    )
    assert alibi_slopes(1) == [2.0**-8]
    with pytest.raises(ValueError):
        alibi_slopes(0)


def test_grid_distance_on_a_2x2_grid():
    # tokens in raster order: 0 = (0, 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1)
    euclidean = torch.tensor([[0, 1, 1, R2], [1, 0, R2, 1], [1, R2, 0, 1], [R2, 1, 1, 0]])
    manhattan = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1], [1, 2, 0, 1], [2, 1, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(grid_distance(2, 2, "euclidean"), euclidean, rtol=0, atol=1e-7)
    torch.testing.assert_close(grid_distance(2, 2, "manhattan"), manhattan, rtol=0, atol=0)


def test_grid_distance_in_float64_is_computed_in_float64():
    d = grid_distance(5, 7, "euclidean", dtype=torch.float64)
    assert d.dtype == torch.float64
    # token 34 = (4, 6), token 8 = (1, 1): float64 square roots (torch's may be 1 ulp off math's;
    # float32's are 1e-8 off)
    expected = torch.tensor([math.sqrt(4**2 + 6**2), math.sqrt(2)], dtype=torch.float64)
    torch.testing.assert_close(d[0, [34, 8]], expected, rtol=0, atol=1e-15)
    assert d[0, 1].item() == 1.0


def test_grid_distance_of_a_rectangle():
    d = grid_distance(2, 3, "manhattan")  # token 5 = (1, 2), token 0 = (0, 0)
    assert d.shape == (6, 6) and d[0, 5] == 3 and d[2, 3] == 3 and d[1, 4] == 1
    assert torch.equal(d, d.T)
    with pytest.raises(ValueError, match="distance must be"):
        grid_distance(2, 2, "chebyshev")  # type: ignore[arg-type]


def test_distance_bias_on_a_2x2_grid_for_given_slopes():
    slopes = torch.tensor([0.5, 0.25])
    bias = distance_bias(slopes, grid_distance(2, 2, "euclidean"))
    expected_head0 = -0.5 * torch.tensor([[0, 1, 1, R2], [1, 0, R2, 1], [1, R2, 0, 1], [R2, 1, 1, 0]])
    assert bias.shape == (2, 4, 4)
    torch.testing.assert_close(bias[0], expected_head0, rtol=0, atol=1e-7)
    torch.testing.assert_close(bias[1], expected_head0 / 2, rtol=0, atol=1e-7)
    assert (bias.diagonal(dim1=1, dim2=2) == 0).all()
    # the further the key, the larger the penalty: the row of token 0 is 0 > -b > -b * sqrt(2)
    row = bias[0, 0]
    assert row[0] > row[1] == row[2] > row[3]
