"""Every metric's state reduces exactly: halves merged with merge_state equal one pass over everything."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sod_cases import make_sod_cases
from torchmetrics import Metric, MetricCollection

from samflow.metrics import (
    BER,
    BinaryDice,
    BinaryIoU,
    BoundaryIoU,
    EMeasure,
    MeanAbsoluteError,
    PerImageBER,
    SMeasure,
    SodMAE,
    WeightedFMeasure,
)

METRICS = {
    "iou": BinaryIoU,
    "dice": BinaryDice,
    "mae": MeanAbsoluteError,
    "sm": SMeasure,
    "em": EMeasure,
    "wfm": WeightedFMeasure,
    "ber": BER,
    "ber_per_image_flag": lambda: BER(per_image=True),
    "ber_per_image": PerImageBER,
    "ber_global_125": lambda: BER(level=125),
    "mae_sod": SodMAE,
    "biou": BoundaryIoU,
}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One update per image (sizes differ) plus one batched update."""
    batches = [(torch.from_numpy(p) / 255, torch.from_numpy(g > 128)) for _, p, g in make_sod_cases()]
    generator = torch.Generator().manual_seed(1)
    preds = torch.rand(3, 16, 24, generator=generator)
    batches.append((preds, torch.rand(3, 16, 24, generator=generator) > 0.6))
    return batches


def _assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_merged_halves_equal_single_pass(name: str) -> None:
    batches = _batches()
    whole, first, second = METRICS[name](), METRICS[name](), METRICS[name]()
    for i, (preds, target) in enumerate(batches):
        whole.update(preds, target)
        (first if i % 2 else second).update(preds, target)
    first.merge_state(second)
    _assert_same(first.compute(), whole.compute())


@pytest.mark.parametrize("name", sorted(METRICS))
def test_states_are_sums(name: str) -> None:
    metric: Metric = METRICS[name]()
    assert metric.full_state_update is False
    assert isinstance(metric.higher_is_better, bool) and metric.is_differentiable is False
    for state, reduce_fx in metric._reductions.items():
        assert reduce_fx is not None and reduce_fx.__name__ == "dim_zero_sum", state


def test_reset() -> None:
    metric = BinaryIoU()
    metric.update(torch.ones(4, 4), torch.zeros(4, 4))
    metric.reset()
    metric.update(torch.ones(4, 4), torch.ones(4, 4))
    assert metric.compute().item() == 1.0


def test_e_measure_keys_flatten_in_a_collection() -> None:
    collection = MetricCollection({"sm": SMeasure(), "em": EMeasure()}, prefix="val/")
    _, pred, gt = make_sod_cases()[0]
    collection.update(torch.from_numpy(pred) / 255, torch.from_numpy(gt > 128))
    assert set(collection.compute()) == {"val/sm", "val/em_mean", "val/em_max", "val/em_adaptive"}
    assert np.isfinite([v.item() for v in collection.compute().values()]).all()
