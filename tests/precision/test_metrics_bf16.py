"""Metrics fed bf16 probabilities (a bf16 model's sigmoid): thresholds and sums see the bf16 values
exactly, as they would in float32 or float64."""

from __future__ import annotations

import pytest
import torch

from samflow.metrics.functional.ber import binary_confusion_counts
from samflow.metrics.registry import METRICS, build_metrics


def test_sam_adapters_ber_level_sees_a_bf16_probability_exactly():
    """251/512 is a bf16 value; 255 * 251/512 = 125.0098 > 125, so the pixel is foreground. Multiplied
    in bf16 (8 significant bits: 0.5 apart at 125) the product rounds to 125.0 and it was background."""
    p = torch.tensor(251 / 512, dtype=torch.bfloat16)
    assert p.item() == 251 / 512 and 255 * 251 / 512 > 125
    gt = torch.tensor([[1.0, 0.0]])
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        counts = binary_confusion_counts(p.to(dtype).expand(1, 2), gt, level=125)
        assert counts.tolist() == [[1, 0, 1, 0]], dtype  # [TP, TN, FP, FN]: foreground in every dtype


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_of_bf16_probabilities_equals_that_of_the_same_values_in_float64(name):
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 1, 64, 64, generator=gen).bfloat16()
    target = torch.rand(2, 1, 64, 64, generator=gen) > 0.6
    low, high = build_metrics([name]), build_metrics([name])
    low.update(probs, target)
    high.update(probs.double(), target)
    for key, value in low.compute().items():
        assert value.dtype == torch.float64, key
        torch.testing.assert_close(value, high.compute()[key], rtol=1e-12, atol=0)
