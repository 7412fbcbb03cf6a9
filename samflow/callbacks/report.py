"""Validation metrics before and after training, and predicted masks written as PNGs."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from typing_extensions import override


class ImprovementReport(Callback):
    """Print validation metrics before training (the sanity check) and after it; save them as JSON.

    The before-numbers cover the whole validation set when ``trainer.num_sanity_val_steps`` is -1.
    """

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        before = getattr(pl_module, "initial_val_metrics", {})
        after = getattr(pl_module, "last_val_metrics", {})
        if not after:
            return
        lines = [f"  {'metric':<20} {'before':>10} {'after':>10}"]
        for key, value in after.items():
            old = before.get(key)
            lines.append(f"  {key:<20} {'n/a' if old is None else f'{old:.4f}':>10} {value:.4f}")
        rank_zero_info("Validation before and after training:\n" + "\n".join(lines))
        if log_dir is not None:
            path = Path(log_dir) / "val_before_after.json"
            path.write_text(json.dumps({"before": before, "after": after}, indent=2))


class TestReport(Callback):
    """Write the test metrics to the run folder as JSON, and as a table per dataset (Markdown and CSV).

    - ``test_metrics.json``: the metrics as logged (``{"test/iou/COD10K": 0.8, ...}``);
    - ``test_metrics.md``: a Markdown table, one row per test dataset, one column per metric;
    - ``test_metrics.csv``: the same table (``dataset,<metric>,...``), full precision.

    With several test sets (``data.test_sets``) the metric keys carry the dataset name
    (``test/<metric>/<dataset>``) and the rows follow the data module's ``test_names``. With one set the
    keys are ``test/<metric>`` and the row is named after its only entry of ``test_names`` (``test``
    when the data module has none). The Markdown table is also printed.

    Args:
        digits: decimals shown in the Markdown table.
        columns: metric order of the tables (e.g. ``[s_measure, em_mean, weighted_f, mae_sod]``, a
            paper's column order); metrics not listed follow in the order they were computed.
    """

    def __init__(self, digits: int = 4, columns: list[str] | None = None) -> None:
        self.digits = digits
        self.columns = list(columns or [])

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
        results = getattr(pl_module, "test_results", {})
        if not (trainer.is_global_zero and results and log_dir is not None):
            return
        datamodule = getattr(trainer, "datamodule", None)  # Lightning sets it at run time; not declared
        names = list(getattr(datamodule, "test_names", None) or []) if datamodule else []
        self.write(results, Path(log_dir), names)

    def write(self, results: dict[str, float], folder: Path, names: Sequence[str] = ()) -> dict[str, Path]:
        """Write ``test_metrics.{json,md,csv}`` into ``folder``; returns their paths by suffix."""
        folder.mkdir(parents=True, exist_ok=True)
        rows, found = self.table(results, names)
        columns = [c for c in self.columns if c in found] + [c for c in found if c not in self.columns]
        paths = {suffix: folder / f"test_metrics.{suffix}" for suffix in ("json", "md", "csv")}
        paths["json"].write_text(json.dumps(results, indent=2))
        markdown = self.markdown(rows, columns, self.digits)
        paths["md"].write_text(markdown)
        with paths["csv"].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["dataset", *columns])
            for dataset, values in rows.items():
                writer.writerow([dataset, *(repr(values[c]) if c in values else "" for c in columns)])
        rank_zero_info("Test metrics per dataset:\n" + markdown)
        return paths

    @staticmethod
    def table(
        results: dict[str, float], names: Sequence[str] = (), stage: str = "test"
    ) -> tuple[dict[str, dict[str, float]], list[str]]:
        """``{stage/metric[/dataset]: value}`` -> rows ``{dataset: {metric: value}}`` and the column order.

        Rows are ordered as ``names`` (the data module's ``test_names``), then any other dataset in the
        order met; columns in the order met. A key without a dataset part belongs to the only name in
        ``names``, or to a row called ``stage``.
        """
        single = names[0] if len(names) == 1 else stage
        found: dict[str, dict[str, float]] = {}
        columns: list[str] = []
        for key, value in results.items():
            parts = key.split("/", 2)
            if parts[0] != stage or len(parts) < 2:
                continue
            metric, dataset = parts[1], parts[2] if len(parts) == 3 else single
            found.setdefault(dataset, {})[metric] = float(value)
            if metric not in columns:
                columns.append(metric)
        order = [n for n in names if n in found] + [n for n in found if n not in names]
        return {dataset: found[dataset] for dataset in order}, columns

    @staticmethod
    def markdown(rows: dict[str, dict[str, float]], columns: Sequence[str], digits: int = 4) -> str:
        """A Markdown table: a ``dataset`` column, then one right-aligned column per metric."""
        lines = [
            "| " + " | ".join(["dataset", *columns]) + " |",
            "|" + "|".join([" --- ", *(" ---: " for _ in columns)]) + "|",
        ]
        for dataset, values in rows.items():
            cells = [f"{values[c]:.{digits}f}" if c in values else "" for c in columns]
            lines.append("| " + " | ".join([dataset, *cells]) + " |")
        return "\n".join(lines) + "\n"


class MaskWriter(BasePredictionWriter):
    """Write one binary mask PNG (0 / 255) per input image, at the image's original size.

    Args:
        output_dir: folder for the masks (default: ``<run folder>/predictions``).
        save_probabilities: also write the foreground probability as an 8-bit PNG (``<id>_prob.png``).
    """

    def __init__(self, output_dir: str | None = None, save_probabilities: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.save_probabilities = save_probabilities

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # trainer.log_dir is a collective call under DDP: every rank asks, once
        base = self.output_dir or str(Path(trainer.log_dir or trainer.default_root_dir) / "predictions")
        self._folder = Path(base)
        self._folder.mkdir(parents=True, exist_ok=True)

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        folder = self._folder
        for name, mask, prob in zip(prediction["id"], prediction["masks"], prediction["probs"]):
            Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255).save(folder / f"{name}.png")
            if self.save_probabilities:
                values = (prob.float().cpu().numpy() * 255).round().astype(np.uint8)
                Image.fromarray(values).save(folder / f"{name}_prob.png")
