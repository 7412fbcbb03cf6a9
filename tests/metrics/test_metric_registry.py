"""``build_metrics``: the short names, class_path items (a third party's metric too) and the mapping form."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import Metric

from samflow.metrics import BinaryIoU, BoundaryIoU, MeanAbsoluteError
from samflow.metrics.registry import METRICS, build_metrics


class ForegroundShare(Metric):
    """A third party's metric: the mean predicted foreground share per image."""

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        self.total += (prob > self.threshold).float().mean()
        self.count += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.count


def test_short_names_still_work() -> None:
    metrics = build_metrics(["iou", "dice", "mae"])
    assert set(metrics.keys()) == {"iou", "dice", "mae"} and isinstance(metrics["iou"], BinaryIoU)


def test_class_path_items_in_a_list() -> None:
    metrics = build_metrics(
        [
            "iou",
            {"class_path": "BoundaryIoU", "init_args": {"dilation_ratio": 0.01}},  # logged by its short name
            {"class_path": "ForegroundShare", "init_args": {"threshold": 0.25}},  # a third party's, by name
            {"class_path": "samflow.metrics.MeanAbsoluteError"},  # ambiguous as a bare name: a full path
        ]
    )
    assert set(metrics.keys()) == {"iou", "boundary_iou", "foreground_share", "mae"}
    assert metrics["boundary_iou"].dilation_ratio == 0.01
    assert (
        isinstance(metrics["foreground_share"], ForegroundShare)
        and metrics["foreground_share"].threshold == 0.25
    )
    assert type(metrics["mae"]) is MeanAbsoluteError
    metrics.update(torch.full((4, 4), 0.4), torch.ones(4, 4, dtype=torch.bool))
    assert metrics.compute()["foreground_share"].item() == 1.0


def test_the_mapping_form_names_each_metric() -> None:
    metrics = build_metrics(
        {
            "iou": None,  # the registered metric of that name
            "biou_1pct": {"class_path": "BoundaryIoU", "init_args": {"dilation_ratio": 0.01}},
            "biou_2pct": "boundary_iou",
        }
    )
    assert set(metrics.keys()) == {"iou", "biou_1pct", "biou_2pct"}
    assert metrics["biou_1pct"].dilation_ratio == 0.01 and metrics["biou_2pct"].dilation_ratio == 0.02


def test_built_metrics_are_cloned_on_every_call() -> None:
    """The module builds one collection per stage and dataset: each needs its own states."""
    spec = [BoundaryIoU(dilation_ratio=0.05)]
    first, second = build_metrics(spec), build_metrics(spec)
    assert first["boundary_iou"] is not second["boundary_iou"] is not spec[0]
    assert second["boundary_iou"].dilation_ratio == 0.05


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["iou", "foo"], r"Unknown metric\(s\) \['foo'\]; choose from"),
        (["iou", {"class_path": "BinaryIoU"}], r"two metrics are named 'iou'.*mapping form"),
        (
            [{"class_path": "BinaryIoU", "init_args": {"thresh": 0.5}}],
            r"model.metrics\[0\]: .*'thresh' is not accepted",
        ),
        (
            {"mine": {"class_path": "torch.nn.Linear"}},
            r"model.metrics.mine: .*not correspond to a subclass of Metric",
        ),
        ([{"class_path": "MeanAbsoluteError"}], r"Multiple subclasses with name MeanAbsoluteError"),
        ("iou", r"must be a list or a mapping"),
    ],
)
def test_errors_name_the_item(spec: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build_metrics(spec)  # type: ignore[arg-type]


def test_every_registered_class_is_logged_under_its_short_name() -> None:
    for name, cls in METRICS.items():
        (key,) = build_metrics([{"class_path": f"{cls.__module__}.{cls.__name__}"}]).keys()
        assert key == name
