"""Balanced error rate, accumulated and per image (SAM-Adapter's convention), by hand and against its code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samflow.metrics import BER, PerImageBER
from samflow.metrics.functional import balanced_error_rate, binary_confusion_counts, per_image_ber
from samflow.metrics.registry import build_metrics

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


# SAM-Adapter's BER (utils.py calc_ber): per image, pred * 255 > 125 and gt * 255 > 125, then
# pos_err = 100 (1 - TP/(TP+FN)), neg_err = 100 (1 - TN/(TN+FP)), BER = (pos_err + neg_err) / 2,
# averaged over images.
LEVEL = 125 / 255
ABOVE = 126 / 255


def test_per_image_ber_two_sizes_by_hand() -> None:
    # Image C, 2x4: 4 shadow pixels, 3 above 125/255; 4 background, 1 above -> TP 3, TN 3, FP 1, FN 1:
    # BER = 100 (1 - (3/4 + 3/4) / 2) = 25. The pixel at exactly 125/255 is background (strict >).
    pred_c = torch.tensor([[ABOVE, 0.9, 1.0, LEVEL], [ABOVE, 0.0, 0.2, LEVEL]], dtype=torch.float64)
    gt_c = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    # Image D, 3x3: 1 shadow pixel, missed (exactly 125/255); 8 background right -> TP 0, TN 8, FP 0,
    # FN 1: BER = 100 (1 - (0/1 + 8/8) / 2) = 50.
    pred_d = torch.full((3, 3), 0.1, dtype=torch.float64)
    pred_d[1, 1] = LEVEL
    gt_d = torch.zeros(3, 3)
    gt_d[1, 1] = 1
    assert per_image_ber(pred_c, gt_c).tolist() == [25.0]
    assert per_image_ber(pred_d, gt_d).tolist() == [50.0]
    per_image, pooled = PerImageBER(), BER(level=125)
    for pred, gt in ((pred_c, gt_c), (pred_d, gt_d)):
        per_image.update(pred, gt)
        pooled.update(pred, gt)
    # Mean of per-image BER: (25 + 50) / 2 = 37.5.
    assert per_image.compute().item() == 37.5
    # Pooled: TP 3, TN 11, FP 1, FN 2 -> 100 (1 - (3/5 + 11/12) / 2) = 100 · 29/120 = 24.1666...
    assert pooled.compute().item() == pytest.approx(100 * 29 / 120, abs=1e-12)
    assert build_metrics(["ber_per_image"])["ber_per_image"].__class__ is PerImageBER


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_is_strict_at_125_of_255(dtype: torch.dtype) -> None:
    """``pred * 255 > 125`` in the prediction's dtype: 125/255 is background, the next value up is not."""
    gt = torch.tensor([[1, 0]])
    at = torch.tensor(125 / 255, dtype=dtype)
    above = torch.nextafter(at, torch.tensor(1.0, dtype=dtype))
    assert (at * 255).item() == 125.0  # also in float32, where float32(125/255) is above 125/255 ...
    assert (above * 255).item() > 125.0
    for value, fg in ((at, False), (above, True), (at + 1e-6, True), (at - 1e-6, False)):
        counts = binary_confusion_counts(torch.stack([value, value])[None], gt, level=125)
        # [TP, TN, FP, FN]: the shadow pixel is found and the background pixel is a false alarm when fg.
        assert counts.tolist() == ([[1, 0, 1, 0]] if fg else [[0, 1, 0, 1]]), (dtype, value)
    # ... so the float64 comparison p > 125/255 would call the float32 value foreground.
    assert (at.to(torch.float64) > 125 / 255).item() == (dtype == torch.float32)


def _reference_calc_ber(preds: list[np.ndarray], gts: list[np.ndarray]) -> float:
    """SAM-Adapter's calc_ber with batch size 1, averaged over images (from its utils.py, restated)."""
    bers = []
    for pred, gt in zip(preds, gts, strict=True):
        p, g = pred * 255 > 125, gt * 255 > 125
        tp, tn = np.sum(p & g), np.sum(~p & ~g)
        fp, fn = np.sum(p & ~g), np.sum(~p & g)
        bers.append(((1 - tp / (tp + fn)) * 100 + (1 - tn / (tn + fp)) * 100) / 2)
    return float(np.mean(bers))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_image_ber_equals_reference_on_random_maps(dtype: type) -> None:
    rng = np.random.default_rng(7)
    preds, gts = [], []
    for h, w in [(17, 23), (64, 48), (5, 90), (128, 128)]:
        # Probabilities on the 1/255 grid (as 8-bit maps) and in between, many of them near 125/255.
        pred = np.where(rng.random((h, w)) < 0.3, rng.integers(120, 131, (h, w)) / 255, rng.random((h, w)))
        gt = (rng.random((h, w)) < rng.uniform(0.1, 0.6)).astype(dtype)
        preds.append(pred.astype(dtype))
        gts.append(gt)
    metric = PerImageBER()
    for pred, gt in zip(preds, gts, strict=True):
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    assert metric.compute().item() == pytest.approx(_reference_calc_ber(preds, gts), abs=1e-9)
