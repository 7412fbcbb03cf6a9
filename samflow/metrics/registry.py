"""Metrics of a run (``model.metrics``), chosen by ``class_path`` or by the short names of ``METRICS``.

A metrics spec is a list or a mapping. A list item is a short name (``iou``), a class_path spec of any
``torchmetrics.Metric`` (a third party's too; a bare class name resolves among the imported
subclasses) or a built metric; a class_path item is logged under its registered short name, or else
its class name in snake_case. A mapping names each metric itself (``log name: item``, the item as in
a list, or null for the registered metric of that name)::

    metrics: [iou, dice, mae]
    metrics:
      - iou
      - {class_path: BoundaryIoU, init_args: {dilation_ratio: 0.01}}         # logged as boundary_iou
      - {class_path: torchmetrics.classification.BinaryF1Score}              # logged as binary_f1_score
    metrics:
      iou: null
      biou_1pct: {class_path: BoundaryIoU, init_args: {dilation_ratio: 0.01}}

A metric gets each prompt row's foreground probabilities (H, W) in [0, 1] and its binary mask (H, W)
at the image's original resolution, one ``update(prob, target)`` per row: per image, or per instance
with COCO instances (the row's own mask, ``evaluation.row_targets``); a metric whose ``update`` takes
a ``source`` argument also gets the image's ``SamBatch.path`` (``slide_dice`` groups patches by slide).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torchmetrics import Metric, MetricCollection

from samflow.components import instantiate, is_class_path_spec, snake_case
from samflow.metrics.ber import BER, PerImageBER
from samflow.metrics.boundary_iou import BoundaryIoU
from samflow.metrics.segmentation import BinaryDice, BinaryIoU, MeanAbsoluteError, SodMAE
from samflow.metrics.slide import SlideDice
from samflow.metrics.sod import EMeasure, SMeasure, WeightedFMeasure

#: The metrics a run computes when ``model.metrics`` is not given.
DEFAULT_METRICS = ("iou", "dice", "mae")

METRICS: dict[str, type[Metric]] = {
    "iou": BinaryIoU,
    "dice": BinaryDice,
    "mae": MeanAbsoluteError,
    "mae_sod": SodMAE,
    "boundary_iou": BoundaryIoU,
    "s_measure": SMeasure,
    "e_measure": EMeasure,
    "weighted_f": WeightedFMeasure,
    "ber": BER,
    "ber_per_image": PerImageBER,
    "slide_dice": SlideDice,
}


MetricsSpec = (
    Sequence[str | Mapping[str, Any] | Metric] | Mapping[str, str | Mapping[str, Any] | Metric | None]
)


def build_metrics(spec: MetricsSpec, threshold: float | None = None) -> MetricCollection:
    """A fresh ``MetricCollection`` of the metrics of ``spec`` (see the module docstring).

    Built metrics in ``spec`` are cloned, so each call (one per stage and dataset) gets its own
    states. An unknown name lists the valid ones; a class_path that cannot be built names its key.
    ``threshold``: the threshold of the metrics given by a short name that take one (``iou``,
    ``dice``, ``boundary_iou``, ``ber``, ``slide_dice``); ``SamflowModule`` passes ``model.threshold``,
    so they score the masks ``samflow predict`` writes. A class_path spec or a built metric keeps its own.
    """
    items: list[tuple[str | None, Any]]
    if isinstance(spec, Mapping):
        items = [(str(name), name if item is None else item) for name, item in spec.items()]
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        items = [(None, item) for item in spec]
    else:
        raise TypeError(f"model.metrics must be a list or a mapping of metrics, got {spec!r}.")
    unknown = [
        item for _, item in items if isinstance(item, str) and item not in METRICS and not _is_class(item)
    ]
    if unknown:
        raise ValueError(
            f"Unknown metric(s) {unknown}; choose from {sorted(METRICS)} (model.metrics), or give a "
            "torchmetrics.Metric class as {class_path: ..., init_args: {...}}."
        )
    metrics: dict[str, Metric | MetricCollection] = {}
    for index, (name, item) in enumerate(items):
        key = f"model.metrics.{name}" if name is not None else f"model.metrics[{index}]"
        if isinstance(item, Metric):
            metric = item.clone()
        elif isinstance(item, str) and item in METRICS:
            takes = threshold is not None and "threshold" in inspect.signature(METRICS[item]).parameters
            metric = METRICS[item](**({"threshold": threshold} if takes else {}))
        elif is_class_path_spec(item) or isinstance(item, str):
            metric = instantiate(item, Metric, key)
        else:
            raise TypeError(f"{key}: a metric is a name, a class_path spec or a Metric, got {item!r}.")
        name = name if name is not None else _default_name(item, metric)
        if name in metrics:
            raise ValueError(
                f"model.metrics: two metrics are named {name!r}; give them their own names with the "
                "mapping form, {name: metric, ...}."
            )
        metrics[name] = metric
    return MetricCollection(metrics, compute_groups=False)


def _is_class(name: str) -> bool:
    """Whether a string names a class (an import path or a class name) rather than a short name."""
    return "." in name or name[:1].isupper()


def _default_name(item: Any, metric: Metric) -> str:
    if isinstance(item, str) and item in METRICS:
        return item
    registered = [name for name, cls in METRICS.items() if type(metric) is cls]
    return registered[0] if registered else snake_case(type(metric).__name__)
