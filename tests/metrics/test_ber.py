"""Balanced error rate, accumulated and per image, by hand."""

from __future__ import annotations

import pytest
import torch

from samflow.metrics import BER
from samflow.metrics.functional import balanced_error_rate, binary_confusion_counts

# Image A: 4 shadow pixels, 3 found; 4 background pixels, 1 false alarm -> TP 3, TN 3, FP 1, FN 1.
PRED_A = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.6, 0.2, 0.3, 0.4]])
GT_A = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
# Image B: 1 shadow pixel, missed; 7 background pixels, all right -> TP 0, TN 7, FP 0, FN 1.
PRED_B = torch.zeros(2, 4)
GT_B = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])


def test_counts() -> None:
    assert binary_confusion_counts(PRED_A, GT_A).tolist() == [[3, 3, 1, 1]]
    assert binary_confusion_counts(PRED_B, GT_B).tolist() == [[0, 7, 0, 1]]


def test_accumulated_over_dataset() -> None:
    metric = BER()
    metric.update(PRED_A, GT_A)
    metric.update(PRED_B, GT_B)
    # Summed: TP 3, TN 10, FP 1, FN 2 -> 100 (1 - (3/5 + 10/11) / 2).
    assert metric.compute().item() == pytest.approx(100 * (1 - (3 / 5 + 10 / 11) / 2))


def test_per_image_mean() -> None:
    metric = BER(per_image=True)
    metric.update(torch.stack([PRED_A, PRED_B]), torch.stack([GT_A, GT_B]))
    ber_a = 100 * (1 - (3 / 4 + 3 / 4) / 2)
    ber_b = 100 * (1 - (0 / 1 + 7 / 7) / 2)
    assert metric.compute().item() == pytest.approx((ber_a + ber_b) / 2)


def test_absent_class_counts_as_correct() -> None:
    # No shadow in the GT and none predicted: BER 0; a false alarm on 1 of 4 pixels: 100 (1 - (1 + 3/4)/2).
    assert balanced_error_rate(torch.tensor([0, 4, 0, 0])).item() == 0.0
    assert balanced_error_rate(torch.tensor([0, 3, 1, 0])).item() == pytest.approx(12.5)
