import math

import pytest
import torch

from samflow.instance import matrix_nms


def _row(a: int, b: int) -> torch.Tensor:
    m = torch.zeros(1, 10, dtype=torch.bool)
    m[0, a:b] = True
    return m


def _case():
    # A = px 0-5, B = 2-7, C = 4-9 (6 px each): IoU(A,B) = 4/8 = 0.5, IoU(A,C) = 2/10 = 0.2,
    # IoU(B,C) = 4/8 = 0.5. D = A's pixels but another class: never decays nor decays others.
    masks = torch.stack([_row(0, 6), _row(2, 8), _row(4, 10), _row(0, 6)])
    labels = torch.tensor([0, 0, 0, 1])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    return masks, labels, scores


def test_gaussian_by_hand():
    out = matrix_nms(*_case(), kernel="gaussian", sigma=2.0)
    # B: decayed by A only, comp(A) = 0 -> exp(-2 * 0.5^2). C: by A exp(-2 * 0.2^2) / exp(0); by B
    # exp(-2 * 0.5^2) / exp(-2 * comp(B)^2) with comp(B) = 0.5 -> 1; min is A's.
    expect = [0.9, 0.8 * math.exp(-0.5), 0.7 * math.exp(-0.08), 0.6]
    assert out.tolist() == pytest.approx(expect, abs=1e-6)


def test_linear_by_hand():
    out = matrix_nms(*_case(), kernel="linear")
    # B: 1 - 0.5. C: min((1 - 0.2) / 1, (1 - 0.5) / (1 - 0.5)) = 0.8.
    assert out.tolist() == pytest.approx([0.9, 0.4, 0.56, 0.6], abs=1e-6)


def test_sigma_and_errors():
    out = matrix_nms(*_case(), sigma=1.0)
    assert out[1].item() == pytest.approx(0.8 * math.exp(-0.25), abs=1e-6)
    with pytest.raises(ValueError, match="kernel"):
        matrix_nms(*_case(), kernel="box")  # type: ignore[arg-type]
    empty = matrix_nms(torch.zeros(0, 4, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert empty.shape == (0,)
