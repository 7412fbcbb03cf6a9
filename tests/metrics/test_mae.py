"""The two MAEs: ``mae`` (raw probabilities) and ``mae_sod`` (the SOD papers', equal to PySODMetrics)."""

from __future__ import annotations

import numpy as np
import py_sod_metrics  # the test extra installs it: a missing one fails, it does not skip
import pytest
import torch

from samflow.metrics import MeanAbsoluteError, SodMAE
from samflow.metrics.functional import mean_absolute_error
from samflow.metrics.registry import build_metrics


def test_raw_and_sod_mae_by_hand() -> None:
    # Probabilities 0.2 and 0.6 against GT 0 and 1: raw MAE (0.2 + 0.4) / 2 = 0.3. The SOD MAE first
    # stretches the map to [0, 1] (0.2 -> 0, 0.6 -> 1), so it is 0. A constant map is left as it is.
    pred, gt = torch.tensor([[0.2, 0.6]], dtype=torch.float64), torch.tensor([[0, 1]])
    metrics = build_metrics(["mae", "mae_sod"])
    assert type(metrics["mae"]) is MeanAbsoluteError and type(metrics["mae_sod"]) is SodMAE
    metrics.update(pred, gt)
    metrics.update(torch.full((2, 3), 0.25, dtype=torch.float64), torch.zeros(2, 3))
    values = metrics.compute()
    assert values["mae"].item() == pytest.approx((0.3 + 0.25) / 2, abs=1e-15)
    assert values["mae_sod"].item() == pytest.approx((0.0 + 0.25) / 2, abs=1e-15)


def _random_cases(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """8-bit maps of several sizes: noise, narrow ranges (max < 255, min > 0), constant, and binary."""
    rng = np.random.default_rng(seed)
    cases = []
    for h, w in [(1, 7), (13, 17), (40, 31), (64, 64), (100, 75), (3, 200)]:
        gt = ((rng.random((h, w)) < rng.uniform(0.05, 0.7)) * 255).astype(np.uint8)
        low = int(rng.integers(0, 120))
        high = int(rng.integers(low, 256))
        cases.append((rng.integers(0, 256, (h, w)).astype(np.uint8), gt))
        cases.append((rng.integers(low, high + 1, (h, w)).astype(np.uint8), gt))
        cases.append((np.full((h, w), rng.integers(0, 256), np.uint8), gt))
        cases.append((((rng.random((h, w)) < 0.5) * 255).astype(np.uint8), gt))
    return cases


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sod_mae_equals_pysodmetrics_on_random_maps(seed: int) -> None:
    reference, ours = py_sod_metrics.MAE(), SodMAE()
    for pred_u8, gt_u8 in _random_cases(seed):
        reference.step(pred_u8, gt_u8)
        pred, gt = torch.from_numpy(pred_u8).to(torch.float64) / 255, torch.from_numpy(gt_u8 > 128)
        ours.update(pred, gt)
        per_image = mean_absolute_error(pred, gt, normalize=True).item()
        assert per_image == pytest.approx(reference.maes[-1], abs=1e-9)
    assert ours.compute().item() == pytest.approx(reference.get_results()["mae"], abs=1e-9)
