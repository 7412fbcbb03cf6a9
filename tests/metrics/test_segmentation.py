"""IoU, Dice and MAE on hand-made masks."""

from __future__ import annotations

import pytest
import torch

from samflow.metrics import BinaryDice, BinaryIoU, MeanAbsoluteError
from samflow.metrics.functional import binary_dice, binary_iou, mean_absolute_error


def _square(top: int, left: int, size: int = 4, shape: tuple[int, int] = (10, 10)) -> torch.Tensor:
    mask = torch.zeros(shape)
    mask[top : top + size, left : left + size] = 1
    return mask


def test_offset_squares_by_hand() -> None:
    # Two 4x4 squares offset by (1, 1): overlap 3x3 = 9, union 16 + 16 - 9 = 23.
    pred, gt = _square(2, 2), _square(3, 3)
    assert binary_iou(pred, gt).item() == pytest.approx(9 / 23)
    assert binary_dice(pred, gt).item() == pytest.approx(2 * 9 / 32)


def test_empty_masks() -> None:
    empty, square = torch.zeros(10, 10), _square(2, 2)
    assert binary_iou(empty, empty).item() == 1.0
    assert binary_dice(empty, empty).item() == 1.0
    assert binary_iou(empty, square).item() == 0.0
    assert binary_dice(square, empty).item() == 0.0


def test_threshold_is_strict() -> None:
    gt = torch.ones(2, 2)
    assert binary_iou(torch.full((2, 2), 0.5), gt).item() == 0.0
    assert binary_iou(torch.full((2, 2), 0.5), gt, threshold=0.4).item() == 1.0


def test_iou_metric_is_mean_of_per_image_iou() -> None:
    preds = torch.stack([_square(2, 2), _square(2, 2)])
    target = torch.stack([_square(2, 2), _square(3, 3)])
    metric = BinaryIoU()
    metric.update(preds, target)
    # Per-image mean (1 + 9/23) / 2, not the pooled IoU (16 + 9) / (16 + 23).
    assert metric.compute().item() == pytest.approx((1 + 9 / 23) / 2)
    dice = BinaryDice()
    dice.update(preds, target)
    assert dice.compute().item() == pytest.approx((1 + 18 / 32) / 2)


def test_mae_by_hand() -> None:
    pred = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    gt = torch.tensor([[0, 1], [1, 1]])
    assert mean_absolute_error(pred, gt).item() == pytest.approx((0.2 + 0.2 + 0.0 + 1.0) / 4)
    # normalize=True stretches [0.1, 0.5] to [0, 1] first.
    low = torch.tensor([[0.1, 0.5], [0.5, 0.1]])
    assert mean_absolute_error(low, gt, normalize=True).item() == pytest.approx(1 / 4)
    metric = MeanAbsoluteError()
    metric.update(pred, gt)
    metric.update(low, gt)
    assert metric.compute().item() == pytest.approx((0.35 + (0.1 + 0.5 + 0.5 + 0.9) / 4) / 2)


def test_input_layouts_agree() -> None:
    preds = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    target = preds.roll(1, dims=-1) > 0.5
    batched = binary_iou(preds, target)
    assert batched.shape == (3,)
    torch.testing.assert_close(binary_iou(preds[:, None], target[:, None]), batched)
    torch.testing.assert_close(binary_iou(preds[1], target[1]), batched[1:2])


def test_bad_inputs_are_explained() -> None:
    with pytest.raises(ValueError, match="sigmoid"):
        binary_iou(torch.full((4, 4), 3.0), torch.ones(4, 4))
    with pytest.raises(ValueError, match="same shape"):
        binary_iou(torch.zeros(4, 4), torch.zeros(4, 5))
    with pytest.raises(TypeError, match="float"):
        binary_iou(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4))
