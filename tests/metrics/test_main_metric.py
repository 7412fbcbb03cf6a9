"""The main metric (the checkpoint's default monitor) is a key the evaluation logs, for every metric."""

from __future__ import annotations

import pytest
import torch

from samflow.main_metric import main_metric
from samflow.metrics.registry import METRICS, build_metrics

DATA = {"class_path": "samflow.data.SegmentationDataModule", "init_args": {"val": "v"}}


def logged_keys(spec) -> set[str]:
    """The ``val/`` keys ``EvaluationMixin._finish`` logs for a metrics spec, after one image."""
    metrics = build_metrics(spec)
    target = torch.zeros(16, 16, dtype=torch.bool)
    target[4:12, 4:12] = True
    metrics.update(torch.rand(16, 16, generator=torch.Generator().manual_seed(0)), target, source="a.tif")
    return {f"val/{key}" for key in metrics.compute()}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_the_main_metric_of_every_registered_metric_is_logged(name):
    """First in the list, each metric is what the checkpoint monitors; ``e_measure`` logs three values
    (``em_mean``, ``em_max``, ``em_adaptive``) and no ``val/e_measure``: its main value is ``em_mean``."""
    found = main_metric([name, "mae"], DATA)
    assert found is not None and found[0] in logged_keys([name])
    assert found[1] == ("max" if METRICS[name].higher_is_better else "min")


def test_a_named_e_measure_is_monitored_by_its_mean():
    assert main_metric({"em": "e_measure", "iou": None}, DATA) == ("val/em_mean", "max")
    assert "val/em_mean" in logged_keys({"em": "e_measure"})
