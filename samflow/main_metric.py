"""The experiment's main validation metric (``main_metric``), which the ``checkpoint`` callback monitors
by default, and the checkpoint file name that carries its value (``checkpoint_filename``).
"""

from __future__ import annotations

import re
from typing import Any

from samflow.components import plain_config
from samflow.metrics.registry import DEFAULT_METRICS


def main_metric(metrics: Any, data: Any) -> tuple[str, str] | None:
    """``(key, mode)`` of the experiment's main validation metric, or None when it cannot be known.

    The main metric is the first of ``model.metrics`` (``iou`` by default), logged as ``val/<name>``, or
    ``val/<name>/<first set>`` with several ``val_sets``; a metric whose ``compute()`` returns a dict is
    logged under its keys instead, and its first ``result_keys`` is monitored (``em_mean`` for
    ``e_measure``). The mode is ``max`` unless the metric's ``higher_is_better`` is False (``mae``,
    ``ber``: ``min``). Known for samflow's data modules
    (``SegmentationDataModule``, ``SlideDataModule``, ``CocoDataModule``) that have a validation
    set; other data modules set ``--checkpoint.monitor`` themselves.
    """
    from samflow.metrics.registry import build_metrics

    data = plain_config(data) or {}
    kind = str(data.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(data, dict) else ""
    if kind not in ("SegmentationDataModule", "SlideDataModule", "CocoDataModule"):
        return None
    args = data.get("init_args") or {}
    sets = (args.get("val_sets") or {}) if kind == "SegmentationDataModule" else {}
    if not (args.get("val") or sets or (kind == "SegmentationDataModule" and args.get("quickstart"))):
        return None
    spec = plain_config(metrics) if metrics is not None else list(DEFAULT_METRICS)
    try:  # the first item alone (a MetricCollection orders its metrics by name)
        first = dict([next(iter(spec.items()))]) if isinstance(spec, dict) else [spec[0]]
        name, metric = next(iter(build_metrics(first).items()))
    except Exception:  # noqa: BLE001 - a bad metrics spec is reported when the module is built
        return None
    name = next(iter(getattr(metric, "result_keys", None) or [name]))
    suffix = f"/{next(iter(sets))}" if isinstance(sets, dict) and len(sets) > 1 else ""
    mode = "min" if getattr(metric, "higher_is_better", True) is False else "max"
    return f"val/{name}{suffix}", mode


def checkpoint_filename(monitor: str) -> str:
    """``epoch=E-step=S-val_iou=0.1234``: the monitored value in the name, without a ``/``."""
    safe = re.sub(r"[^\w.=-]+", "_", monitor)
    return "epoch={epoch}-step={step}-" + safe + "={" + monitor + ":.4f}"
