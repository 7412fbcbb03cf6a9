"""README ("Choosing components"): a metric given by class without an alias is logged under its class
name in snake case, ``BinaryF1Score`` -> ``binary_f1_score``."""

from __future__ import annotations

import torch

from samflow.metrics.registry import build_metrics


def test_a_class_without_alias_is_logged_in_snake_case():
    metrics = build_metrics([{"class_path": "torchmetrics.classification.BinaryF1Score"}, "iou"])
    assert set(metrics.keys()) == {"binary_f1_score", "iou"}
    metrics.update(torch.tensor([[0.9, 0.2]]), torch.tensor([[True, False]]))
    assert metrics.compute()["binary_f1_score"].item() == 1.0
